"""Checks of a model folder's files before anything is built or allocated from them.

A model folder is untrusted input (docs/SECURITY.md): its JSON files, shard names and the
size fields of its config.json are checked here, by hwq, before transformers or torch see
them, so that a hostile folder is refused with one line naming the file and the field,
never a traceback, a hang, or memory spent on a model the weights cannot fill.

* `parse_json`: strict UTF-8 JSON of bounded size and nesting depth (no RecursionError).
* `check_shard_name` / `check_regular_file`: a weight file is a plain name in the folder,
  a safetensors file (never a pickle), and a regular file (not a link, folder, FIFO, device).
* `check_json_files`: every JSON file transformers would read from the folder.
* `check_config_against_weights`: config.json's size fields against the tensors the weights'
  headers hold: every layer the config asks for has tensors, and no size field asks for more
  values than the weights hold.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import stat
from collections.abc import Iterator, Mapping
from typing import Any

from pipeline.errors import UserError

__all__ = ["ModelFileError", "PICKLES", "parse_json", "check_shard_name", "check_regular_file",
           "model_file_target",
           "check_json_files", "check_config_against_weights", "check_model_type",
           "building_from", "params_on_meta", "TOKENIZER_FILES", "JSON_FILES", "MAX_JSON_DEPTH"]

MAX_JSON_DEPTH = 64  # real configs and tokenizers nest < 10 levels
# Any one of these in a model folder is a tokenizer transformers can load without running
# code (a tokenizer_config.json alone can describe a byte-level one; an empty result is
# refused where it is loaded).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json",
                   "vocab.txt", "spiece.model", "sentencepiece.bpe.model")
PICKLES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
# JSON files transformers reads from a model folder, with the most bytes each may have.
JSON_FILES = {"config.json": 4 << 20, "generation_config.json": 4 << 20,
              "model.safetensors.index.json": 64 << 20, "tokenizer_config.json": 64 << 20,
              "special_tokens_map.json": 4 << 20, "added_tokens.json": 64 << 20,
              "tokenizer.json": 256 << 20, "vocab.json": 64 << 20}
_HEX64 = re.compile(r"[0-9a-f]{64}")


class ModelFileError(UserError, ValueError):
    """A file of a model folder that hwq refuses to read; the message names it and says why."""


def _depth(obj: Any) -> int:
    """Nesting depth of a parsed JSON value, without recursion."""
    deepest, stack = 0, [(obj, 1)]
    while stack:
        o, d = stack.pop()
        if isinstance(o, dict | list):
            deepest = max(deepest, d)
            if d > MAX_JSON_DEPTH:
                return d
            stack.extend((v, d + 1) for v in (o.values() if isinstance(o, dict) else o))
    return deepest


def parse_json(raw: bytes | bytearray, where: str) -> Any:
    """The JSON value of `raw` (strict UTF-8), or ModelFileError naming `where`."""
    try:
        obj = json.loads(bytes(raw).decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ModelFileError(f"{where} is not UTF-8 text (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise ModelFileError(f"{where} is not valid JSON ({e})") from None
    except RecursionError:
        raise ModelFileError(f"{where} nests JSON too deeply to be read") from None
    if _depth(obj) > MAX_JSON_DEPTH:
        raise ModelFileError(f"{where} nests JSON more than {MAX_JSON_DEPTH} levels deep")
    return obj


def check_shard_name(name: Any, where: str) -> str:
    """`name` if it is a plain safetensors file name inside the folder; else ModelFileError
    (a pickle gets its own line: hwq never unpickles, convert it to safetensors)."""
    if not isinstance(name, str):
        raise ModelFileError(f"{where}: shard {name!r} is not a file name (a JSON "
                             f"{type(name).__name__})")
    if (name in ("", ".", "..") or "/" in name or "\\" in name or len(name) > 255
            or any(ord(c) < 32 or ord(c) == 127 for c in name)):
        raise ModelFileError(f"{where}: shard name {name!r} is not a file name in the folder")
    if name.lower().endswith(PICKLES):
        raise ModelFileError(f"{where}: {name!r} is a pickle, which hwq never loads (loading "
                             "a pickle can run code); convert the weights to safetensors")
    if not name.endswith(".safetensors"):
        raise ModelFileError(f"{where}: shard {name!r} is not a .safetensors file")
    return name


def model_file_target(path: str, what: str | None = None) -> str:
    """The file to open for `path`: the path itself, or, in a Hugging Face cache snapshot
    (`…/models--ORG--NAME/snapshots/REV/FILE`, whose files are links to `../../blobs/HASH`),
    the blob of that same cache folder it links to. Any other symbolic link is refused: a link
    in a folder someone else can write could make hwq read (and put into its output) any file
    this user can read."""
    what = what or repr(path)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise ModelFileError(f"{what} does not exist") from None
    except (OSError, ValueError) as e:  # ValueError: an embedded NUL
        raise ModelFileError(f"{what} cannot be read ({type(e).__name__}: {e})") from None
    if not stat.S_ISLNK(st.st_mode):
        return path
    snapshot = os.path.dirname(os.path.abspath(path))
    snapshots = os.path.dirname(snapshot)
    blobs = os.path.join(os.path.realpath(os.path.dirname(snapshots)), "blobs")
    real = os.path.realpath(path)
    if os.path.basename(snapshots) == "snapshots" and os.path.dirname(real) == blobs:
        return real
    raise ModelFileError(f"{what} is a symbolic link; hwq reads model files only as regular "
                         "files in the folder, or the blobs of a Hugging Face cache snapshot "
                         "(copy it with `cp -L` to resolve links)")


def check_regular_file(path: str, what: str | None = None) -> int:
    """Size of the local file `path`, which must be a regular file (or a Hugging Face cache
    snapshot's link to its blob: `model_file_target`); ModelFileError otherwise (a folder,
    FIFO or device would hang or fail mid-read)."""
    what = what or repr(path)
    target = model_file_target(path, what)
    try:
        st = os.lstat(target)
    except (OSError, ValueError) as e:
        raise ModelFileError(f"{what} cannot be read ({type(e).__name__}: {e})") from None
    if not stat.S_ISREG(st.st_mode):
        raise ModelFileError(f"{what} is not a regular file (a folder, FIFO or device)")
    return st.st_size


def read_small_file(path: str, cap: int, what: str | None = None) -> bytes:
    """The bytes of a regular local file of at most `cap` bytes."""
    what = what or repr(path)
    size = check_regular_file(path, what)
    if size > cap:
        raise ModelFileError(f"{what} is {size} bytes, more than the {cap} allowed for it")
    fd = os.open(model_file_target(path, what), os.O_RDONLY | os.O_NOFOLLOW)
    try:
        with os.fdopen(fd, "rb") as f:
            return f.read(cap + 1)[:cap]
    except OSError as e:
        raise ModelFileError(f"{what} cannot be read ({e})") from None


def check_json_files(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """Parse every JSON file transformers would read from the local `folder` (those present
    among `JSON_FILES`): regular files, bounded size, UTF-8, shallow. Returns {name: value}."""
    out = {}
    for name, cap in JSON_FILES.items():
        path = os.path.join(os.fspath(folder), name)
        if not os.path.lexists(path):
            continue
        where = repr(path)
        out[name] = parse_json(read_small_file(path, cap, where), where)
    if "config.json" in out and not isinstance(out["config.json"], dict):
        raise ModelFileError(f"{os.path.join(os.fspath(folder), 'config.json')!r} is not a JSON "
                             "object")
    return out


def check_digests(meta: Any, where: str) -> dict[str, str]:
    """hwq_tensor_sha256 or hwq_shard_sha256 of an index: {name: 64 hex digits} or {}."""
    if meta is None:
        return {}
    if not isinstance(meta, dict) or not all(
            isinstance(v, str) and _HEX64.fullmatch(v) for v in meta.values()):
        raise ModelFileError(f"{where}: its sha256 digests are not {{name: 64 hex digits}}")
    return dict(meta)


def check_model_type(cfg: Mapping[str, Any], where: str) -> str:
    """config.json's model_type, which must be one transformers implements: hwq never runs a
    folder's own code (its `auto_map`)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    mt = cfg.get("model_type")
    if not isinstance(mt, str) or mt not in CONFIG_MAPPING:
        hint = (" (its auto_map names Python code of its own, which hwq never runs)"
                if "auto_map" in cfg else "")
        raise ModelFileError(f"{where}: model_type {mt!r} is not a model transformers "
                             f"implements{hint}")
    return mt


