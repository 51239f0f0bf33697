"""Hugging Face causal language models: a model folder (local or fsspec URL) or one GGUF file.

`model.path` is one of

* a local folder with `config.json` and `model.safetensors` (or shards listed by
  `model.safetensors.index.json`), tokenizer files beside;
* an fsspec URL of such a folder (`s3://bucket/prefix`): its top-level files are downloaded
  once into `$HWQ_CACHE/models/<url-slug>-<key>/`, `key` a digest of the URL and each file's
  name, size and ETag (so a changed upload is a new folder), sizes verified, then loaded from
  there. Only the weights transformers will read are fetched (the index's shards, or
  `model.safetensors`); pickled checkpoints (`*.bin`, `*.pt`, ...) and subfolders never are;
* a `.gguf` file (local or URL), or a folder plus `gguf_file`. transformers dequantizes it to
  float32; hwq then drops the `GgufHfQuantizer` it attaches and the config's
  `quantization_config`, so the model is a plain fp32 model (trainable, `save_pretrained`
  works). The tokenizer comes from tokenizer files beside the GGUF if any, else from the GGUF.

Safetensors weights keep their stored dtype (`dtype="auto"`). Nothing is ever fetched from
the Hugging Face Hub (`local_files_only=True`), and remote code is never run.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.errors import UserError
from pipeline.models.base import ModelAdapter, ModelInfo, register
from pipeline.models.folder_checks import (
    TOKENIZER_FILES,
    building_from,
    check_config_against_weights,
    check_json_files,
    check_model_type,
    check_shard_name,
    params_on_meta,
    parse_json,
    read_small_file,
)
from pipeline.models.weights import WeightsFolder, parse_index

__all__ = ["HFCausalLM", "ModelSourceError", "TokenizerMismatch", "embedding_names",
           "fetch_model_folder",
           "largest_module_list", "skeleton_from_folder", "save_folder_files"]

_CONFIG = "config.json"
_SINGLE = "model.safetensors"
_INDEX = "model.safetensors.index.json"
# Weights in formats hwq never loads (pickles and other frameworks): never downloaded.
_NEVER = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".h5", ".msgpack", ".onnx",
          ".onnx_data", ".tflite", ".ot", ".npz", ".npy", ".joblib")


class ModelSourceError(UserError, ValueError):
    """A model path or URL that cannot be loaded; the message says why."""


class TokenizerMismatch(ModelSourceError):
    """The tokenizer produces ids the model has no embedding row for."""


def _require(package: str, purpose: str) -> None:
    try:
        __import__(package)
    except ImportError:
        raise ModelSourceError(f"{purpose} needs the Python package {package!r}, which is not "
                               f"installed (pip install {package})") from None


def _is_remote(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def _weights_for(names: set[str], index: dict[str, Any] | None, where: str) -> list[str]:
    """The safetensors files transformers will read from a folder holding `names`; `index` is
    the index's weight_map (checked by `weights.parse_index`: plain safetensors names)."""
    if _CONFIG not in names:
        ggufs = sorted(n for n in names if n.lower().endswith(".gguf"))
        hint = f" (it holds {ggufs[0]!r}: point model.path at that file)" if ggufs else ""
        raise ModelSourceError(f"{where} is not a Hugging Face model folder: no config.json{hint}")
    if index is not None:
        shards = sorted({check_shard_name(s, f"{where}: {_INDEX}") for s in index.values()})
        missing = [s for s in shards if s not in names]
        if not shards or missing:
            raise ModelSourceError(f"{where}: {_INDEX} lists missing shards {missing[:3]}"
                                   if missing else f"{where}: {_INDEX} lists no shards")
        return shards
    if _SINGLE in names:
        return [_SINGLE]
    pickled = sorted(n for n in names if n.endswith(_NEVER))
    hint = (f"; {pickled[0]!r} is a pickle, which hwq does not load: convert it to safetensors"
            if pickled else "")
    raise ModelSourceError(f"{where}: no {_SINGLE} or {_INDEX}{hint}")


