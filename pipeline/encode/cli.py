"""`hwq decode` and `hwq inspect`: the .hwq file from the command line.

Every problem a user can fix (a hostile or corrupt file, a limit, an unknown tensor name, an
output folder that does not exist) is a ValueError or FileNotFoundError, which `hwq` prints as
one `hwq: error: ...` line with exit status 2.
"""

from __future__ import annotations

import argparse
import os
import re
import uuid

__all__ = ["OutputError", "add_commands", "hf_files", "parse_size"]

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


class OutputError(ValueError):
    """The decoded file cannot be written (a user error: one line, exit status 2)."""


def parse_size(text: str) -> int:
    """Bytes from '123', '64M', '8G', '8GiB', '1.5T' (binary units), for size options."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 20000000000, 16G, 512M)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def _opts(args) -> dict:
    return {"client_kwargs": {"endpoint_url": args.endpoint_url}} if args.endpoint_url else {}


def _reader(args):
    from pipeline.encode.container import DEFAULT_MAX_HEADER_BYTES, HwqReader

    return HwqReader(
        args.file, storage_options=_opts(args), max_output_bytes=args.max_output_bytes,
        max_header_bytes=(DEFAULT_MAX_HEADER_BYTES if args.max_header_bytes is None
                          else args.max_header_bytes),
    )  # fmt: skip


def _output_folder(out: str) -> str:
    """The folder ``out`` goes into; refuses, before any decoding, one that cannot take it."""
    folder = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"output folder {folder} does not exist (create it first)")
    if os.path.isdir(out):
        raise OutputError(f"--out {out} is a folder; give a file path such as model.safetensors")
    if os.path.lexists(out) and not os.path.islink(out) and not os.path.isfile(out):
        # A device, FIFO or socket: the rename below would replace it with a regular file
        # (as root, /dev/null itself). A link is replaced, never written through.
        raise OutputError(f"--out {out} exists and is not a regular file; give a file path")
    return folder


def _decode(args) -> int:
    import numpy as np
    from safetensors import SafetensorError
    from safetensors.numpy import save_file  # the same file as through torch, without torch

    folder = _output_folder(args.out)
    reader = _reader(args)
    names = args.tensor or None
    # reshape: ascontiguousarray turns a 0-d tensor into shape (1,).
    tensors = {n: np.ascontiguousarray(a).reshape(a.shape) for n, a in reader.read(names).items()}
    # A unique temporary in the same folder, renamed over the output once complete and on
    # disk: concurrent decodes to one path never share a temporary, and the output name
    # only ever holds a whole file.
    tmp = os.path.join(folder, f"{os.path.basename(args.out)}.tmp-{uuid.uuid4().hex}")
    try:
        save_file(tensors, tmp, metadata={"source": str(args.file)})
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        # The umask's mode, as any file the user writes (the temporary was made private).
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)
        os.replace(tmp, args.out)
    except (OSError, SafetensorError) as exc:
        raise OutputError(f"cannot write {args.out}: {exc}") from exc
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    total = sum(a.size for a in tensors.values())
    print(f"{args.out}: {len(tensors)} tensors, {total:,} values "
          f"(read {reader.bytes_read:,} of {reader.file_bytes:,} bytes)")
    return 0


_HF_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
             "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt",
             "chat_template.jinja", "added_tokens.json")


def _hf_files(args) -> dict[str, bytes]:
    """The non-weight files of the model folder for --hf-out (see :func:`hf_files`)."""
    return hf_files(args.file, args.hf_files, _opts(args))


def hf_files(file: str, folder: str | None = None, storage_options: dict | None = None, *,
             option: str = "--hf-out", folder_option: str = "--hf-files") -> dict[str, bytes]:
    """The non-weight files of the model folder (config.json, tokenizer files): from `folder`,
    else the `hf/` folder the encode stage writes beside the .hwq `file`. Each must be a
    regular file of at most 64 MiB (a folder or FIFO in its place is one error line, never a
    hang). `option`/`folder_option` name the command's flags in the errors."""
    import fsspec

    from pipeline.encode.limits import read_small_file

    src = folder or (file.rsplit("/", 1)[0] + "/hf" if "/" in file else "hf")
    fs, path = fsspec.core.url_to_fs(src, **(storage_options or {}))
    if not fs.isdir(path) or not fs.exists(f"{path}/config.json"):
        raise FileNotFoundError(f"{option} needs the model's config.json and tokenizer files: "
                                f"{src} holds no config.json (the encode stage writes them "
                                f"to hf/ beside model.hwq; or give {folder_option} FOLDER)")
    out = {}
    for name in _HF_FILES:
        if fs.exists(f"{path}/{name}"):
            try:
                out[name] = read_small_file(fs, f"{path}/{name}", 64 << 20)
            except (ValueError, OSError) as exc:
                raise OutputError(f"{option}: cannot use {src}/{name}: "
                                  f"{exc.strerror if isinstance(exc, OSError) else exc} (the "
                                  "model folder's config and tokenizer files must be regular "
                                  "files)") from exc
    return out


def _existing_ancestor(path: str) -> str:
    """The nearest folder above ``path`` that exists (``path``'s own parent in most cases)."""
    anc = os.path.dirname(path)
    while not os.path.lexists(anc) and os.path.dirname(anc) != anc:
        anc = os.path.dirname(anc)
    return anc