@contextlib.contextmanager
def building_from(where: str) -> Iterator[None]:
    """Run transformers on an untrusted config.json: what it raises (a KeyError for an unknown
    activation, a validation error, a ZeroDivisionError for zero heads...) becomes one
    ModelFileError naming `where`; the original stays chained for `-v`. A MemoryError is not
    converted: the checks before a build exist so that none happens."""
    try:
        yield
    except (UserError, MemoryError):
        raise
    except Exception as e:  # noqa: BLE001 - the input is untrusted, any failure is its fault
        text = str(e).strip()
        first = text.splitlines()[0][:300] if text else ""
        raise ModelFileError(f"{where}: transformers cannot build a model from it "
                             f"({type(e).__name__}: {first})") from e


# -- config.json against the weights ---------------------------------------------------------

_LAYERS = ("num_hidden_layers", "n_layer", "num_layers")
# Fields each of which alone can never exceed the number of values the weights hold.
_SIZES = ("hidden_size", "n_embd", "d_model", "intermediate_size", "n_inner", "ffn_dim",
          "vocab_size", "num_attention_heads", "n_head", "num_key_value_heads", "head_dim",
          "moe_intermediate_size", "num_experts", "num_local_experts", "n_routed_experts",
          "num_experts_per_tok", "hidden_size_per_layer_input", "vocab_size_per_layer_input")
