"""Datasets, read from files that exist offline. Fashion-MNIST from its IDX files; text and
token windows for language models in `pipeline.data.text`."""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.data.text import (
    TextSourceError,
    calibration_windows,
    eval_windows,
    read_text,
    token_ids,
)

__all__ = ["Split", "load_split", "batches", "DatasetMissing", "dataset_files", "calibration_indices",
           "TextSourceError", "read_text", "token_ids", "calibration_windows", "eval_windows"]

_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# Fashion-MNIST training-set pixel statistics (of x/255).
_MEAN, _STD = 0.2860, 0.3530


class DatasetMissing(FileNotFoundError):
    pass


@dataclass
class Split:
    x: torch.Tensor  # [N, 1, 28, 28] float32, normalised
    y: torch.Tensor  # [N] int64

    def __len__(self) -> int:
        return len(self.y)


def _find(root: str, stem: str) -> str:
    for name in (stem + ".gz", stem):
        p = os.path.join(root, name)
        if os.path.isfile(p):
            return p
    raise DatasetMissing(
        f"Fashion-MNIST file {stem}[.gz] not found in {root!r}. Install the Debian package "
        "`dataset-fashion-mnist` (apt-get install dataset-fashion-mnist; `make setup` does it) "
        "or point the config key data.root at a folder holding the IDX files."
    )


def dataset_files(root: str) -> list[str]:
    """The paths of the four IDX files under `root`; DatasetMissing naming the first absent."""
    return [_find(root, stem) for pair in _FILES.values() for stem in pair]


def _read_idx(path: str) -> np.ndarray:
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise ValueError(f"{path}: unreadable IDX file ({e}); reinstall the dataset") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    ndim = data[3]
    dims = np.frombuffer(data, ">u4", count=ndim, offset=4).astype(np.int64)
    n = int(np.prod(dims))
    off = 4 + 4 * ndim
    if len(data) - off != n:
        raise ValueError(f"{path}: truncated IDX file ({len(data) - off} of {n} bytes)")
    return np.frombuffer(data, np.uint8, offset=off).reshape(dims)


def load_split(root: str, split: str, limit: int | None = None, seed: int = 0) -> Split:
    """Fashion-MNIST `split` ("train" | "test") as normalised tensors.

    limit: keep a seeded random subset of this many samples (None = all)."""
    img_stem, lbl_stem = _FILES[split]
    x = _read_idx(_find(root, img_stem))
    y = _read_idx(_find(root, lbl_stem))
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"{root}: {split} images and labels differ in count")
    xt = torch.from_numpy(x.astype(np.float32) / 255.0).sub_(_MEAN).div_(_STD).unsqueeze(1)
    yt = torch.from_numpy(y.astype(np.int64))
    if limit is not None and limit < len(yt):
        keep = torch.randperm(len(yt), generator=torch.Generator().manual_seed(seed))[:limit]
        xt, yt = xt[keep], yt[keep]
    return Split(xt.contiguous(), yt)


def batches(split: Split, batch_size: int, *, shuffle: bool = False, seed: int = 0,
            indices: torch.Tensor | None = None):
    """Yield (x, y) mini-batches; in-memory slicing, no DataLoader worker processes."""
    idx = indices if indices is not None else torch.arange(len(split))
    if shuffle:
        g = torch.Generator().manual_seed(seed)
        idx = idx[torch.randperm(len(idx), generator=g)]
    for i in range(0, len(idx), batch_size):
        b = idx[i : i + batch_size]
        yield split.x[b], split.y[b]


def calibration_indices(cfg, n_train: int) -> torch.Tensor:
    """The Hessian's calibration images: a seeded draw of hessian.calibration_samples of the
    n_train training images (not the training subset's draw); the Hessian stage and the OBD
    pruning steps use the same."""
    n = min(cfg.hessian.calibration_samples, n_train)
    g = torch.Generator().manual_seed(cfg.seed + 7919)
    return torch.randperm(n_train, generator=g)[:n]
