"""Text for language models: reading sources, tokenizing, cutting token windows.

Protocol (docs/LANGUAGE_MODELS.md states it for reproduction):

* `read_text`: each source is a path, a glob or an fsspec URL (globs expand sorted; `.gz`,
  `.bz2`, `.xz`, `.zst` are decompressed by suffix); the texts, decoded as strict UTF-8, are
  joined with "\\n\\n" in the order given.
* `token_ids`: the whole text tokenized once, without special tokens by default.
* `calibration_windows`: `n` windows of `seq_len` tokens whose starts are
  `np.random.default_rng(seed).choice(T - seq_len + 1, size=n, replace=n > T - seq_len + 1)`,
  in the order drawn (T = number of tokens).
* `eval_windows`: the GPTQ protocol, non-overlapping consecutive windows from token 0; the tail
  shorter than `seq_len` is dropped.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from pipeline.errors import UserError

__all__ = ["TextSourceError", "TokenizerError", "read_text", "load_tokenizer", "token_ids",
           "calibration_windows", "eval_windows", "split_heldout"]

_MAGIC = ("*", "?", "[")


class TextSourceError(UserError, ValueError):
    """A text source that is missing, empty or not UTF-8, or text too short for a window."""


def _expand(source: str, storage_options: dict[str, Any]) -> tuple[Any, list[str]]:
    """(filesystem, paths) for one source; globs expand to their sorted matches."""
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(source, **storage_options)
    except ImportError as e:
        raise TextSourceError(f"text source {source!r}: its protocol needs a package that is not "
                              f"installed ({e})") from None
    if any(c in path for c in _MAGIC):
        paths = sorted(p for p in fs.glob(path) if fs.isfile(p))
        if not paths:
            raise TextSourceError(f"text source {source!r}: the pattern matches no file")
        return fs, paths
    if not fs.exists(path):
        raise TextSourceError(f"text source {source!r} does not exist")
    if fs.isdir(path):
        raise TextSourceError(f"text source {source!r} is a folder; name its files, e.g. "
                              f"{source.rstrip('/')}/*.txt")
    return fs, [path]


def read_text(sources: str | Sequence[str], storage_options: dict[str, Any] | None = None) -> str:
    """The text of `sources` (paths, globs, fsspec URLs), joined with a blank line.

    Each file must be non-empty (not only whitespace) UTF-8 text; a missing source, a glob
    matching nothing, an empty file or bad UTF-8 is a TextSourceError naming the file.
    """
    from fsspec.utils import infer_compression

    if isinstance(sources, (str, os.PathLike)):
        sources = [os.fspath(sources)]
    if not sources:
        raise TextSourceError("no text sources given")
    parts = []
    for source in sources:
        source = str(source)
        fs, paths = _expand(source, dict(storage_options or {}))
        is_glob = any(c in source for c in _MAGIC)
        for p in paths:
            name = f"{p!r} (from {source!r})" if is_glob else repr(source)
            try:
                with fs.open(p, "rb", compression=infer_compression(p)) as f:
                    data = f.read()
            except FileNotFoundError:
                raise TextSourceError(f"text source {name} does not exist") from None
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError as e:
                raise TextSourceError(f"text source {name} is not UTF-8 text (byte {e.start}: "
                                      f"{e.reason})") from None
            if not text.strip():
                raise TextSourceError(f"text source {name} is empty")
            parts.append(text)
    return "\n\n".join(parts)


# -- tokenization -------------------------------------------------------------------------------


class TokenizerError(UserError, ValueError):
    """A tokenizer that cannot be loaded or fails on the text; the message names its folder."""


def _is_library_failure(e: BaseException) -> bool:
    """An error of the tokenizer libraries on bad input: the Rust `tokenizers` raises bare
    Exceptions, and its panics (pyo3's PanicException) derive from BaseException only."""
    return isinstance(e, Exception) or type(e).__name__ == "PanicException"


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:300]}" if text else type(e).__name__


def load_tokenizer(folder: str | os.PathLike[str], *, gguf_file: str | None = None,
                   where: str | None = None) -> Any:
    """The AutoTokenizer of a local model folder: never remote code, never the Hub. Its JSON
    files are checked first (size, UTF-8, nesting); any failure while loading, a panic of the
    Rust library included, is a TokenizerError naming the folder."""
    from transformers import AutoTokenizer

    from pipeline.models.folder_checks import check_json_files

    where = where or repr(os.fspath(folder))
    check_json_files(folder)
    kw: dict[str, Any] = {"local_files_only": True}
    if gguf_file is not None:
        kw["gguf_file"] = gguf_file
    try:
        return AutoTokenizer.from_pretrained(os.fspath(folder), trust_remote_code=False, **kw)
    except UserError:
        raise
    except BaseException as e:
        if not _is_library_failure(e):
            raise
        raise TokenizerError(f"{where}: cannot load its tokenizer ({_first_line(e)})") from None