_POSITIONS = ("max_position_embeddings", "n_positions", "n_ctx")
_MAX_POSITIONS = 1 << 24  # rotary models allocate nothing per position; 16 M is past any model
# Models that allocate a positions × positions mask per layer: their positions are learned,
# so a position table of positions × hidden values must fit in the weights.
_QUADRATIC = ("gpt_neo", "gpt_bigcode", "imagegpt", "clvp")
_LAYER_NAME = re.compile(r"^(.*?)\.(\d+)\.")


def _int_field(cfg: Mapping[str, Any], key: str, where: str) -> int | None:
    v = cfg.get(key)
    if v is None:
        return None
    if type(v) is not int or v < 0:
        raise ModelFileError(f"{where}: {key} is {v!r}, not a non-negative integer")
    return v


def _text_configs(cfg: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    out = [cfg]
    for k in ("text_config", "language_config", "llm_config"):
        if isinstance(cfg.get(k), dict):
            out.append(cfg[k])
    return out


def check_config_against_weights(cfg: Any, shapes: Mapping[str, tuple[int, ...]],
                                 where: str) -> None:
    """Refuse a config.json whose size fields the weights cannot back, before a model is built.

    cfg: the parsed config.json. shapes: tensor name -> shape, from the weights' headers.
    Every layer the config's layer count asks for must have tensors named `<prefix>.<i>.` (some
    prefix holding layers 0..n−1), and no size field (alone, or hidden × vocab / hidden ×
    intermediate) may ask for more values than all the tensors together hold.
    """
    if not isinstance(cfg, Mapping):
        raise ModelFileError(f"{where} is not a JSON object")
    total = sum(_numel(s) for s in shapes.values())
    layers_by_prefix: dict[str, set[int]] = {}
    for name in shapes:
        m = _LAYER_NAME.match(name)
        if m:
            layers_by_prefix.setdefault(m.group(1), set()).add(int(m.group(2)))
    for c in _text_configs(cfg):
        for key in _SIZES:
            v = _int_field(c, key, where)
            if v is not None and v > max(total, 1):
                raise ModelFileError(f"{where}: {key} is {v}, but the weights hold {total} "
                                     "values in all; config.json and the weights do not "
                                     "belong together")
        hidden = next((v for k in ("hidden_size", "n_embd", "d_model")
                       if (v := _int_field(c, k, where)) is not None), None)
        for key in ("vocab_size", "intermediate_size", "n_inner", "ffn_dim"):
            v = _int_field(c, key, where)
            if hidden and v and hidden * v > total:
                raise ModelFileError(f"{where}: {key} {v} × hidden size {hidden} is more "
                                     f"values than the weights hold ({total}); config.json "
                                     "and the weights do not belong together")
        for key in _POSITIONS:
            v = _int_field(c, key, where)
            if v is None:
                continue
            quadratic = cfg.get("model_type") in _QUADRATIC
            if v > _MAX_POSITIONS or (quadratic and hidden and v * hidden > total):
                raise ModelFileError(f"{where}: {key} is {v}, more positions than this model "
                                     "can have with these weights")
        for key in _LAYERS:
            n = _int_field(c, key, where)
            if not n:
                continue
            if not any(len(got) >= n and all(i in got for i in range(n))
                       for got in layers_by_prefix.values()):
                best = max(layers_by_prefix.items(), key=lambda kv: len(kv[1]), default=None)
                held = (f"{len(best[1])} numbered layers under {best[0]!r}" if best
                        else "no numbered layers")
                raise ModelFileError(f"{where}: {key} is {n}, but the weights hold {held}; "
                                     "config.json and the weights do not belong together")


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


@contextlib.contextmanager
def params_on_meta() -> Iterator[None]:
    """Build modules whose parameters live on the meta device (buffers stay on the CPU)."""
    from torch import nn

    register = nn.Module.register_parameter

    def on_meta(self: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(self, name, param)
        p = self._parameters.get(name)
        if p is not None and p.device.type != "meta":
            self._parameters[name] = nn.Parameter(p.to("meta"), requires_grad=p.requires_grad)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register
