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

__all__ = ["OutputError", "add_commands", "parse_size"]

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


def _inspect(args) -> int:
    import json

    from pipeline.encode.container import format_inspect

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
    d.add_argument("--out", required=True,
                   help="output .safetensors path (its folder must exist)")
    d.add_argument("--tensor", action="append", metavar="NAME",
                   help="decode only this tensor (repeatable)")
    d.add_argument("--endpoint-url", metavar="URL")
    _limits(d)
    d.set_defaults(func=_decode)

    i = sub.add_parser("inspect", help="what a .hwq file holds and where its bits go",
                       description="One row per tensor, codebook and code table: kept "
                       "fraction, bits per weight, share of the file; totals, and the decoded "
                       "size against the decode limit. Reads the header only.")
    i.add_argument("file", help="a .hwq file or URL")
    i.add_argument("--json", action="store_true", help="rows as JSON")
    i.add_argument("--endpoint-url", metavar="URL")
    _limits(i)
    i.set_defaults(func=_inspect)
