"""`load(path)`: a transformers model that runs from a .hwq file's packed indices.

The model is built from the config in the `hf/` folder beside the file (or `hf_folder`) with
its parameters on the meta device; every 2-D quantized tensor that is the weight of an
`nn.Linear` becomes a :class:`LutLinear` and of an `nn.Embedding` a :class:`LutEmbedding`
(transcoded, never decoded dense); every other tensor (norms, biases, raw embeddings) is
decoded and put in as float32. A tied head runs from its quantized embedding's packed codes
(one copy), or is tied as transformers ties it, so the model computes what `hwq decode
--hf-out` and `from_pretrained` would, with lookup-table matmuls. Sibling LutLinears that read
the same input (q/k/v, gate/up) are computed by one kernel call (``modules.fuse``).
"""

from __future__ import annotations

import logging
import os
import tempfile
import time

import numpy as np
import torch
from torch import nn

from .modules import MODES, HalfEmbedding, LutEmbedding, LutLinear, fuse
from .transcode import NotServable, Packed, transcode

__all__ = ["load", "load_stats"]

log = logging.getLogger(__name__)


def _tokenizer_and_config(
    path: str, hf_folder: str | None, storage_options: dict | None, shapes: dict
):
    """(config, tokenizer, generation config or None) from the hf/ files, checked as an
    untrusted model folder is."""
    import transformers

    from pipeline.encode.cli import hf_files
    from pipeline.models.folder_checks import (
        building_from,
        check_config_against_weights,
        check_json_files,
        check_model_type,
    )

    files = hf_files(
        path,
        hf_folder,
        storage_options,
        option="the runtime",
        folder_option="the folder (hwq generate --hf-files, load(hf_folder=))",
    )
    with tempfile.TemporaryDirectory(prefix="hwq-runtime-") as tmp:
        for name, data in files.items():
            with open(os.path.join(tmp, name), "wb") as f:
                f.write(data)
        where = f"{hf_folder or 'the hf/ folder beside ' + path}/config.json"
        cfg = check_json_files(tmp)["config.json"]
        check_model_type(cfg, where)
        check_config_against_weights(cfg, shapes, where)
        with building_from(where):
            config = transformers.AutoConfig.from_pretrained(
                tmp, local_files_only=True, trust_remote_code=False
            )
            # A model without tokenizer files (a synthetic checkpoint) runs on token ids:
            # the tokenizer is None and generate/serve say they need one.
            tok = (
                transformers.AutoTokenizer.from_pretrained(
                    tmp, local_files_only=True, trust_remote_code=False
                )
                if set(files) & _TOKENIZER_FILES
                else None
            )
            gen = (
                transformers.GenerationConfig.from_pretrained(tmp)
                if "generation_config.json" in files
                else None
            )
    return config, tok, gen


_TOKENIZER_FILES = {"tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json"}


def _float32() -> dict:
    """from_config's dtype argument: `dtype` since transformers 4.56, `torch_dtype` before."""
    import transformers
    from packaging.version import Version

    new = Version(transformers.__version__) >= Version("4.56")
    return {"dtype" if new else "torch_dtype": torch.float32}


def _set_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    mod_name, _, attr = name.rpartition(".")
    mod = model.get_submodule(mod_name)
    if attr in mod._parameters:
        mod._parameters[attr] = nn.Parameter(value, requires_grad=False)
    elif attr in mod._buffers:
        mod._buffers[attr] = value
    else:
        raise ValueError(
            f"the model built from config.json has no tensor {name!r}; the "
            "config and the .hwq file do not belong together"
        )


def _dense(reader, name: str, *, keep_half: bool = False) -> torch.Tensor:
    """The tensor, float32 (or, keep_half, a 16-bit float tensor as stored)."""
    a = reader.read([name])[name]
    t = torch.from_numpy(np.ascontiguousarray(a).reshape(a.shape))
    if reader.dtype(name) == "bfloat16":
        t = t.view(torch.int16).view(torch.bfloat16)
    if keep_half and t.dtype in (torch.bfloat16, torch.float16):
        return t
    return t.to(torch.float32) if t.is_floating_point() else t