def _guarded(tokenizer: Any, fn: Any, *args: Any, **kw: Any) -> Any:
    """fn(*args, **kw) with the tokenizer libraries' failures as one TokenizerError."""
    try:
        return fn(*args, **kw)
    except BaseException as e:
        if not _is_library_failure(e) or isinstance(e, UserError):
            raise
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise TokenizerError(f"the tokenizer of {name!r} failed on the text "
                             f"({_first_line(e)})") from None


def _call_ids(tokenizer: Any, text: str, add_special_tokens: bool) -> list[int]:
    # verbose=False: no "sequence longer than the model's maximum" warning for a whole corpus.
    return tokenizer(text, add_special_tokens=add_special_tokens, verbose=False)["input_ids"]


def _encoding_arrays(enc: Any, offset: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    ids = np.asarray(enc.ids, dtype=np.int64)
    offs = np.asarray(enc.offsets, dtype=np.int64).reshape(-1, 2) + offset
    return ids, offs[:, 0], offs[:, 1]


def _sync(a: tuple[np.ndarray, ...], b: tuple[np.ndarray, ...], cut: int, limit: int,
          agree: int) -> tuple[int, int] | None:
    """Indices (i in piece a, j in piece b) of the first token starting at some q ≥ cut where
    both pieces' tokenizations agree (ids and offsets) for `agree` tokens ending ≤ limit."""
    ids_a, st_a, en_a = a
    ids_b, st_b, en_b = b
    j0 = int(np.searchsorted(st_b, cut, side="left"))
    for j in range(j0, min(j0 + 512, len(ids_b) - agree + 1)):
        q = st_b[j]
        if j > 0 and st_b[j - 1] == q:
            continue  # not the first token starting at q (bytes of one character)
        i = int(np.searchsorted(st_a, q, side="left"))
        if i + agree > len(ids_a) or st_a[i] != q or en_a[i + agree - 1] > limit:
            continue
        if (np.array_equal(ids_a[i : i + agree], ids_b[j : j + agree])
                and np.array_equal(st_a[i : i + agree], st_b[j : j + agree])
                and np.array_equal(en_a[i : i + agree], en_b[j : j + agree])):
            return i, j
    return None


def _pieces(backend: Any, text: str, piece: int, margin: int, agree: int) -> np.ndarray | None:
    """Tokenize overlapping pieces in parallel and stitch them where neighbours agree; None if
    some boundary finds no agreement (the caller then tokenizes the whole text)."""
    n = len(text)
    k = -(-n // piece)
    spans = [(max(0, i * piece - margin), min(n, (i + 1) * piece + margin)) for i in range(k)]
    encs = backend.encode_batch([text[a:b] for a, b in spans], add_special_tokens=False)
    out, start, prev = [], 0, None
    for idx, (enc, (a, _)) in enumerate(zip(encs, spans, strict=True)):
        cur = _encoding_arrays(enc, a)
        if np.any(np.diff(cur[1]) < 0):
            return None  # offsets not monotonic: cannot stitch safely
        if prev is not None:
            cut = idx * piece
            got = _sync(prev, cur, cut, cut + margin // 2, agree)
            if got is None or got[0] < start:
                return None
            out.append(prev[0][start : got[0]])
            start = got[1]
        prev = cur
    assert prev is not None
    out.append(prev[0][start:])
    return np.concatenate(out)


def token_ids(
    tokenizer: Any,
    text: str,
    *,
    add_special_tokens: bool = False,
    piece_chars: int = 1 << 20,
) -> torch.Tensor:
    """The token ids of the whole text: int64 [T].

    Texts over 2·piece_chars characters are tokenized as overlapping pieces in parallel (fast
    tokenizers only) and stitched where neighbouring pieces agree on 32 tokens (ids and
    offsets); if any boundary does not agree, or the tokenizer's own call differs from its
    backend on a sample, the whole text is tokenized in one call. Either way the result equals
    `tokenizer(text, add_special_tokens=...)["input_ids"]`.
    """
    return _guarded(tokenizer, _token_ids, tokenizer, text, add_special_tokens, piece_chars)


def _token_ids(tokenizer: Any, text: str, add_special_tokens: bool,
               piece_chars: int) -> torch.Tensor:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if len(text) > 2 * piece_chars and not add_special_tokens and backend is not None:
        sample = text[: min(len(text), 4096)]
        if backend.encode(sample, add_special_tokens=False).ids == _call_ids(tokenizer, sample,
                                                                                 False):
            margin = max(64, min(8192, piece_chars // 4))
            ids = _pieces(backend, text, piece_chars, margin, agree=32)
            if ids is not None:
                return torch.from_numpy(ids)
    return torch.tensor(_call_ids(tokenizer, text, add_special_tokens), dtype=torch.int64)


def _ids(tokenizer: Any, text: str | torch.Tensor, add_special_tokens: bool) -> torch.Tensor:
    if isinstance(text, torch.Tensor):
        if text.dim() != 1:
            raise ValueError(f"token ids must be 1-D, got shape {tuple(text.shape)}")
        return text.long()
    return token_ids(tokenizer, text, add_special_tokens=add_special_tokens)


def _check(seq_len: int, total: int) -> None:
    if seq_len < 2:
        raise ValueError(f"seq_len must be ≥ 2 (a window predicts seq_len − 1 tokens), got {seq_len}")
    if total < seq_len:
        raise TextSourceError(f"the text has {total} tokens, fewer than one window of "
                              f"seq_len={seq_len}; give more text or a shorter seq_len")


def calibration_windows(
    tokenizer: Any,
    text: str | torch.Tensor,
    n: int,
    seq_len: int,
    seed: int,
    *,
    add_special_tokens: bool = False,
) -> torch.Tensor:
    """`n` windows of `seq_len` consecutive tokens at seeded uniformly random starts.

    text: the text, or its token ids (int64 [T]) to skip tokenizing again. Starts are drawn
    with `np.random.default_rng(seed).choice(T − seq_len + 1, n, replace=n > T − seq_len + 1)`:
    distinct when there are enough starts. Returns int64 [n, seq_len], in the order drawn.
    """
    if n < 1:
        raise ValueError(f"n must be ≥ 1, got {n}")
    ids = _ids(tokenizer, text, add_special_tokens)
    _check(seq_len, len(ids))
    starts_n = len(ids) - seq_len + 1
    rng = np.random.default_rng(seed)
    starts = rng.choice(starts_n, size=n, replace=n > starts_n)
    index = torch.from_numpy(starts.astype(np.int64))[:, None] + torch.arange(seq_len)
    return ids[index]


def eval_windows(
    tokenizer: Any,
    text: str | torch.Tensor,
    seq_len: int,
    max_windows: int | None = None,
    *,
    add_special_tokens: bool = False,
) -> torch.Tensor:
    """Non-overlapping consecutive windows from the first token: int64 [m, seq_len] with
    m = min(T // seq_len, max_windows); the tail shorter than seq_len is dropped."""
    ids = _ids(tokenizer, text, add_special_tokens)
    _check(seq_len, len(ids))
    m = len(ids) // seq_len
    if max_windows is not None:
        if max_windows < 1:
            raise ValueError(f"max_windows must be ≥ 1, got {max_windows}")
        m = min(m, max_windows)
    return ids[: m * seq_len].reshape(m, seq_len).clone()


def split_heldout(ids: torch.Tensor, seq_len: int, fraction: float = 0.1,
                  source: str = "the calibration text") -> tuple[torch.Tensor, torch.Tensor]:
    """(calibration part, held-out tail) of token ids int64 [T], for a run that names no eval
    text: the tail is the last max(1, ⌊fraction·T / seq_len⌋) whole windows of `seq_len`
    tokens, the calibration windows are drawn from the rest (T − tail ≥ seq_len tokens).
    A TextSourceError naming `source` if T < 2·seq_len."""
    total = len(ids)
    if total < 2 * seq_len:
        raise TextSourceError(
            f"{source} has {total} tokens; with no data.eval, hwq holds out its tail for "
            f"evaluation and needs at least 2 windows of data.seq_len={seq_len} tokens "
            f"({2 * seq_len}): give more text, a shorter data.seq_len, or data.eval texts")
    held = seq_len * max(1, int(fraction * total) // seq_len)
    held = min(held, seq_len * ((total - seq_len) // seq_len))
    return ids[: total - held], ids[total - held :]
