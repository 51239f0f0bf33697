"""The codes of a per-tensor run, tensor by tensor: indices from the quantize stage, codebooks
from it or, for the tensors a block-wise fine-tune trained, from the finetune stage.

The quantize stage writes ``codes/<i>-<λ tag>.safetensors`` per tensor (frequency-ranked
indices uint8/int16 [R, C], per-row codebooks float32 [R, K] and, for a tensor one-shot
pruning cut, its mask uint8 [R, C], 1 = kept) listed in ``codes.json`` (with the rotation
seed of each tensor `quantize.rotate` quantized in a rotated basis: its weights are
``rotation.inverse(codebook[index], seed)`` row by row);
the block-wise fine-tune writes ``codebooks/b<b>.safetensors`` per decoder block (the trained
codebooks of the block's tensors, same shapes) listed in its ``codebooks.json``. Every file is
read through its stage folder, so its sha256 is checked against the stage's manifest.
"""

from __future__ import annotations

import re

import numpy as np

__all__ = ["ModelCodes", "TensorCodes", "read_tuned", "tuned_codebooks"]

_TUNED_FILE = re.compile(r"codebooks/b[0-9]{5}\.safetensors")


def read_tuned(sd, rel: str, names: list[str], shapes: dict[str, tuple[int, int]]
               ) -> dict[str, np.ndarray]:
    """The codebooks float32 [R, K] of `names` in one block file of a finetune stage folder
    `sd` (checked: exactly those tensors, their row counts, finite)."""
    from safetensors.numpy import load

    data = sd.read_bytes(rel)
    try:
        t = load(data)
    except Exception as e:  # noqa: BLE001 - safetensors raises its own types on bad input
        raise sd._corrupt(rel, f"not a codebooks file ({type(e).__name__})") from None
    if set(t) != set(names) or any(
            t[n].dtype != np.float32 or t[n].ndim != 2 or t[n].shape[0] != shapes[n][0]
            or not 1 <= t[n].shape[1] <= 1 << 15 or not np.isfinite(t[n]).all()
            for n in names):
        raise sd._corrupt(rel, "not the codebooks of the block's tensors")
    return t


class TensorCodes:
    """(indices, codebooks) of each quantized tensor of a per-tensor run.

    quant: the quantize stage folder; finetune: the finetune stage folder of a block-wise
    fine-tune, or None (the quantize stage's codebooks)."""

    def __init__(self, quant, finetune=None) -> None:
        q = quant.read_json("codes.json")
        self.quant = quant
        self.codes: dict[str, str] = q["codes"]
        self.shapes = {n: tuple(s) for n, s in q["shapes"].items()}
        rot = q.get("rotations", {})
        if not isinstance(rot, dict) or not all(
                n in self.codes and type(s) is int and 0 <= s < 1 << 31 for n, s in rot.items()):
            raise quant._corrupt("codes.json", "its rotations are not seeds of its tensors")
        self.rotations: dict[str, int] = rot
        self.finetune = finetune
        self.tuned: dict[str, str] = {}
        if finetune is not None:
            files = finetune.read_json("codebooks.json").get("codebooks")
            if not isinstance(files, dict) or not all(
                    n in self.codes and isinstance(r, str) and _TUNED_FILE.fullmatch(r)
                    for n, r in files.items()):
                raise finetune._corrupt("codebooks.json", "not a map of quantized tensors to "
                                        "block codebook files")
            self.tuned = files
        self._last: tuple[str, dict[str, np.ndarray]] | None = None

    def _tuned(self, name: str) -> np.ndarray:
        rel = self.tuned[name]
        if self._last is None or self._last[0] != rel:
            names = sorted(n for n, r in self.tuned.items() if r == rel)
            self._last = (rel, read_tuned(self.finetune, rel, names, self.shapes))
        return self._last[1][name]

    def read(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(indices uint8/int16 [R, C], codebooks float32 [R, K]) of tensor `name`."""
        idx, cb, _ = self.read_masked(name)
        return idx, cb

    def read_masked(self, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """`read` and the tensor's one-shot pruning mask (bool [R, C], True = kept; None
        when it is not pruned). The weights are ``where(mask, codebook[index], 0)``."""
        from pipeline.quantize.tensors_stage import read_codes_masked

        idx, cb, mask = read_codes_masked(self.quant, self.codes[name], self.shapes[name])
        if name in self.tuned:
            t = self._tuned(name)
            if t.shape != cb.shape:
                raise self.finetune._corrupt(self.tuned[name], f"its codebooks of {name} are "
                                             f"{list(t.shape)}, not {list(cb.shape)}")
            cb = t
        return idx, cb, mask

    def rotation(self, name: str) -> int | None:
        """The seed of the tensor's input-side rotation (`quantize.rotate`), None when its
        codes are of the weights themselves."""
        return self.rotations.get(name)


class ModelCodes:
    """The interface of :class:`TensorCodes` over a whole-model quantize stage's artifact
    (`QuantizedModel`: per-row codebooks of a causal LM), for the block-wise phase of
    ``finetune.mode: both``. Picklable (it holds the stage folder); the artifact is read once
    per process, when a tensor is first asked for."""

    def __init__(self, quant, load) -> None:
        """quant: the quantize stage folder; load: the load stage's (its model.json gives
        the tensors' shapes)."""
        import math

        meta = quant.read_json("quantized.json")
        if meta.get("scope") != "channel":
            raise ValueError("block-wise fine-tuning trains per-row codebooks "
                             f"(quantize.scope=channel), not {meta.get('scope')!r} ones")
        self.quant = quant
        self.codes: dict[str, str] = {str(n): str(n) for n in meta["tensors"]}
        shapes = load.read_json("model.json")["shapes"]
        self.shapes: dict[str, tuple[int, int]] = {
            n: (int(shapes[n][0]), math.prod(int(x) for x in shapes[n][1:])) for n in self.codes}
        self._qm = None

    def __getstate__(self):
        return {"quant": self.quant, "codes": self.codes, "shapes": self.shapes, "_qm": None}

    def _model(self):
        if self._qm is None:
            from pipeline.quantize.artifacts import QuantizedModel

            self._qm = QuantizedModel.read(self.quant)
        return self._qm

    def read_masked(self, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        qm = self._model()
        idx = qm.indices[name]
        R = idx.shape[0]
        i = idx.reshape(R, -1).numpy()
        if i.dtype != np.uint8:
            i = i.astype(np.int16 if int(i.max(initial=0)) < 1 << 15 else np.int32)
        m = qm.masks.get(name)
        return (i, qm.codebooks[qm.assignment[name]].float().numpy(),
                None if m is None else m.reshape(R, -1).numpy())

    def read(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        idx, cb, _ = self.read_masked(name)
        return idx, cb

    def rotation(self, name: str) -> int | None:  # the whole-model branch never rotates
        return None


def tuned_codebooks(finetune, shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """{tensor: float32 [R, K]} of every tensor a block-wise fine-tune (its stage folder,
    `codebooks.json` and the block files) trained."""
    files = finetune.read_json("codebooks.json").get("codebooks")
    if not isinstance(files, dict) or not all(
            n in shapes and isinstance(r, str) and _TUNED_FILE.fullmatch(r)
            for n, r in files.items()):
        raise finetune._corrupt("codebooks.json", "not a map of quantized tensors to block "
                                "codebook files")
    out: dict[str, np.ndarray] = {}
    for rel in sorted(set(files.values())):
        names = sorted(n for n, r in files.items() if r == rel)
        out.update(read_tuned(finetune, rel, names, {n: shapes[n] for n in names}))
    return out
