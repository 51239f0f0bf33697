"""The lookup-table kernels (csrc/lut_gemv.cpp): built once with the machine's C++ compiler,
cached under ``$HWQ_CACHE/runtime/`` by a digest of the source, the flags and the compiler,
loaded with ctypes.

Without a compiler (or when the build fails) the same products are computed with torch, after
one warning line; the answers are the reference path's, never a silently different one.
`python -m pipeline.runtime.kernels --build` builds the library (`make setup` runs it).
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import uuid
from functools import lru_cache
from pathlib import Path

import torch

__all__ = ["Kernels", "bind", "build", "kernels", "lut_matmul"]

log = logging.getLogger(__name__)

SOURCE = Path(__file__).resolve().parent / "csrc" / "lut_gemv.cpp"
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17")
ABI_VERSION = 2

_P = ctypes.c_void_p
_I = ctypes.c_int64
_SIGNATURES = {
    "hwq_abi_version": ([], ctypes.c_int),
    "hwq_has_avx2": ([], ctypes.c_int),
    "hwq_ref": ([_P, _I, _I, _P, _I, _I, ctypes.c_int, _P, _I, _I, _P, ctypes.c_int], None),
    "hwq_q8": (
        [_P, _I, _I, _P, _I, ctypes.c_int, _P, _P, _I, _P, ctypes.c_int, ctypes.c_int],
        None,
    ),
    "hwq_f32a": ([_P, _I, _I, _P, _I, ctypes.c_int, _P, _P, _I, _P, ctypes.c_int], None),
    "hwq_pack": ([_P, _I, _I, ctypes.c_int, _P, ctypes.c_int], None),
    "hwq_scatter_u8": ([_P, _P, _I, _P, _I], ctypes.c_int64),
}


def _cache_dir() -> Path:
    return Path(os.environ.get("HWQ_CACHE") or Path.cwd() / ".cache").resolve() / "runtime"


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


def _library_path(cxx: str) -> Path:
    """Where the build of this source with these flags and this compiler lives."""
    try:
        version = subprocess.run(
            [cxx, "--version"], capture_output=True, text=True, timeout=30
        ).stdout
    except (OSError, subprocess.SubprocessError):
        version = ""
    h = hashlib.sha256(SOURCE.read_bytes())
    # -march=native: a build is for this CPU's instruction set; a cache folder shared with
    # another machine (an image, a network home) must not hand it a library it cannot run.
    h.update(repr((FLAGS, cxx, version, _cpu_flags())).encode())
    return _cache_dir() / f"lut_gemv-{h.hexdigest()[:16]}.so"


def _cpu_flags() -> str:
    """The instruction-set flags of this CPU (Linux), else the machine name."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.machine()


def build(*, quiet: bool = True) -> Path:
    """The cached shared library, compiled first if missing (a temporary renamed into place,
    so a concurrent build or a killed one never leaves a half-written library). Raises
    RuntimeError when there is no compiler or the compile fails."""
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler (g++ or $CXX) on PATH")
    out = _library_path(cxx)
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex}")
    try:
        r = subprocess.run(
            [cxx, *FLAGS, "-o", str(tmp), str(SOURCE)], capture_output=True, text=True, timeout=300
        )
        if r.returncode != 0:
            raise RuntimeError(
                f"{cxx} failed to compile {SOURCE.name}: {(r.stderr or r.stdout).strip()[-2000:]}"
            )
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    if not quiet:
        print(f"built {out}")
    return out


class Kernels:
    """The loaded library: ``lib`` (ctypes) and ``avx2`` (the build has the SIMD path)."""

    def __init__(self, path: Path):
        self.path = path
        self.lib = ctypes.CDLL(str(path))
        for name, (args, res) in _SIGNATURES.items():
            fn = getattr(self.lib, name)
            fn.argtypes, fn.restype = args, res
        if self.lib.hwq_abi_version() != ABI_VERSION:
            raise RuntimeError(
                f"{path}: kernel ABI {self.lib.hwq_abi_version()}, expected {ABI_VERSION}"
            )
        self.avx2 = bool(self.lib.hwq_has_avx2())


@lru_cache(maxsize=1)
def kernels() -> Kernels | None:
    """The compiled kernels, or None (after one warning line) when they cannot be built."""
    try:
        return Kernels(build())
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        log.warning(
            "hwq runtime: the C++ lookup-table kernels are unavailable (%s); using "
            "the torch fallback (exact, dense tiles, slower)",
            exc,
        )
        return None


