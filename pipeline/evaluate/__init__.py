"""Test accuracy of a model state: the one measurement every stage reports (LeNet); perplexity
and the metric registry for language models in `perplexity` and `metrics`."""

from __future__ import annotations

import torch
from torch import nn

from pipeline.data import Split, batches
from pipeline.evaluate.metrics import METRICS, Metric, get_metric, is_better, metric_key
from pipeline.evaluate.perplexity import perplexity

__all__ = ["accuracy", "accuracy_of_state", "perplexity", "METRICS", "Metric", "get_metric",
           "is_better", "metric_key"]


@torch.no_grad()
def accuracy(model: nn.Module, split: Split, batch_size: int = 1000) -> float:
    """Top-1 accuracy in [0, 1] of `model` on `split` (eval mode, no gradients)."""
    was_training = model.training
    device = next(model.parameters()).device
    model.eval()
    correct = 0
    for x, y in batches(split, batch_size):
        correct += int((model(x.to(device)).argmax(1) == y.to(device)).sum())
    model.train(was_training)
    return correct / max(len(split), 1)


def accuracy_of_state(model_name: str, state: dict[str, torch.Tensor], split: Split) -> float:
    """Accuracy of the registry model `model_name` loaded with `state` (strict)."""
    from pipeline.models import build

    model = build(model_name)
    model.load_state_dict(state, strict=True)
    return accuracy(model, split)
