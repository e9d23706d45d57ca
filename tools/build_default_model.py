"""Build the bundled default model `prune_compile/data/default_model.onnx` (and its provenance JSON).

DemoNet is a small CNN that exercises the structures the pruning passes must handle: a residual add, a
depthwise-separable block with squeeze-and-excitation (channel-wise mul), an Inception-style concat, a channel
split, global pooling and a flatten → linear head. Weights are seeded random (no dataset is downloaded), with
non-degenerate BatchNorm statistics. Run: `.venv/bin/python tools/build_default_model.py`.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os

import torch
from torch import nn

SEED = 20261122
INPUT_SHAPE = (1, 3, 64, 64)
HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join(HERE, "..", "prune_compile", "data", "default_model.onnx")


def conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU())


class Residual(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = conv_bn(c, c)
        self.conv2 = nn.Sequential(nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.conv2(self.conv1(x)))


class SeparableSE(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.depthwise = conv_bn(cin, cin, 3, 2, groups=cin)
        self.se_reduce = nn.Conv2d(cin, cin // 4, 1)
        self.se_expand = nn.Conv2d(cin // 4, cin, 1)
        self.pointwise = conv_bn(cin, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.depthwise(x)
        s = torch.sigmoid(self.se_expand(torch.relu(self.se_reduce(x.mean((2, 3), keepdim=True)))))
        return self.pointwise(x * s)


class Inception(nn.Module):
    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch1 = conv_bn(cin, 16, 1)
        self.branch3 = conv_bn(cin, 24, 3)
        self.branch_pool = nn.Sequential(nn.MaxPool2d(3, 1, 1), conv_bn(cin, 8, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch1(x), self.branch3(x), self.branch_pool(x)], 1)


class DemoNet(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = conv_bn(3, 32, 3, 2)
        self.res = Residual(32)
        self.sep = SeparableSE(32, 48)
        self.inception = Inception(48)
        self.head_conv = conv_bn(24, 64, 1)
        self.classifier = nn.Linear(64 * 4 * 4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inception(self.sep(self.res(self.stem(x))))
        a, b = torch.split(x, [24, 24], dim=1)
        x = self.head_conv(a + b)
        x = nn.functional.adaptive_avg_pool2d(x, 4)
        return self.classifier(torch.flatten(x, 1))


def build() -> DemoNet:
    torch.manual_seed(SEED)
    model = DemoNet()
    gen = torch.Generator().manual_seed(SEED)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0.0, 0.1, generator=gen)
            m.running_var.uniform_(0.5, 1.5, generator=gen)
            m.weight.data.uniform_(0.5, 1.5, generator=gen)
            m.bias.data.normal_(0.0, 0.1, generator=gen)
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", default=DEFAULT_OUT)
    args = parser.parse_args()
    model = build()
    buf = io.BytesIO()
    # The TorchScript exporter keeps BatchNorm nodes and state_dict names when training mode is preserved off.
    torch.onnx.export(model, (torch.randn(*INPUT_SHAPE),), buf, dynamo=False, opset_version=17,
                      input_names=["image"], output_names=["logits"], do_constant_folding=False,
                      training=torch.onnx.TrainingMode.PRESERVE)
    data = buf.getvalue()
    with open(args.output, "wb") as f:
        f.write(data)
    provenance = {
        "model": "DemoNet",
        "builder": "tools/build_default_model.py",
        "weights": f"seeded random init (seed {SEED}), BatchNorm statistics randomized; not trained",
        "input": {"name": "image", "shape": list(INPUT_SHAPE)},
        "output": {"name": "logits", "shape": [1, 10]},
        "exporter": f"torch {torch.__version__} torch.onnx.export (TorchScript), opset 17",
        "parameters": sum(p.numel() for p in model.parameters()),
        "sha256": hashlib.sha256(data).hexdigest(),
    }
    with open(os.path.splitext(args.output)[0] + ".json", "w") as f:
        json.dump(provenance, f, indent=2)
        f.write("\n")
    print(json.dumps(provenance, indent=2))


if __name__ == "__main__":
    main()
