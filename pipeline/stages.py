"""The stages of a run, in order. The one place that knows every stage module.

Imported when a run is planned, not when `pipeline` is: the stage modules pull in torch.
"""

from __future__ import annotations

from pipeline.graph import Stage

__all__ = ["default_stages"]


def default_stages() -> list[Stage]:
    from pipeline.encode.stage import ENCODE
    from pipeline.finetune.stage import FINETUNE
    from pipeline.hessian.stage import HESSIAN
    from pipeline.models.stage import LOAD
    from pipeline.quantize.stage import QUANTIZE
    from pipeline.train.stage import PRUNE, TRAIN

    return [LOAD, TRAIN, PRUNE, HESSIAN, QUANTIZE, FINETUNE, ENCODE]
