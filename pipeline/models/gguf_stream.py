"""A GGUF model in the streamed residency: converted one tensor at a time into the load
stage's own folder, which the later stages then read like any safetensors folder.

`convert_gguf` writes ``weights/`` inside the load stage's folder: ``config.json``,
``generation_config.json``, the tokenizer files (text runs) and the float32 weights as sharded
safetensors with an index (`ShardedWriter`: per-tensor sha256 digests, the index written last).
The values and names are what the resident adapter's transformers load gives, bit for bit,
because the same pieces of transformers' legacy GGUF loader make them: its GGUF → HF name map
(`get_gguf_hf_weights_map` on a meta-device model built from the GGUF's config), its
architecture's `TensorProcessor` (Llama's reverse permutation of q/k rows, Gemma's norm offsets,
...) and `gguf.quants.dequantize`, then float32. A tied head is stored once, under the
embedding's name, as the resident `unique_state` stores it.

Memory: the GGUF is memory-mapped; one tensor is dequantized, processed and written at a time.
Disk: the folder takes 4 bytes per parameter (a Q4 GGUF of N bytes becomes about 7 N).

Not converted (refused with one line): architectures transformers loads through its newer
converter chain (`integrations/gguf`: qwen35, lfm2, ...) and those whose processor builds one
weight from several GGUF tensors (MoE experts, GPT-2's head): run those resident.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from pipeline.config import RunConfig

__all__ = ["WEIGHTS_DIR", "gguf_path", "gguf_identity", "gguf_float32_bytes", "convert_gguf"]

WEIGHTS_DIR = "weights"


def gguf_path(cfg: RunConfig) -> str | None:
    """The model's GGUF (path or URL, `{package:…}` expanded) when it is one, else None."""
    m = cfg.model
    if m.name != "hf_causal_lm" or not m.path:
        return None
    from pipeline.workload import expand_path

    path = expand_path(m.path)
    if m.gguf_file:
        return f"{path.rstrip('/')}/{m.gguf_file}"
    return path if path.lower().endswith(".gguf") else None


def _local(path: str) -> str | None:
    if "://" in path and not path.startswith("file://"):
        return None
    return os.path.expanduser(path.removeprefix("file://"))


def gguf_float32_bytes(path: str) -> int | None:
    """Bytes of the GGUF's tensors dequantized to float32 (4 × the elements its header
    lists; the header is checked first); None for a remote file."""
    local = _local(path)
    if local is None:
        return None
    from pipeline.models.gguf_check import check_gguf

    return 4 * int(check_gguf(local)["numel"])


def gguf_identity(cfg: RunConfig) -> dict[str, Any]:
    """What keys a streamed GGUF without reading its tensor data: a local file's size,
    modification time and the sha256 of its header (metadata and tensor table); a remote
    one's size and ETag."""
    path = gguf_path(cfg)
    assert path is not None
    local = _local(path)
    if local is None:
        from fsspec.core import url_to_fs

        fs, p = url_to_fs(path, **(cfg.store.storage_options(path) or {}))
        try:
            info = fs.info(p)
        except FileNotFoundError:
            from pipeline.models.hf_causal import ModelSourceError

            raise ModelSourceError(f"model.path {path!r} does not exist") from None
        ident = {
            "size": info.get("size"),
            "version": next(
                (str(info[k]) for k in ("ETag", "etag", "LastModified", "mtime") if info.get(k)), ""
            ),
        }
    else:
        from pipeline.models.gguf_check import check_gguf

        summary = check_gguf(local)
        h = hashlib.sha256()
        with open(local, "rb") as f:
            left = int(summary["data_start"])
            while left > 0:
                chunk = f.read(min(left, 1 << 20))
                if not chunk:
                    break
                h.update(chunk)
                left -= len(chunk)
            st = os.fstat(f.fileno())
        ident = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "header": h.hexdigest()}
    blob = json.dumps({"gguf": ident}, sort_keys=True).encode()
    return {"url": path, "identity": hashlib.sha256(blob).hexdigest()}


# Rows dequantized at once: gguf's numpy dequantizers take several times their output in
# temporaries, so a whole 2 GB embedding would cost ~10 GB; a block never spans rows.
_CHUNK_BYTES = 32 << 20