def _slug(url: str) -> str:
    tail = url.split("://", 1)[-1].strip("/")
    return re.sub(r"[^A-Za-z0-9._-]+", "-", tail)[-60:].strip("-.") or "model"


def _version_tag(info: dict[str, Any]) -> str:
    for k in ("ETag", "etag", "md5Hash", "LastModified", "last_modified", "mtime", "updated"):
        if info.get(k) is not None:
            return str(info[k])
    return ""


def fetch_model_folder(
    url: str,
    storage_options: dict[str, Any] | None = None,
    *,
    gguf_file: str | None = None,
    cache_root: str | os.PathLike[str] | None = None,
) -> Path:
    """Download the files of a remote model folder that loading needs; returns the local
    folder `<cache_root>/models/<slug>-<key>` (cache_root default: $HWQ_CACHE).

    Reuses a complete earlier download of the same files (same names, sizes and ETags).
    """
    import fsspec

    where = f"model.path {url!r}"
    try:
        fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
    except ImportError as e:
        raise ModelSourceError(f"{where}: its protocol needs a package that is not installed "
                               f"({e})") from None
    root = root.rstrip("/")
    try:
        fs.invalidate_cache(root)  # a re-upload must show its new ETags, not a cached listing
        listing = fs.ls(root, detail=True)
    except FileNotFoundError:
        raise ModelSourceError(f"{where} does not exist") from None
    except Exception as e:  # noqa: BLE001 - credentials, endpoint, permissions: say which
        raise ModelSourceError(f"{where} cannot be listed ({type(e).__name__}: {e})") from None
    files = {_basename(i["name"]): i for i in listing if i.get("type") == "file"}
    if not files:
        raise ModelSourceError(f"{where} does not exist or holds no files")

    names = set(files)
    if gguf_file is not None:
        if gguf_file not in names:
            raise ModelSourceError(f"{where} has no file {gguf_file!r}")
        weights = [gguf_file]
    else:
        index = None
        if _INDEX in names:
            if int(files[_INDEX].get("size") or 0) > 64 << 20:
                raise ModelSourceError(f"{where}: {_INDEX} is over 64 MiB")
            index = parse_index(fs.cat_file(f"{root}/{_INDEX}"), f"{where}: {_INDEX}")[0]
        weights = _weights_for(names, index, where)
    # Everything else at the top level that is not a weight file: configs, tokenizer files.
    extras = [n for n in names if not n.endswith(_NEVER) and not n.endswith(".safetensors")
              and not n.lower().endswith(".gguf")]
    wanted = sorted(set(weights) | set(extras))
    sizes = {n: int(files[n]["size"]) for n in wanted}
    key = hashlib.sha256(json.dumps(
        {"url": url.rstrip("/"), "files": [[n, sizes[n], _version_tag(files[n])] for n in wanted]},
        sort_keys=True).encode()).hexdigest()[:16]

    if cache_root is None:
        from pipeline.executor import cache_dir

        cache_root = cache_dir()
    dest = Path(cache_root) / "models" / f"{_slug(url)}-{key}"
    if _complete(dest, sizes):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.partial-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        for n in wanted:
            try:
                fs.get_file(f"{root}/{n}", str(tmp / n))
            except Exception as e:  # noqa: BLE001
                raise ModelSourceError(f"{where}: downloading {n} failed ({type(e).__name__}: "
                                       f"{e})") from None
            got = (tmp / n).stat().st_size
            if got != sizes[n]:
                raise ModelSourceError(f"{where}: {n} downloaded as {got} bytes, the listing "
                                       f"says {sizes[n]}; retry, or check the upload")
        if dest.exists():  # an incomplete leftover, or another process finished first
            if _complete(dest, sizes):
                return dest
            shutil.rmtree(dest, ignore_errors=True)
        try:
            os.rename(tmp, dest)
        except OSError:
            if not _complete(dest, sizes):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _basename(name: str) -> str:
    return name.rstrip("/").rsplit("/", 1)[-1]


