"""What `hwq stream` checks and gathers before any stage or Ray starts: the model and work
paths, argument values against the model's config, the tokenizer (local, or copied from an
``s3://`` folder), and the config/tokenizer files that go beside the .hwq and into the
decoded folder.

Every problem is a `StreamInputError`: one line saying what is wrong and how to fix it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

from pipeline.errors import UserError
from pipeline.models.folder_checks import TOKENIZER_FILES, parse_json

__all__ = [
    "StreamInputError",
    "check_paths",
    "model_config",
    "check_lengths",
    "hf_files",
    "tokenizer_folder",
    "load_tokenizer",
]

# Read beside the tokenizer files (special tokens, merges, chat template).
_COMPANIONS = (
    "special_tokens_map.json",
    "added_tokens.json",
    "merges.txt",
    "chat_template.jinja",
)
_MAX_FILE = 64 << 20  # one config or tokenizer file (the largest real tokenizer.json ~ 20 MB)
_MAX_CONFIG = 4 << 20


class StreamInputError(UserError, ValueError):
    """A model, work folder, tokenizer or argument `hwq stream` cannot use."""


def _fs(url: str, storage_options: dict | None):
    from fsspec.core import url_to_fs

    try:
        return url_to_fs(url, **(storage_options or {}))
    except Exception as e:  # noqa: BLE001 - an unknown protocol or a missing package
        from pipeline.store import describe_store_error

        raise StreamInputError(describe_store_error(e, url)) from None


def _nul(what: str, value: str | None) -> None:
    if value is not None and "\x00" in value:
        raise StreamInputError(f"{what} {value!r} contains a NUL byte: not a path")


def check_paths(
    model: str,
    work: str,
    storage_options: dict | None,
    *,
    texts: dict[str, str | None] | None = None,
    tokenizer: str | None = None,
) -> None:
    """The model exists (a folder or .safetensors file, local or on a store), the work
    folder is a folder or can be made one, and no path holds a NUL byte."""
    _nul("model path", model)
    _nul("work folder", work)
    _nul("--tokenizer", tokenizer)
    for flag, path in (texts or {}).items():
        _nul(flag, path)
    if "://" in model and not model.startswith("file://"):
        fs, path = _fs(model, storage_options)
        if not fs.exists(path):
            raise StreamInputError(f"model {model} does not exist")
    else:
        path = model[7:] if model.startswith("file://") else model
        if not os.path.exists(path):
            raise StreamInputError(f"model folder {model} does not exist")
        if not os.path.isdir(path) and not path.endswith(".safetensors"):
            raise StreamInputError(f"model {model} is not a folder (nor a .safetensors file)")
    if "://" not in work or work.startswith("file://"):
        path = work[7:] if work.startswith("file://") else work
        if os.path.lexists(path) and not os.path.isdir(path):
            raise StreamInputError(f"work folder {work} exists and is not a folder")
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as e:
            raise StreamInputError(
                f"cannot make the work folder {work}: {e.strerror or e}"
            ) from None
        if not os.access(path, os.W_OK | os.X_OK):
            raise StreamInputError(f"work folder {work} is not writable")


def model_config(model: str, storage_options: dict | None) -> dict[str, Any]:
    """The model's config.json as a dict (read capped; a model needs one)."""
    return _config(model, storage_options)[1]


def _config(model: str, storage_options: dict | None) -> tuple[bytes, dict[str, Any]]:
    if model.endswith(".safetensors"):
        model = model.rsplit("/", 1)[0] if "/" in model else "."
    fs, path = _fs(model, storage_options)
    p = f"{path.rstrip('/')}/config.json"
    try:
        with fs.open(p, "rb") as f:
            raw = f.read(_MAX_CONFIG + 1)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise StreamInputError(
            f"{model} holds no config.json file (the model's Hugging Face config)"
        ) from None
    if len(raw) > _MAX_CONFIG:
        raise StreamInputError(f"{model}/config.json is larger than {_MAX_CONFIG >> 20} MiB")
    cfg = parse_json(raw, f"{model}/config.json")  # strict UTF-8, bounded nesting
    if not isinstance(cfg, dict):
        raise StreamInputError(f"{model}/config.json is not a JSON object")
    return raw, cfg


def check_lengths(cfg: dict[str, Any], model: str, lengths: dict[str, int]) -> None:
    """Each window length (flag -> tokens) fits the model's positions."""
    most = next(
        (
            cfg[k]
            for k in ("max_position_embeddings", "n_positions", "max_seq_len")
            if type(cfg.get(k)) is int and cfg[k] > 0
        ),
        None,
    )
    for flag, n in lengths.items():
        if most is not None and n > most:
            raise StreamInputError(
                f"{flag} {n} is longer than the {most} positions of {model} "
                f"(max_position_embeddings); give at most {most}"
            )