def _dequantize_rows(data: Any, qtype: Any) -> Any:
    """`gguf.quants.dequantize(data, qtype)` (float32, [rows, cols] in torch order), computed
    a few MiB of rows at a time into one array: the same values, element for element."""
    import numpy as np
    from gguf.quants import dequantize

    if data.ndim < 2 or data.shape[0] < 2:
        return dequantize(data, qtype)
    first = dequantize(data[:1], qtype)
    per_row = max(1, first.nbytes)
    step = max(1, _CHUNK_BYTES // per_row)
    if step >= data.shape[0]:
        return dequantize(data, qtype)
    out = np.empty((data.shape[0], *first.shape[1:]), dtype=first.dtype)
    for i in range(0, data.shape[0], step):
        out[i : i + step] = dequantize(data[i : i + step], qtype)
    return out


def _refuse(where: str, why: str) -> Exception:
    from pipeline.models.hf_causal import ModelSourceError

    return ModelSourceError(
        f"{where}: {why}; model.residency=streamed converts a GGUF one "
        "tensor at a time, so run this one with model.residency=resident"
    )


def convert_gguf(cfg: RunConfig, out: Any, *, tokenizer: bool) -> tuple[str, dict | None]:
    """Write the model's GGUF into ``out/weights/`` (see the module docstring); returns the
    folder's (URL, fsspec options). `out` is the load stage's StageDir; `tokenizer`: also
    write the tokenizer files (from files beside the GGUF, else from the GGUF)."""
    import numpy as np
    import torch
    from gguf import GGUFReader
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.integrations.gguf import is_gguf_arch_supported
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        TensorProcessor,
        get_gguf_hf_weights_map,
        load_gguf_checkpoint,
        read_field,
    )

    from pipeline.models.folder_checks import params_on_meta
    from pipeline.models.hf_causal import ModelSourceError, _dtype_kw, save_folder_files
    from pipeline.models.weights import ShardedWriter
    from pipeline.workload import Workload

    adapter = Workload(cfg).adapter
    folder, name = adapter.resolve()  # a remote file is fetched; check_gguf runs first
    path = str(Path(folder) / name)
    where = f"model.path {adapter.label()!r}"
    try:
        parsed = load_gguf_checkpoint(path, return_tensors=False)
        conf = AutoConfig.from_pretrained(
            str(folder), gguf_file=name, local_files_only=True, trust_remote_code=False
        )
        with params_on_meta():
            model = AutoModelForCausalLM.from_config(
                conf, trust_remote_code=False, **{_dtype_kw(): torch.float32}
            )
        reader = GGUFReader(path)
        arch = read_field(reader, "general.architecture")[0]
    except (ModelSourceError, MemoryError):
        raise
    except Exception as e:  # noqa: BLE001 - untrusted file: any failure is its fault
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise ModelSourceError(f"{where}: transformers cannot read it ({first})") from e
    if is_gguf_arch_supported(arch):
        raise _refuse(
            where,
            f"transformers loads GGUF architecture {arch!r} through its "
            "converter chain, which hwq does not replay tensor by tensor",
        )
    processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=parsed["config"])
    mapping = get_gguf_hf_weights_map(model, processor)
    model.config.use_cache = False

    # Every storage once, in the model's own order: a tied head is an alias of the embedding.
    state = model.state_dict(keep_vars=True)
    canonical: dict[int, str] = {}
    aliases: set[str] = set()
    for n, t in state.items():
        if id(t) in canonical:
            aliases.add(n)
        else:
            canonical[id(t)] = n
    source: dict[str, Any] = {}
    for t in reader.tensors:
        hf = mapping.get(t.name)
        if hf is None or hf in aliases:
            continue  # transformers drops what the model has no place for
        if hf in source:
            raise _refuse(where, f"two GGUF tensors ({source[hf].name}, {t.name}) map to {hf}")
        source[hf] = t
    order = [n for n in state if n not in aliases]
    missing = [n for n in order if n not in source]
    if missing:
        raise _refuse(
            where,
            f"it holds no tensor for {missing[0]} ({len(missing)} of the model's weights missing)",
        )
    plan = [(n, "F32", tuple(state[n].shape)) for n in order]

    url = out.url(WEIGHTS_DIR)
    opts = out.store.storage_options or None
    with tempfile.TemporaryDirectory(prefix="hwq-gguf-") as tmp:
        tok = None
        if tokenizer:
            adapter._vocab_rows = model.get_input_embeddings().num_embeddings
            tok = adapter.tokenizer()
        for f in save_folder_files(model, tok, tmp):
            out.write_bytes(f"{WEIGHTS_DIR}/{f.name}", f.read_bytes())
    del model, state
    with ShardedWriter(
        url, plan, storage_options=opts, metadata={"model": adapter.label()}
    ) as writer:
        for n, _, shape in plan:
            t = source[n]
            parsed_tensors: dict[str, Any] = {}
            res = processor.process(
                weights=_dequantize_rows(t.data, t.tensor_type),
                name=t.name,
                tensor_key_mapping=mapping,
                parsed_parameters={**parsed, "tensors": parsed_tensors},
            )
            if res.name != t.name or parsed_tensors:
                raise _refuse(
                    where, f"transformers builds {n} from more than GGUF tensor {t.name} ({arch})"
                )
            a = res.weights
            if not (a.flags.c_contiguous and a.flags.writeable):
                a = np.copy(a)  # a view of the read-only map (F32), or a strided result
            w = torch.from_numpy(a).to(torch.float32)
            if tuple(w.shape) != shape:
                raise _refuse(
                    where,
                    f"GGUF tensor {t.name} is {list(w.shape)}, the model's {n} is {list(shape)}",
                )
            if not torch.isfinite(w).all():
                raise ModelSourceError(f"{where}: weight {n} has NaN or inf values")
            writer.write(n, w)
            del w, a, res
        writer.close()
    return url, opts