def _complete(folder: Path, sizes: dict[str, int]) -> bool:
    try:
        return all((folder / n).stat().st_size == s for n, s in sizes.items())
    except OSError:
        return False


def largest_module_list(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The nn.ModuleList with the most parameters inside the model's base model (the decoder
    layers: `model.layers` for Llama-like models, `transformer.h` for GPT-2)."""
    base = getattr(model, "base_model", model)
    best: tuple[int, str, nn.ModuleList] | None = None
    prefix = None
    for name, mod in model.named_modules():
        if mod is base:
            prefix = name
        if prefix is None or not isinstance(mod, nn.ModuleList):
            continue
        if prefix and not name.startswith(prefix + "."):
            continue
        n = sum(p.numel() for p in mod.parameters())
        if best is None or n > best[0]:
            best = (n, name, mod)
    if best is None:
        raise ModelSourceError(f"{type(model).__name__} has no nn.ModuleList of blocks")
    return best[1], best[2]


def _is_linear(mod: nn.Module) -> bool:
    return isinstance(mod, nn.Linear) or (
        type(mod).__name__ == "Conv1D" and type(mod).__module__.startswith("transformers"))


def _dtype_kw() -> str:
    import transformers

    major, minor = (int(x) for x in re.findall(r"\d+", transformers.__version__)[:2])
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"


def _drop_gguf_quantizer(model: nn.Module) -> None:
    """Make a dequantized GGUF model a plain model: transformers keeps a GgufHfQuantizer and
    a quantization_config, which refuse save_pretrained and mark the model untrainable."""
    packed = [n for n, m in model.named_modules() if type(m).__name__.startswith("Gguf")]
    if packed:
        raise ModelSourceError(f"the GGUF loaded with packed weights ({packed[0]}); hwq needs "
                               "them dequantized")
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and hasattr(quantizer, "remove_quantization_config"):
        quantizer.remove_quantization_config(model)  # what transformers does for dequantize=True
    for attr, value in (("hf_quantizer", None), ("is_quantized", False),
                        ("quantization_method", None)):
        if attr in vars(model):
            setattr(model, attr, value)
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "quantization_config"):
        try:
            delattr(cfg, "quantization_config")
        except AttributeError:
            cfg.quantization_config = None


@register("hf_causal_lm")
@dataclass
class HFCausalLM(ModelAdapter):
    """A Hugging Face causal LM (`AutoModelForCausalLM`); batches are int64 [B, L] token ids.

    path: local folder, fsspec URL of a folder, or a .gguf file (local or URL).
    gguf_file: the GGUF's name inside `path` (a folder), as an alternative to naming the file.
    dtype: "auto" (as stored; float32 for GGUF), "float32", "bfloat16" or "float16".
    chunk_tokens: positions whose logits exist at once in `loss` (see lm_loss).
    """

    path: str
    gguf_file: str | None = None
    storage_options: dict[str, Any] | None = None
    dtype: str = "auto"
    chunk_tokens: int = 128
    attn_implementation: str | None = None
    cache_dir: str | None = None  # where remote folders are downloaded; None = $HWQ_CACHE
    _resolved: tuple[Path, str | None] | None = field(default=None, init=False, repr=False)
    _vocab_rows: int | None = field(default=None, init=False, repr=False)
    _weights: WeightsFolder | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ModelSourceError(f"model.dtype {self.dtype!r}: auto, float32, bfloat16 or "
                                   "float16")
        if self.chunk_tokens < 1:
            raise ModelSourceError("model.chunk_tokens must be ≥ 1")

    # -- where the files are -------------------------------------------------------------------

    def resolve(self) -> tuple[Path, str | None]:
        """(local folder, GGUF file name or None), downloading a remote folder first."""
        if self._resolved is not None:
            return self._resolved
        path = self.path.removeprefix("file://")
        gguf = self.gguf_file
        if path.lower().endswith(".gguf"):
            folder, _, name = path.rstrip("/").rpartition("/")
            if gguf is not None and gguf != name:
                raise ModelSourceError(f"model.path names {name!r} but model.gguf_file is "
                                       f"{gguf!r}")
            path, gguf = folder or ".", name
        where = f"model.path {self.path!r}"
        if _is_remote(path):
            local = fetch_model_folder(path, self.storage_options, gguf_file=gguf,
                                       cache_root=self.cache_dir)
        else:
            local = Path(path).expanduser()
            if not local.exists():
                raise ModelSourceError(f"{where} does not exist")
            if not local.is_dir():
                raise ModelSourceError(f"{where} is a file, not a model folder or a .gguf file")
            names = {p.name for p in local.iterdir()}
            if gguf is not None:
                if gguf not in names:
                    raise ModelSourceError(f"{where}: no GGUF file {gguf!r} in {str(local)!r}")
            else:
                index = None
                if _INDEX in names:
                    index = parse_index(read_small_file(str(local / _INDEX), 64 << 20),
                                        f"{where}: {_INDEX}")[0]
                _weights_for(names, index, where)
        self._check_files(local, gguf, where)
        self._resolved = (local, gguf)
        return self._resolved

    def _check_files(self, local: Path, gguf: str | None, where: str) -> None:
        """Everything hwq can check before transformers reads the folder: a GGUF's header and
        metadata; else every JSON file, the weights' headers, and config.json against them."""
        if gguf is not None:
            _require("gguf", "loading a GGUF file")
            from pipeline.models.gguf_check import check_gguf

            check_gguf(local / gguf)
            check_json_files(local)  # tokenizer files beside it
            return
        jsons = check_json_files(local)
        check_model_type(jsons["config.json"], f"{where}: config.json")
        self._weights = WeightsFolder(local)
        check_config_against_weights(
            jsons["config.json"], {n: t.shape for n, t in self._weights.tensors.items()},
            f"{where}: config.json")

    # -- loading ---------------------------------------------------------------------------------

    def _load(self) -> nn.Module:
        folder, gguf = self.resolve()
        from transformers import AutoModelForCausalLM

        kw: dict[str, Any] = {"local_files_only": True}
        dtype: Any = self.dtype if self.dtype == "auto" else getattr(torch, self.dtype)
        if gguf is not None:
            _require("gguf", "loading a GGUF file")
            _require("accelerate", "loading a GGUF file")
            kw["gguf_file"] = gguf
            dtype = torch.float32 if dtype == "auto" else dtype
            try:  # dequantize at load time even where packed GGUF kernels are installed
                from transformers import GgufConfig

                kw["quantization_config"] = GgufConfig(dequantize=True)
            except ImportError:
                pass
        else:
            kw["use_safetensors"] = True  # never unpickle
        kw[_dtype_kw()] = dtype
        if self.attn_implementation:
            kw["attn_implementation"] = self.attn_implementation
        try:
            if gguf is None and self._weights is not None and self._weights.sha256_any:
                # hwq's digests: load through reads that check them, not through transformers.
                model = load_verified(folder, self._weights, None if dtype == "auto" else dtype,
                                      self.attn_implementation)
            else:
                model = AutoModelForCausalLM.from_pretrained(str(folder), trust_remote_code=False,
                                                             **kw)
        except UserError:
            raise
        except MemoryError:
            raise
        except Exception as e:  # noqa: BLE001 - untrusted files: any failure is theirs
            first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
            raise ModelSourceError(f"model.path {self.path!r}: transformers cannot load it "
                                   f"({first})") from e
        if gguf is not None:
            _drop_gguf_quantizer(model)
        # No generation here: a KV cache would only hold memory during loss/perplexity passes.
        model.config.use_cache = False
        self._vocab_rows = model.get_input_embeddings().num_embeddings
        return model

    def tokenizer(self) -> Any:
        """The model's AutoTokenizer; TokenizerMismatch if it can produce an id ≥ the number
        of embedding rows (fewer tokens than rows is fine: vocabularies are often padded)."""
        folder, gguf = self.resolve()
        from pipeline.data.text import load_tokenizer

        from_gguf = None
        if not any((folder / n).is_file() for n in TOKENIZER_FILES):
            if gguf is None:
                raise ModelSourceError(f"model.path {self.path!r}: no tokenizer files "
                                       f"({', '.join(TOKENIZER_FILES[:3])}, ...)")
            from_gguf = gguf
        tok = load_tokenizer(folder, gguf_file=from_gguf, where=f"model.path {self.path!r}")
        needed = max(len(tok), max(tok.get_vocab().values(), default=-1) + 1)
        rows = self._embedding_rows()
        if needed > rows:
            raise TokenizerMismatch(
                f"model.path {self.path!r}: the tokenizer has {needed} token ids but the model's "
                f"embedding has {rows} rows; tokenizer and weights do not belong together")
        return tok

    def _embedding_rows(self) -> int:
        if self._vocab_rows is None:
            folder, gguf = self.resolve()
            from transformers import AutoConfig

            kw: dict[str, Any] = {"local_files_only": True}
            if gguf is not None:
                kw["gguf_file"] = gguf
            try:
                cfg = AutoConfig.from_pretrained(str(folder), trust_remote_code=False, **kw)
                self._vocab_rows = int(cfg.get_text_config().vocab_size)
            except MemoryError:
                raise
            except Exception as e:  # noqa: BLE001 - untrusted files: any failure is theirs
                raise ModelSourceError(f"model.path {self.path!r}: its config gives no vocabulary "
                                       f"size ({type(e).__name__}: {str(e)[:200]})") from None
        return self._vocab_rows

    # -- the pipeline's questions ------------------------------------------------------------------

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """Mean next-token NLL over the B·(L−1) predicted tokens of int64 [B, L] ids."""
        from pipeline.models.lm_loss import next_token_nll

        ids = batch["input_ids"] if isinstance(batch, dict) else batch
        ids = ids.to(model.get_input_embeddings().weight.device)
        nll = next_token_nll(model, ids, chunk_tokens=self.chunk_tokens)
        return nll.sum() / (ids.shape[0] * (ids.shape[1] - 1))

    def blocks(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """The decoder layers in order (the largest ModuleList of the base model)."""
        name, layers = largest_module_list(model)
        return [(f"{name}.{i}", m) for i, m in enumerate(layers)]

    def default_quantizable(self, model: nn.Module) -> list[str]:
        """Every Linear (or GPT-2 Conv1D) weight inside the decoder blocks; embeddings, norms
        and the output head stay unquantized unless targeted."""
        chosen = set()
        for bname, block in self.blocks(model):
            for mname, mod in block.named_modules():
                if _is_linear(mod):
                    chosen.add(f"{bname}.{mname}.weight" if mname else f"{bname}.weight")
        return [n for n, _ in model.named_parameters() if n in chosen]

    def label(self) -> str:
        return self.path if self.gguf_file is None else f"{self.path.rstrip('/')}/{self.gguf_file}"

    def describe(self, model: nn.Module | None = None) -> ModelInfo:
        info = super().describe(model)
        model = self._model(model)
        cfg = getattr(model, "config", None)
        extra = {"adapter": self.name, "model_type": getattr(cfg, "model_type", None),
                 "layers": len(self.blocks(model)),
                 "vocab_rows": model.get_input_embeddings().num_embeddings}
        return ModelInfo(info.name, info.params, info.dtype, extra)


def embedding_names(model: nn.Module) -> list[str]:
    """Canonical parameter names (`named_parameters()` order, tied weights once under their
    first name) of the input embedding's and the output head's weights, where the model has
    them: `["model.embed_tokens.weight"]` for a Llama with tied embeddings, two names
    otherwise."""
    wanted = set()
    for get in ("get_input_embeddings", "get_output_embeddings"):
        mod = getattr(model, get, lambda: None)()
        w = getattr(mod, "weight", None) if mod is not None else None
        if isinstance(w, nn.Parameter):
            wanted.add(id(w))
    return [n for n, p in model.named_parameters() if id(p) in wanted]


def skeleton_from_folder(folder: str | Path, dtype: str | None = None) -> nn.Module:
    """A causal LM built from the config.json in `folder` (weights freshly initialised: the
    caller loads a state dict). Never runs remote code."""
    from transformers import AutoConfig, AutoModelForCausalLM

    where = repr(str(Path(folder) / _CONFIG))
    check_model_type(parse_json(read_small_file(str(Path(folder) / _CONFIG), 4 << 20, where),
                                where), where)
    kw: dict[str, Any] = {}
    if dtype:
        kw[_dtype_kw()] = getattr(torch, dtype)
    with building_from(where):
        cfg = AutoConfig.from_pretrained(str(folder), local_files_only=True,
                                         trust_remote_code=False)
        model = AutoModelForCausalLM.from_config(cfg, trust_remote_code=False, **kw)
    model.config.use_cache = False
    return model


def load_verified(folder: Path, weights: WeightsFolder, dtype: torch.dtype | None,
                  attn_implementation: str | None = None) -> nn.Module:
    """The model of `folder` built on the meta device from its config.json, each parameter
    then read through `weights` (which checks every tensor's sha256 from the index against
    the bytes it read) and assigned in its stored dtype (or `dtype`)."""
    from transformers import AutoConfig, AutoModelForCausalLM


    if not weights.sha256_all:
        raise ModelSourceError(f"{weights.url}: its index has sha256 digests for only some "
                               "tensors; every tensor needs one (or none)")
    cfg = AutoConfig.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    kw: dict[str, Any] = {}
    if attn_implementation:
        kw["attn_implementation"] = attn_implementation
    with params_on_meta():
        model = AutoModelForCausalLM.from_config(cfg, trust_remote_code=False, **kw)
    state = {}
    for name, p in model.named_parameters():
        if name not in weights.tensors:
            continue  # a tied head: tie_weights() below points it at the embedding
        t = weights.read(name)
        if tuple(t.shape) != tuple(p.shape):
            raise ModelSourceError(f"{weights.url}: tensor {name!r} is {list(t.shape)}, but "
                                   f"config.json makes it {list(p.shape)}")
        state[name] = t if dtype is None else t.to(dtype)
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if missing:
        raise ModelSourceError(f"{weights.url}: no tensor {missing[0]!r} (config.json's model "
                               f"has {len(missing)} parameters the weights do not hold)")
    model.config.use_cache = False
    return model


def save_folder_files(model: nn.Module, tokenizer: Any, folder: str | Path) -> list[Path]:
    """Write everything of a model folder except the weights (config.json,
    generation_config.json, tokenizer files) into `folder`; returns the files written."""
    import tempfile

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # hwq's own passes turn the KV cache off (they never generate); the folder is for users,
    # whose generate() without a cache recomputes the whole prefix at every new token.
    kept = getattr(model.config, "use_cache", None)
    model.config.use_cache = True
    try:
        model.config.save_pretrained(str(folder))
    finally:
        model.config.use_cache = kept
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        try:
            gen.save_pretrained(str(folder))
        except (ValueError, OSError):
            pass  # an invalid generation config is not ours to fix; the model loads without
    if tokenizer is not None:
        with tempfile.TemporaryDirectory(prefix="hwq-tok-") as tmp:
            tokenizer.save_pretrained(tmp)
            for p in Path(tmp).iterdir():
                if p.is_file():
                    (folder / p.name).write_bytes(p.read_bytes())
    return sorted(p for p in folder.iterdir() if p.is_file())
