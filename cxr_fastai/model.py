"""ResNet9 in plain torch (no fastai import), after the DAWNBench CIFAR-10 ResNet9.

At 128 px one training image costs ~36 GFLOP (forward + backward). The network ends in a global max
pool, so it takes any input size from 16 px up (three stride-2 pools: 16 px -> 2x2 feature map).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

MIN_SIZE = 16  # px; below this the third pool would leave an empty feature map


def conv_bn(c_in: int, c_out: int, pool: bool = False) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, bias=False),  # bias is redundant before BN
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    ]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


class Residual(nn.Module):
    """x + two 3x3 conv-BN-ReLU layers at constant width."""

    def __init__(self, c: int):
        super().__init__()
        self.body = nn.Sequential(conv_bn(c, c), conv_bn(c, c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class ResNet9(nn.Module):
    def __init__(self, n_in: int = 1, n_out: int = 3, widths: Sequence[int] = (64, 128, 256, 512)):
        super().__init__()
        if len(widths) != 4 or any(int(w) < 1 for w in widths):
            raise ValueError(f"widths must be 4 positive ints, got {widths!r}")
        if n_in < 1 or n_out < 2:
            raise ValueError(f"need n_in >= 1 and n_out >= 2, got n_in={n_in}, n_out={n_out}")
        w0, w1, w2, w3 = (int(w) for w in widths)
        self.n_in, self.n_out, self.widths = n_in, n_out, (w0, w1, w2, w3)
        self.prep = conv_bn(n_in, w0)                                  # full resolution
        self.layer1 = nn.Sequential(conv_bn(w0, w1, pool=True), Residual(w1))  # 1/2
        self.layer2 = conv_bn(w1, w2, pool=True)                       # 1/4
        self.layer3 = nn.Sequential(conv_bn(w2, w3, pool=True), Residual(w3))  # 1/8
        self.head = nn.Linear(w3, n_out)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, n_in, H, W) -> (B, w3, H/8, W/8): the last feature map (Grad-CAM reads it)."""
        return self.layer3(self.layer2(self.layer1(self.prep(x))))

    @staticmethod
    def pool(feats: torch.Tensor) -> torch.Tensor:
        """(B, w3, h, w) -> (B, w3): global max pool, any input size."""
        return feats.amax((2, 3))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, n_in, H, W) -> (B, w3): the features the head reads."""
        return self.pool(self.forward_features(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))