_ONE_THREAD_WEIGHTS = 1 << 18  # products below this many weight-tokens run on one thread


def _ptr(t: torch.Tensor) -> int:
    return t.data_ptr()


def _threads(threads: int | None) -> int:
    return max(1, int(threads)) if threads else max(1, torch.get_num_threads())


def lut_matmul(
    x: torch.Tensor, p, *, path: str, threads: int | None = None, lib: Kernels | None = None
) -> torch.Tensor:
    """y [b, rows] float32 = x [b, cols] float32 · Ŵᵀ for a packed matrix ``p``
    (:class:`pipeline.runtime.transcode.Packed`).

    path: "ref" (fp32 levels, fp32 accumulation), "q8" (int8 levels and activations, the
    fast path; 2-, 3- and 4-bit matrices whose groups are whole 32-column blocks, else "ref"),
    "f32a" (int8 levels, fp32 activations), "q8_scalar" (q8 without SIMD, for tests).
    lib: the kernels to use (default: the cached build; None there: torch fallback).
    """
    return bind(p, path=path, threads=threads, lib=lib)(x)


def bind(p, *, path: str, threads: int | None = None, lib: Kernels | None = None):
    """``call(x) -> y``: :func:`lut_matmul` with ``p``'s arguments fixed once. A decoder
    Linear runs ~100 products a token of ~50 µs each, so the Python side is kept to one
    ctypes call and one output allocation (the bound function keeps ``p``'s tensors alive;
    they never move on the CPU)."""
    k = kernels() if lib is None else lib
    if path != "ref" and not p.q8_ok:
        path = "ref"
    if path not in ("ref", "q8", "q8_scalar", "f32a"):
        raise ValueError(f"unknown kernel path {path!r}")
    rows, cols = p.rows, p.cols
    if k is None:
        fn, args = None, ()
    elif path == "ref":
        fn = k.lib.hwq_ref
        args = (_ptr(p.idx), rows, p.idx.shape[1], p.bits, _ptr(p.tables), p.tables.shape[1],
                p.group_size)  # fmt: skip
    elif path == "f32a":
        fn = k.lib.hwq_f32a
        args = (_ptr(p.idx), rows, p.bits, _ptr(p.tq), _ptr(p.ts), p.groups)
    else:
        fn = k.lib.hwq_q8
        args = (_ptr(p.idx), rows, p.bits, _ptr(p.tq), _ptr(p.ts), p.groups)
    tail = (int(path == "q8_scalar"),) if path.startswith("q8") else ()
    # A small product runs on one thread: handing half of it to the pool's worker costs more
    # than it saves below ~256 K weights (SmolLM2's 192×576 k/v, ~20 µs). Measured on SmolLM2
    # at 2 threads: 29 tok/s with this threshold, 20 with 2 M (only the head and gate/up on
    # two threads), 17 with 64 K. (With an OpenMP team, whose wake-up cost ~100 µs, 2 M was
    # the best.)
    one_thread_below = -(-_ONE_THREAD_WEIGHTS // max(1, rows * cols))

    def call(x: torch.Tensor) -> torch.Tensor:
        x = x.detach().to(torch.float32).contiguous()
        b = x.shape[0]
        if x.shape[1] != cols:
            raise ValueError(f"input has {x.shape[1]} features, the matrix {cols}")
        y = torch.empty(b, rows, dtype=torch.float32)
        if b == 0 or rows == 0:
            return y
        if fn is None:
            return _torch_lut(x, p)
        nt = 1 if b < one_thread_below else _threads(threads)  # None: torch's, now
        fn(x.data_ptr(), b, cols, *args, y.data_ptr(), nt, *tail)
        return y

    return call


def _torch_lut(x: torch.Tensor, p, tile_rows: int = 256) -> torch.Tensor:
    """The reference products with torch, a tile of rows of Ŵ at a time."""
    out = []
    for r0 in range(0, p.rows, tile_rows):
        out.append(x @ p.dense_rows(r0, min(r0 + tile_rows, p.rows)).T)
    return torch.cat(out, dim=1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--build", action="store_true", help="compile the kernels (cached)")
    args = ap.parse_args(argv)
    if args.build:
        try:
            path = build(quiet=False)
        except RuntimeError as exc:
            # Not fatal for setup: the runtime falls back to torch, and says so.
            print(
                f"hwq runtime kernels not built ({exc}); the runtime will use torch",
                file=sys.stderr,
            )
            return 0
        print(f"{path}: avx2={Kernels(path).avx2}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
