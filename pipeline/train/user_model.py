"""Pruning a model of your own (model.name=factory): what the prune task needs from its load
stage and its data.

The model is rebuilt from the load stage (`Workload.model_from`), retrained on the data's
"train" split — Fashion-MNIST's training images for data.name=fashion_mnist, or
``data.factory("train")`` for data.name=custom (a list of ``(inputs, labels)`` batches, which
are concatenated: a retraining epoch reshuffles them) — with cross-entropy, as LeNet-5 is, and
scored with the run's metric on its eval sets. The load stage's model.json is copied into the
prune folder so that the stages after it (which read a model stage's model.json: the tensors
to quantize, their shapes) read the pruned model as they read a load stage.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from pipeline.errors import UserError

__all__ = ["prune_inputs", "train_split"]


class PruneDataError(UserError, ValueError):
    """The data of a model of your own cannot be retrained on."""


def train_split(cfg, load):
    """The "train" split of a model of your own as a `Split` (x, y tensors)."""
    from pipeline.data import Split, load_split
    from pipeline.workload import Workload

    d = cfg.data
    if d.name == "fashion_mnist":
        return load_split(d.root, "train", d.train_samples, cfg.seed)
    if d.name != "custom":
        raise PruneDataError(f"prune: data.name={d.name} has no training split to retrain on")
    try:
        batches = Workload(cfg)._custom("train")
    except UserError as e:
        raise PruneDataError(f"prune retrains on the data's \"train\" split: {e} (make "
                             f"data.factory {d.factory!r} return batches for \"train\", or set "
                             "prune.enabled=false)") from None
    xs, ys = [], []
    for i, b in enumerate(batches):
        if not (isinstance(b, tuple | list) and len(b) == 2 and all(
                isinstance(t, torch.Tensor) for t in b) and b[1].dtype == torch.int64
                and len(b[0]) == len(b[1])):
            raise PruneDataError(
                f"prune: data.factory {d.factory!r} \"train\" batch {i} is not a pair "
                "(inputs, int64 labels) of equal length: retraining uses cross-entropy")
        xs.append(b[0].float())
        ys.append(b[1])
    x, y = torch.cat(xs), torch.cat(ys)
    if d.train_samples is not None and d.train_samples < len(y):
        g = torch.Generator().manual_seed(cfg.seed)
        idx = torch.randperm(len(y), generator=g)[: d.train_samples]
        x, y = x[idx], y[idx]
    return Split(x=x, y=y)


def prune_inputs(cfg, load, out) -> tuple[nn.Module, Any, Callable[[nn.Module], dict]]:
    """(the model with its loaded weights, its "train" split, a scorer `model -> report
    fields`) for pruning a model of your own; copies model.json into the prune folder `out`."""
    from pipeline.workload import MODEL_JSON, Workload

    wl = Workload(cfg)
    model = wl.model_from(load)  # (prune.keep's names: checked by the driver before the run)
    out.write_bytes(MODEL_JSON, load.read_bytes(MODEL_JSON))
    train = train_split(cfg, load)

    def score(m: nn.Module) -> dict:
        m.eval()
        return wl.metric_fields("pruned", wl.evaluate(m, load))

    return model, train, score
