"""Fine-tuning the shared values of a quantized model (paper: only the cluster centres train).

`transform` is plain torch (the module whose weights are codebook look-ups); `stage` is the
`finetune` pipeline stage (Ray Train workers, a DeepSpeed engine each); `checkpoint` saves and
verifies its resume points in the store (loaded weights-only: nothing from the store runs).
Importing this package imports torch, not Ray or DeepSpeed.
"""

from pipeline.finetune.transform import QuantizedTrainable, member_counts

__all__ = ["QuantizedTrainable", "member_counts"]
