"""The Caffe LeNet-5 of the paper's MNIST experiments (431,080 parameters)."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["LeNet5"]


class LeNet5(nn.Module):
    """conv 20@5×5 → pool → conv 50@5×5 → pool → fc 800→500 → ReLU → fc 500→10.

    Input [B, 1, 28, 28] float32; output logits [B, 10]. Like Caffe's LeNet, the only
    non-linearity is the ReLU after fc1 (max pooling does the rest).
    """

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 20, 5)
        self.conv2 = nn.Conv2d(20, 50, 5)
        self.fc1 = nn.Linear(800, 500)
        self.fc2 = nn.Linear(500, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.max_pool2d(self.conv1(x), 2)
        x = nn.functional.max_pool2d(self.conv2(x), 2)
        x = torch.relu(self.fc1(x.flatten(1)))
        return self.fc2(x)