def load(
    path: str,
    *,
    mode: str = "fast",
    threads: int | None = None,
    storage_options: dict | None = None,
    hf_folder: str | None = None,
    fuse_siblings: bool = True,
    device: str | None = None,
    cache: bool | str | os.PathLike = True,
):
    """(model, tokenizer) running from the .hwq file `path` (local path or fsspec URL).

    mode: "fast" (int8 levels and activations in the kernels) or "reference" (fp32 levels and
    activations: the decoded model's logits up to float32 summation order). threads: kernel
    threads (None: torch's). hf_folder: where config.json and the tokenizer files are (default:
    the hf/ folder beside the file). fuse_siblings: compute q/k/v and gate/up (see
    ``modules.FUSE``) with one kernel call each (the same numbers, fewer calls). The model is
    in eval mode, float32 outside the LutLinears and LutEmbeddings; ``model.hwq_runtime``
    holds load statistics (see :func:`load_stats`). device: where the model runs (default
    the CPU); on a CUDA device the LutLinears multiply with the Triton kernel
    (`pipeline.runtime.triton_lut`) from their packed indices, moved there once. cache: keep
    the transcoded tensors on disk and map them on the next load of the same file instead of
    entropy-decoding it again (True: `$HWQ_CACHE/runtime-lut`; a folder; False: off; see
    `pipeline.runtime.lut_cache`).
    """
    from pipeline.encode.container import HwqReader

    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    target = _device(device)
    t0 = time.perf_counter()
    reader = HwqReader(path, storage_options=storage_options)
    shapes = {n: reader.shape(n) for n in reader.names}
    config, tok, gen = _tokenizer_and_config(path, hf_folder, storage_options, shapes)
    lut = _open_cache(reader, cache)
    try:
        model = _build(reader, config, gen, lut, shapes, mode, threads, fuse_siblings, path)
    except BaseException:
        if lut is not None:
            lut.abort()
        raise
    stats = model.hwq_runtime
    written = lut is not None and lut.commit()
    stats["cache"] = "hit" if lut is not None and lut.hit else "written" if written else "off"
    if stats["cache"] != "off":
        stats["cache_path"] = str(lut.path)
    if target is not None:
        model.to(target)
        stats["device"] = str(target)
    stats["seconds"] = time.perf_counter() - t0
    return model, tok


def _open_cache(reader, cache):
    """The LutCache of the file (None: off, or no usable folder: one log line)."""
    if cache is False or cache is None:
        return None
    from .lut_cache import LutCache

    try:
        return LutCache(reader, None if cache is True else cache)
    except OSError as exc:
        log.info("hwq runtime: no cache of transcoded tables (%s)", exc)
        return None


def _build(reader, config, gen, lut, shapes, mode, threads, fuse_siblings, path):
    """The model with LutLinears and LutEmbeddings in place (stats in model.hwq_runtime)."""
    import transformers

    from pipeline.models.folder_checks import building_from, params_on_meta

    with params_on_meta(), building_from(f"the config of {path}"):
        model = transformers.AutoModelForCausalLM.from_config(
            config, trust_remote_code=False, **_float32()
        )
    model.eval()
    if gen is not None:
        model.generation_config = gen
    # A folder written by an older hwq (or a GGUF's config) may say use_cache: false; without
    # a KV cache generate() recomputes the whole prefix at every token.
    model.config.use_cache = True
    model.generation_config.use_cache = True
    tied = bool(getattr(config, "tie_word_embeddings", False))
    head = model.get_output_embeddings()
    head_name = next((n for n, m in model.named_modules() if m is head), None)
    modules = dict(model.named_modules())
    stats = {"lut": 0, "dense": 0, "bits": {}, "packed_bytes": 0, "transcode_s": 0.0,
             "lut_embeddings": 0, "fused_groups": 0}  # fmt: skip
    emb_packed: Packed | None = None  # a quantized input embedding, for a tied head
    for name in reader.names:
        mod_name, _, attr = name.rpartition(".")
        if tied and head_name and mod_name == head_name:
            continue  # transformers ties the head to the embedding; so does the runtime
        mod = modules.get(mod_name)
        kind = type(mod) if attr == "weight" else None
        packed = None
        rot = reader.rotation(name) if reader.quantized(name) else None
        # a rotated embedding (its rows are looked up) is decoded dense
        if reader.quantized(name) and len(shapes[name]) == 2 and (
                kind is nn.Linear or (kind is nn.Embedding and rot is None)):
            packed = _packed(reader, name, stats, lut)
        if packed is None:
            t = _dense(reader, name, keep_half=kind is nn.Embedding and not tied)
            if t.dtype != torch.float32 and t.is_floating_point():
                # an untied raw embedding at its stored 16 bits (half the float32 bytes;
                # a lookup reads one row a token)
                _replace(model, mod_name, HalfEmbedding(t, mod.padding_idx))
            else:
                _set_tensor(model, name, t)
            stats["dense"] += 1
            continue
        want = (mod.out_features, mod.in_features) if kind is nn.Linear else tuple(mod.weight.shape)
        if (packed.rows, packed.cols) != want:
            raise ValueError(
                f"{name}: the file's {shapes[name]} does not match the config's "
                f"{kind.__name__} {list(want)}"
            )
        if kind is nn.Embedding:
            new = LutEmbedding(packed, padding_idx=mod.padding_idx)
            stats["lut_embeddings"] += 1
            if mod is model.get_input_embeddings():
                emb_packed = packed
        else:
            new = LutLinear(packed, mode=mode, threads=threads, rotate=rot)
            if mod.bias is not None:
                new.bias = nn.Parameter(
                    torch.empty(mod.out_features, device="meta"), requires_grad=False
                )
            stats["lut"] += 1
            stats["bits"][packed.bits] = stats["bits"].get(packed.bits, 0) + 1
        stats["packed_bytes"] += packed.nbytes
        _replace(model, mod_name, new)
        modules[mod_name] = new
    if tied:
        _tie(model, head_name, emb_packed, mode, threads, stats)
    stats["fused_groups"] = fuse(model) if fuse_siblings else 0
    missing = [
        n for n, p in [*model.named_parameters(), *model.named_buffers()] if p.device.type == "meta"
    ]
    if missing:
        raise ValueError(
            f"{path} holds no tensor for {', '.join(missing[:5])}"
            f"{', ...' if len(missing) > 5 else ''}; the config and the .hwq file "
            "do not belong together"
        )
    model.hwq_runtime = stats
    return model


