"""Test models: the torchvision list of the Foundation issue, with non-degenerate random weights."""

from __future__ import annotations

import torch
from torch import nn

# (name, input size, big?) — `big` ones run only with --run-big (CI).
TORCHVISION = [
    ("resnet18", 224, False),
    ("resnet50", 224, True),
    ("resnext50_32x4d", 224, True),
    ("wide_resnet50_2", 224, True),
    ("mobilenet_v2", 224, False),
    ("mobilenet_v3_large", 224, True),
    ("mobilenet_v3_small", 224, False),
    ("efficientnet_b0", 224, False),
    ("efficientnet_v2_s", 224, True),
    ("densenet121", 224, True),
    ("googlenet", 224, False),
    ("inception_v3", 299, True),
    ("regnet_x_400mf", 224, False),
    ("regnet_y_400mf", 224, False),
    ("convnext_tiny", 224, True),
    ("vit_b_16", 224, True),
    ("swin_t", 224, False),
    ("swin_v2_t", 224, True),
    ("maxvit_t", 224, True),
    ("shufflenet_v2_x1_0", 224, False),
    ("squeezenet1_0", 224, False),
    ("mnasnet1_0", 224, False),
    ("alexnet", 224, True),
    ("vgg11_bn", 224, True),
]


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Make random-init weights non-degenerate: BN statistics/affine randomized, all-zero tensors filled.

    torchvision zero-initializes some layers (ViT's head, some BN gammas), which would make every output
    identical and any oracle vacuous.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.normal_(0.0, 0.1, generator=gen)
                m.running_var.uniform_(0.5, 1.5, generator=gen)
                if m.affine:
                    m.weight.uniform_(0.5, 1.5, generator=gen)
                    m.bias.normal_(0.0, 0.1, generator=gen)
        for p in model.parameters():
            if p.numel() and p.abs().max() == 0:
                p.normal_(0.0, 0.02, generator=gen)
    return model.eval()


def torchvision_model(name: str, seed: int = 0) -> nn.Module:
    import torchvision

    torch.manual_seed(seed)
    kwargs = {"aux_logits": False, "init_weights": True} if name in ("googlenet", "inception_v3") else {}
    return randomize(getattr(torchvision.models, name)(weights=None, **kwargs), seed)


class CRNN(nn.Module):
    """A text-line recognizer's shape (PP-OCR's and EasyOCR's CRNN): five conv+BN+ReLU layers fold a 32-pixel-high
    line of 800 into 100 frames of 256, two bidirectional recurrent layers (`cell`: LSTM or GRU) of 256 read them,
    a classifier scores 97 symbols per frame. Output [100, 1, 97]."""

    def __init__(self, cell: str = "LSTM") -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for cin, cout, stride in ((3, 32, 2), (32, 64, 2), (64, 128, (2, 1)), (128, 128, 2), (128, 256, (2, 1))):
            layers += [nn.Conv2d(cin, cout, 3, stride, 1), nn.BatchNorm2d(cout), nn.ReLU()]
        self.conv = nn.Sequential(*layers)
        self.rnn = getattr(nn, cell)(256, 256, num_layers=2, bidirectional=True)
        self.fc = nn.Linear(512, 97)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        frames = self.conv(x).squeeze(2).permute(2, 0, 1)  # [1, 256, 1, 100] -> [100, 1, 256]
        y, _ = self.rnn(frames)
        return self.fc(y)


# models the benchmarks take by name besides torchvision's: (builder, input shape)
BENCH_MODELS = {
    "crnn": (lambda: CRNN("LSTM"), [1, 3, 32, 800]),
    "crnn_gru": (lambda: CRNN("GRU"), [1, 3, 32, 800]),
}


def bench_model(name: str, seed: int = 0) -> tuple[nn.Module, dict[str, list[int]]]:
    """(module with seeded random weights, {"x": input shape}) for a torchvision name or one of BENCH_MODELS."""
    if name not in BENCH_MODELS:
        return torchvision_model(name, seed), {"x": [1, 3, 224, 224]}
    build, shape = BENCH_MODELS[name]
    torch.manual_seed(seed)
    return randomize(build(), seed), {"x": shape}


def example_input(size: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(seed))
