"""Everything read from the store is untrusted: a file planted there — even with a manifest
that matches it, as anyone who can write to the bucket can make — never runs code, and is
refused with an error that names it."""

import os
import pickle
import re
from pathlib import Path

import pytest
import torch

from pipeline.errors import UserError
from pipeline.store import StageDir, Store

ROOT = Path(__file__).resolve().parents[1]


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _payloads(marker: Path, tmp_path: Path) -> dict[str, bytes]:
    """The same code-running object as a raw pickle and as a torch.save zip file."""
    zipped = tmp_path / "p.pt"
    torch.save({"state": _Payload(marker)}, zipped)
    return {"pickle": pickle.dumps(_Payload(marker), protocol=2), "torch-zip": zipped.read_bytes()}


def _plant(store: Store, stage: str, files: dict[str, bytes]) -> StageDir:
    """A stage folder holding `files`, with outputs digests that match them (as a forger's
    manifest would)."""
    sd = StageDir(store, stage, "f0")
    for name, data in files.items():
        sd.write_bytes(name, data)
    sd.outputs = sd.hash_outputs()
    return sd


def _readers():
    from pipeline.encode.container import read_hwq
    from pipeline.hessian.stage import read_hessian
    from pipeline.models import build, load_checkpoint
    from pipeline.quantize.artifacts import QuantizedModel
    from pipeline.train.stage import load_adam, load_masks, load_model_state

    shapes = {"fc2.bias": (10,)}
    return {
        "model.safetensors": ("train", lambda sd: load_model_state(sd)),
        "masks.safetensors": ("prune", lambda sd: load_masks(sd)),
        "adam.safetensors": ("train", lambda sd: load_adam(sd)),
        "hessian.parquet": ("hessian", lambda sd: read_hessian(sd, shapes)),
        "hessian.parquet:filtered": ("hessian",
                                     lambda sd: read_hessian(sd, shapes, names=["fc2.bias"])),
        "codebooks.safetensors": ("quantize", lambda sd: QuantizedModel.read(sd)),
        "indices.safetensors": ("quantize", lambda sd: QuantizedModel.read(sd)),
        "quantized.json": ("quantize", lambda sd: QuantizedModel.read(sd)),
        "model.hwq": ("encode", lambda sd: read_hwq(sd.url("model.hwq"))),
        "checkpoint": ("user", lambda sd: load_checkpoint(sd.url("checkpoint"), build("lenet5"))),
    }


TARGETS = ["model.safetensors", "masks.safetensors", "adam.safetensors", "hessian.parquet",
           "hessian.parquet:filtered", "codebooks.safetensors", "indices.safetensors",
           "quantized.json", "model.hwq", "checkpoint"]


def test_every_reader_is_covered():
    assert sorted(TARGETS) == sorted(_readers())


@pytest.mark.parametrize("kind", ["pickle", "torch-zip"])
@pytest.mark.parametrize("target", TARGETS)
def test_planted_pickle_runs_nothing_and_is_refused(tmp_path, target, kind):
    marker = tmp_path / "pwned"
    payload = _payloads(marker, tmp_path)[kind]
    stage, read = _readers()[target]
    name = target.split(":")[0]
    # The other files of the folder are valid-looking JSON, so the planted one is the one read.
    files = {name: payload}
    if name in ("codebooks.safetensors", "indices.safetensors"):
        files["quantized.json"] = b'{"scope": "network", "method": "uniform", "tensors": {}}'
    store = Store(str(tmp_path / "store"))
    sd = _plant(store, stage, files)
    with pytest.raises((UserError, ValueError)) as err:
        read(sd)
    assert not marker.exists(), "a planted file ran code"
    assert name in str(err.value) or "safetensors" in str(err.value) or "hwq" in str(err.value)


_CALLS = re.compile(r"\b(torch\.(?:serialization\.)?load|np\.load|numpy\.load)\(")
_UNPICKLERS = re.compile(r"\b(c?pickle|cloudpickle|dill|joblib)\.(loads?|Unpickler)\b")


def _call_args(src: str, open_paren: int) -> str:
    """The text between a call's parentheses (comments stripped; strings are not special,
    which is fine for this code base)."""
    depth, i = 0, open_paren
    while i < len(src):
        depth += {"(": 1, ")": -1}.get(src[i], 0)
        if depth == 0:
            return src[open_paren + 1 : i]
        i += 1
    return src[open_paren + 1 :]


def _unsafe(src: str) -> list[tuple[int, str]]:
    code = "\n".join(line.split("#", 1)[0] for line in src.splitlines())
    found = []
    for m in _CALLS.finditer(code):
        args = _call_args(code, m.end() - 1)
        line = code.count("\n", 0, m.start()) + 1
        if m.group(1).endswith("np.load") or m.group(1) == "numpy.load":
            if re.search(r"allow_pickle\s*=\s*True", args):
                found.append((line, "np.load(allow_pickle=True)"))
        elif not re.search(r"weights_only\s*=\s*True", args):
            found.append((line, f"{m.group(1)} without weights_only=True"))
    for m in _UNPICKLERS.finditer(code):
        found.append((code.count("\n", 0, m.start()) + 1, "unpickling"))
    return found


def test_the_scan_finds_what_it_looks_for():
    assert _unsafe("x = torch.load(f,\n  map_location='cpu')")
    assert _unsafe("torch.serialization.load(f, weights_only=False)")
    assert _unsafe("pickle.loads(b)") and _unsafe("np.load(p, allow_pickle=True)")
    assert not _unsafe("torch.serialization.load(io.BytesIO(d),\n  weights_only=True)")
    assert not _unsafe("# torch.load(f)")


def test_no_code_path_unpickles():
    """A static guard beside the planted files: none of hwq's own code unpickles anything
    (DeepSpeed's checkpoint loading is routed through weights_only=True, see finetune)."""
    bad = []
    for folder in ("pipeline", "jobs"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for line, what in _unsafe(path.read_text()):
                bad.append(f"{path.relative_to(ROOT)}:{line}: {what}")
    assert not bad, "\n".join(bad)