def _device(device: str | None) -> torch.device | None:
    """The torch device to move the model to (None: stay on the CPU), checked before any
    work: a CUDA device needs CUDA here and Triton installed."""
    if device is None:
        return None
    try:
        d = torch.device(device)
    except (RuntimeError, ValueError) as e:
        raise ValueError(f"device {device!r} is not a torch device ({e})") from None
    if d.type == "cpu":
        return None
    if d.type != "cuda":
        raise ValueError(f"device {device!r}: the runtime runs on the CPU or a CUDA device")
    if not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: this torch has no CUDA device (the CPU needs no "
                         "--device)")
    from .triton_lut import available

    if not available():
        raise ValueError(f"device {device!r}: the GPU kernel needs Triton (pip install triton)")
    return d


def _packed(reader, name: str, stats: dict, lut) -> Packed | None:
    """The tensor's Packed (from the cache, or transcoded and added to the entry being
    written), or None (one log line) when it has too many levels a row."""
    t1 = time.perf_counter()
    if lut is not None and lut.not_servable(name):
        return None
    packed = lut.get(name) if lut is not None else None
    if packed is None:
        try:
            packed = transcode(reader, name)
        except NotServable as exc:
            log.info("hwq runtime: %s; decoding it dense", exc)
            packed = None
        if lut is not None:
            lut.put(name, packed)
    stats["transcode_s"] += time.perf_counter() - t1
    return packed


def _replace(model: nn.Module, mod_name: str, new: nn.Module) -> None:
    parent, _, child = mod_name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def _tie(model, head_name: str | None, emb_packed, mode: str, threads, stats: dict) -> None:
    """A tied head. If the embedding is quantized (a LutEmbedding), the head is a LutLinear
    over the same packed codes (one copy in memory; each token's logits read packed indices
    instead of a float32 matrix, the largest product of a small model with a large vocab).
    Otherwise transformers ties the dense tensors."""
    head = model.get_output_embeddings()
    if emb_packed is None or head_name is None or type(head) is not nn.Linear:
        model.tie_weights()
        return
    if head.bias is not None:
        raise ValueError(f"{head_name}: a tied head with a bias is not supported by the runtime")
    _replace(model, head_name, LutLinear(emb_packed, mode=mode, threads=threads))
    stats["lut"] += 1
    stats["bits"][emb_packed.bits] = stats["bits"].get(emb_packed.bits, 0) + 1


def load_stats(model: nn.Module) -> dict:
    """What :func:`load` did: LutLinears and their widths, tensors decoded dense, bytes of
    packed weights, seconds (all, and transcoding)."""
    return dict(getattr(model, "hwq_runtime", {}))