def _decode_hf(args) -> int:
    """`--hf-out DIR`: a Hugging Face model folder (config, tokenizer, model.safetensors with
    every tensor in its stored dtype) that AutoModelForCausalLM.from_pretrained loads."""
    import shutil

    import numpy as np
    import torch
    from safetensors.torch import save_file

    out = os.path.abspath(args.hf_out)
    parent = os.path.dirname(out)
    # Missing folders above the output are created (after decoding), under a folder.
    anc = _existing_ancestor(out)
    if not os.path.isdir(anc):
        raise OutputError(f"--hf-out {args.hf_out}: {anc} is not a folder")
    if os.path.lexists(out) and (not os.path.isdir(out) or os.path.islink(out)
                                 or os.listdir(out)):
        raise OutputError(f"--hf-out {args.hf_out} exists and is not an empty folder")
    reader = _reader(args)  # the header first: a bad .hwq is the first thing to say
    files = _hf_files(args)
    tensors = {}
    for n, a in reader.read().items():
        t = torch.from_numpy(np.ascontiguousarray(a).reshape(a.shape))
        if reader.dtype(n) == "bfloat16":
            t = t.view(torch.int16).view(torch.bfloat16)
        tensors[n] = t
    tmp = os.path.join(parent, f".{os.path.basename(out)}.tmp-{uuid.uuid4().hex}")
    try:
        os.makedirs(parent, exist_ok=True)
        os.mkdir(tmp)
    except OSError as exc:
        raise OutputError(f"cannot write {args.hf_out}: {exc}") from exc
    try:
        save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        for name, data in files.items():
            with open(os.path.join(tmp, name), "wb") as f:
                f.write(data)
        mask = os.umask(0)  # the umask's modes, as any folder and file the user writes
        os.umask(mask)
        for name in os.listdir(tmp):
            os.chmod(os.path.join(tmp, name), 0o666 & ~mask)
        os.chmod(tmp, 0o777 & ~mask)
        if os.path.isdir(out):
            os.rmdir(out)
        os.replace(tmp, out)
    except OSError as exc:
        raise OutputError(f"cannot write {args.hf_out}: {exc}") from exc
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
    print(f"{args.hf_out}: a model folder with {len(tensors)} tensors and {len(files)} config "
          f"and tokenizer files (read {reader.bytes_read:,} of {reader.file_bytes:,} bytes)")
    return 0


def _decode_cmd(args) -> int:
    if (args.out is None) == (args.hf_out is None):
        raise OutputError("give exactly one of --out FILE.safetensors and --hf-out FOLDER")
    if args.hf_out is not None:
        if args.tensor:
            raise OutputError("--hf-out writes the whole model; --tensor is for --out")
        return _decode_hf(args)
    return _decode(args)


def _inspect(args) -> int:
    import json

    from pipeline.encode.inspection import format_inspect

    reader = _reader(args)
    rows = reader.inspect()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(format_inspect(rows))
    # Header only: nothing is decoded, so say what a decode of it all would meet.
    total = reader.decoded_bytes()
    limit, why = reader.output_limit()
    ratio = total / reader.file_bytes if reader.file_bytes else 0.0
    line = f"decoded: {total:,} bytes ({ratio:,.1f}× the file)"
    if total > limit:
        line += (f"; above the {limit:,}-byte cap ({why}): hwq decode refuses it unless given "
                 f"--max-output-bytes {total}")
    print(line)
    return 0


def _limits(p) -> None:
    p.add_argument("--max-output-bytes", type=parse_size, metavar="SIZE",
                   help="accept up to SIZE bytes of dense tensors (e.g. 20G) for a file you "
                   "trust (default: 8 GiB, and at most 4096x the file size, at least 64 MiB)")
    p.add_argument("--max-header-bytes", type=parse_size, metavar="SIZE",
                   help="accept a header up to SIZE bytes, stored or inflated (default 16M)")


def add_commands(sub) -> None:
    d = sub.add_parser("decode", help="decode a .hwq file into dense safetensors",
                       description="Decode a .hwq file (local path or s3:// URL) into a dense "
                       "safetensors file loadable as a model checkpoint (model.checkpoint). "
                       "With --tensor, only those tensors' byte ranges are read. The file is "
                       "untrusted: a decode larger than the limits is refused before anything "
                       "is allocated.")
    d.add_argument("file", help="a .hwq file or URL")
    d.add_argument("--out", help="output .safetensors path (its folder must exist)")
    d.add_argument("--hf-out", metavar="FOLDER",
                   help="write a Hugging Face model folder instead (config, tokenizer, "
                   "model.safetensors in the source dtype) that transformers' "
                   "AutoModelForCausalLM.from_pretrained(FOLDER) loads")
    d.add_argument("--hf-files", metavar="FOLDER",
                   help="with --hf-out: where config.json and the tokenizer files are "
                   "(default: the hf/ folder beside the .hwq file, as the encode stage writes)")
    d.add_argument("--tensor", action="append", metavar="NAME",
                   help="decode only this tensor (repeatable)")
    d.add_argument("--endpoint-url", metavar="URL", help="S3-compatible endpoint for an s3:// file")
    _limits(d)
    d.set_defaults(func=_decode_cmd)

    i = sub.add_parser("inspect", help="what a .hwq file holds and where its bits go",
                       description="One row per tensor, codebook and code table: kept "
                       "fraction, bits per weight, share of the file; totals, and the decoded "
                       "size against the decode limit. Reads the header only.")
    i.add_argument("file", help="a .hwq file or URL")
    i.add_argument("--json", action="store_true", help="rows as JSON")
    i.add_argument("--endpoint-url", metavar="URL", help="S3-compatible endpoint for an s3:// file")
    _limits(i)
    i.set_defaults(func=_inspect)
