"""`hwq decode` and `hwq inspect`: the .hwq file from the command line."""

from __future__ import annotations

import os

__all__ = ["add_commands"]


def _opts(args) -> dict:
    return {"client_kwargs": {"endpoint_url": args.endpoint_url}} if args.endpoint_url else {}


def _decode(args) -> int:
    import numpy as np
    import torch
    from safetensors.torch import save_file

    from pipeline.encode.container import HwqReader

    reader = HwqReader(args.file, storage_options=_opts(args))
    names = args.tensor or None
    tensors = {n: torch.from_numpy(np.ascontiguousarray(a)) for n, a in reader.read(names).items()}
    tmp = f"{args.out}.tmp"  # written whole, then renamed: no half file under the real name
    save_file(tensors, tmp, metadata={"source": str(args.file)})
    os.replace(tmp, args.out)
    total = sum(t.numel() for t in tensors.values())
    print(f"{args.out}: {len(tensors)} tensors, {total:,} values "
          f"(read {reader.bytes_read:,} of {reader.file_bytes:,} bytes)")
    return 0


def _inspect(args) -> int:
    import json

    from pipeline.encode.container import format_inspect, inspect_hwq

    rows = inspect_hwq(args.file, storage_options=_opts(args))
    print(json.dumps(rows, indent=2) if args.json else format_inspect(rows))
    return 0


def add_commands(sub) -> None:
    d = sub.add_parser("decode", help="decode a .hwq file into dense safetensors",
                       description="Decode a .hwq file (local path or s3:// URL) into a dense "
                       "safetensors file loadable as a model checkpoint (model.checkpoint). "
                       "With --tensor, only those tensors' byte ranges are read.")
    d.add_argument("file", help="a .hwq file or URL")
    d.add_argument("--out", required=True, help="output .safetensors path")
    d.add_argument("--tensor", action="append", metavar="NAME",
                   help="decode only this tensor (repeatable)")
    d.add_argument("--endpoint-url", metavar="URL")
    d.set_defaults(func=_decode)

    i = sub.add_parser("inspect", help="what a .hwq file holds and where its bits go",
                       description="One row per tensor, codebook and code table: kept "
                       "fraction, bits per weight, share of the file; totals. Reads the header "
                       "only.")
    i.add_argument("file", help="a .hwq file or URL")
    i.add_argument("--json", action="store_true", help="rows as JSON")
    i.add_argument("--endpoint-url", metavar="URL")
    i.set_defaults(func=_inspect)