def _read_capped(fs, path: str, where: str) -> bytes:
    with fs.open(path, "rb") as f:
        data = f.read(_MAX_FILE + 1)
    if len(data) > _MAX_FILE:
        raise StreamInputError(f"{where} is larger than {_MAX_FILE >> 20} MiB: not a model file")
    return data


def _regular(fs, path: str) -> bool:
    try:
        info = fs.info(path)
    except (FileNotFoundError, NotADirectoryError):
        return False
    if fs.protocol in ("file", "local") or "file" in fs.protocol:
        return os.path.isfile(path) and not os.path.islink(path)
    return info.get("type") == "file"


def _tokenizer_files(url: str, storage_options: dict | None) -> dict[str, bytes]:
    """The tokenizer files of folder `url` (name -> bytes); refuses a folder with none."""
    fs, path = _fs(url, storage_options)
    path = path.rstrip("/")
    if not fs.isdir(path):
        raise StreamInputError(f"tokenizer folder {url} does not exist")
    out = {}
    for name in TOKENIZER_FILES + _COMPANIONS:
        p = f"{path}/{name}"
        if _regular(fs, p):
            out[name] = _read_capped(fs, p, f"{url}/{name}")
    if not any(n in out for n in TOKENIZER_FILES):
        raise StreamInputError(
            f"{url} holds no tokenizer files (one of {', '.join(TOKENIZER_FILES)}): text needs "
            "the model's tokenizer; copy it there or give --tokenizer FOLDER_OR_URL"
        )
    return out


@contextlib.contextmanager
def tokenizer_folder(url: str, storage_options: dict | None) -> Iterator[str]:
    """A local folder holding the tokenizer files of `url` (a local folder as is; a remote
    one copied into a private temporary folder, each file at most 64 MiB, removed after)."""
    if "://" not in url or url.startswith("file://"):
        _tokenizer_files(url, None)  # a clear error if there are none
        yield url[7:] if url.startswith("file://") else url
        return
    files = _tokenizer_files(url, storage_options)
    tmp = tempfile.mkdtemp(prefix="hwq-tokenizer-")
    try:
        for name, data in files.items():
            with open(os.path.join(tmp, name), "wb") as f:
                f.write(data)
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_tokenizer(url: str, storage_options: dict | None):
    """The tokenizer of folder `url` (local or remote: its files are copied to a private local
    folder first), loaded by `pipeline.data.text.load_tokenizer` (checked JSON, no code, a
    library panic is one line)."""
    from pipeline.data.text import load_tokenizer as load_local

    with tokenizer_folder(url, storage_options) as local:
        tok = load_local(local, where=repr(url))
    if len(tok) == 0:
        raise StreamInputError(f"the tokenizer in {url} has an empty vocabulary")
    return tok


def hf_files(
    model: str, storage_options: dict | None, tokenizer: str | None = None
) -> dict[str, bytes]:
    """config.json and generation_config.json of the model, and the tokenizer files of
    `tokenizer` (default: the model folder; none if it has none), by name: what `hwq run`'s
    encode stage puts in hf/ (pipeline/encode/cli.py's list). A model without a generation
    config gets the one transformers derives from its config."""
    from pipeline.encode.cli import _HF_FILES

    raw, cfg = _config(model, storage_options)
    folder = model.rsplit("/", 1)[0] if model.endswith(".safetensors") else model
    out = {"config.json": raw}
    fs, path = _fs(folder, storage_options)
    gen = f"{path.rstrip('/')}/generation_config.json"
    if _regular(fs, gen):
        out["generation_config.json"] = _read_capped(fs, gen, f"{folder}/generation_config.json")
    else:
        made = _generation_config(cfg)
        if made is not None:
            out["generation_config.json"] = made
    try:
        tok = _tokenizer_files(tokenizer or folder, storage_options)
    except StreamInputError:
        if tokenizer:
            raise
        tok = {}  # a model without a tokenizer (synthetic): its files are the config only
    out.update({n: b for n, b in tok.items() if n in _HF_FILES})
    return out


def _generation_config(cfg: dict[str, Any]) -> bytes | None:
    from transformers import GenerationConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    try:
        conf = CONFIG_MAPPING[cfg["model_type"]].from_dict(cfg)
        return GenerationConfig.from_model_config(conf).to_json_string().encode()
    except Exception:  # noqa: BLE001 - no generation config is better than no decoded folder
        return None
