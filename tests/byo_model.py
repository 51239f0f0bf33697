"""A bring-your-own model for the tests: imported by hwq through `model.factory`."""

from torch import nn


def small_mlp(hidden: int = 32) -> nn.Module:
    import torch

    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(784, hidden), nn.ReLU(), nn.Linear(hidden, 10))
