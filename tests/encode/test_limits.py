"""The limits of the .hwq reader (docs/FORMAT.md, section 6) and `hwq decode`/`hwq inspect`
on hostile files and bad arguments: refused early, quickly, without large allocations, in
one `hwq: error:` line with exit status 2, and no output file left behind."""

from __future__ import annotations

import copy
import os
import threading
import time
import tracemalloc
import zlib

import hostile_files as hf
import numpy as np
import pytest

from pipeline.cli import main
from pipeline.encode import HwqFormatError, HwqReader, TensorEntry, read_hwq, write_hwq
from pipeline.encode.container import (
    DEFAULT_MAX_HEADER_BYTES,
    DEFAULT_MAX_OUTPUT_RATIO,
    UnknownTensorError,
)
from pipeline.encode.container.header import OUTPUT_FLOOR_BYTES


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """(folder, valid base files, hostile files) built once."""
    d = tmp_path_factory.mktemp("limits")
    bases = hf.base_files(d)
    return d, bases, hf.bombs(bases["mixed-network"])


def _refused_fast(path, match, seconds=1.0, peak_mib=40, **kw):
    """read_hwq refuses within ``seconds`` and ``peak_mib`` of Python/numpy allocations."""
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        with pytest.raises(HwqFormatError, match=match) as info:
            read_hwq(path, **kw)
    finally:
        dt = time.perf_counter() - t0
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert dt < seconds, dt
    assert peak < peak_mib << 20, peak
    return str(info.value)


def _write(d, name, blob):
    p = d / name
    p.write_bytes(blob)
    return p


def test_small_file_declaring_a_huge_output_is_refused_early(files):
    d, _, bombs = files
    for name in ("pruned-2GiB", "pruned-16GiB", "pruned-16GiB-f64", "2GiB-compressed-header"):
        blob = bombs[name][0]
        assert len(blob) < 8000
        msg = _refused_fast(_write(d, f"{name}.hwq", blob), "max_output_bytes")
        # What was hit, why, and how to raise it.
        assert f"{DEFAULT_MAX_OUTPUT_RATIO}× the file size" in msg and "--max-output-bytes" in msg
        assert "trust" in msg


def test_many_tensors_over_the_total_cap_are_refused(files):
    d, _, bombs = files
    p = _write(d, "8x2.hwq", bombs["8x2GiB"][0])
    total = HwqReader(p).decoded_bytes()
    assert 16 << 30 < total < (16 << 30) + 10_000
    _refused_fast(p, f"would produce {total:,} bytes")
    # An explicit cap is the only cap, and still applies to the total.
    msg = _refused_fast(p, "above the 10,737,418,240-byte cap", max_output_bytes=10 << 30)
    assert f"max_output_bytes={total}" in msg and "(max_output_bytes)" in msg
    # Each tensor under a per-tensor cap, together over the total.
    blob, kw = bombs["10x-just-under-tensor-cap"]
    _refused_fast(_write(d, "10x.hwq", blob), "max_output_bytes", **kw)
    # Each under the 64 MiB floor, together over it.
    _refused_fast(_write(d, "40x.hwq", bombs["40x60MiB"][0]), "max_output_bytes")
    # A subset of the file is checked on its own: one 2 GiB tensor still too much.
    with pytest.raises(HwqFormatError, match="1 tensor"):
        HwqReader(p).read(["dead3"])


def test_zlib_header_bomb_is_refused_quickly(files):
    d, _, bombs = files
    blob = bombs["zlib-bomb-900MiB"][0]
    assert len(blob) < 1_000_000  # ~900 KB inflating to 900 MiB
    msg = _refused_fast(_write(d, "zb.hwq", blob), "header limit", peak_mib=60)
    assert "max_header_bytes" in msg and "--max-header-bytes" in msg
    _refused_fast(_write(d, "zb2.hwq", bombs["zlib-bomb-just-over"][0]), "inflates past",
                  peak_mib=60)
    _refused_fast(_write(d, "big.hwq", bombs["header-17MiB"][0]), "header is 17,", peak_mib=5)


def test_max_header_bytes_lets_a_large_trusted_header_through(files):
    d, bases, _ = files
    h, payload = hf.split(bases["mixed-network"])
    h["metadata"] = {"notes": "x" * (DEFAULT_MAX_HEADER_BYTES + 10)}
    p = _write(d, "bighead.hwq", hf.join(h, payload, compressed=True))
    with pytest.raises(HwqFormatError, match="header limit"):
        HwqReader(p)
    r = HwqReader(p, max_header_bytes=32 << 20)
    assert len(r.metadata["notes"]) == DEFAULT_MAX_HEADER_BYTES + 10
    assert set(r.read()) == set(r.names)


def test_deep_and_odd_json_headers_are_refused(files):
    d, _, bombs = files
    for name, match in [("deep-json", "recursion"), ("deep-json-compressed", "recursion"),
                        ("deep-objects", "recursion"), ("huge-int", "digits"),
                        ("numel-2^60", "2\\^48"), ("chunk-10^12-symbols", "symbols"),
                        ("dense-2^30-symbols", "symbols"), ("overlapping-sections", "overlaps"),
                        ("offset-past-payload", "offset"), ("unused-2^24-table", "no stream")]:
        _refused_fast(_write(d, f"{name}.hwq", bombs[name][0]), match, peak_mib=80)


@pytest.fixture(scope="module")
def trusted_sparse(tmp_path_factory):
    """A legitimate 80 MB float32 tensor with 3 kept weights in a ~600-byte file: above the
    default ratio limit (the 64 MiB floor here), fine when the caller raises the limit."""
    d = tmp_path_factory.mktemp("trusted")
    numel = 20_000_000
    mask = np.zeros(numel, bool)
    mask[[3, 1000, numel - 1]] = True
    cb = {"c": np.array([-1.5, 2.5], np.float32)}
    write_hwq(d / "t.hwq", [TensorEntry.quantized("w", (numel,), np.array([1, 0, 1]), "c",
                                                  mask=mask)], cb)  # fmt: skip
    return d, d / "t.hwq", numel


def test_max_output_bytes_lets_a_trusted_large_file_through(trusted_sparse):
    _, p, numel = trusted_sparse
    size = os.path.getsize(p)
    assert DEFAULT_MAX_OUTPUT_RATIO * size < OUTPUT_FLOOR_BYTES < 4 * numel
    msg = _refused_fast(p, "max_output_bytes=80000000", peak_mib=5)
    assert "pruned" in msg  # says why a ratio limit exists
    w = read_hwq(p, max_output_bytes=100_000_000)["w"]
    assert w.shape == (numel,) and np.count_nonzero(w) == 3
    assert (w[[3, 1000, numel - 1]] == [2.5, -1.5, 2.5]).all()


# ---------------------------------------------------------------------------------------------
# the command line


def _cli(capsys, *args) -> tuple[int, str, str]:
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def _one_line_error(rc, err, *needles):
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2, (rc, err)
    assert len(lines) == 1 and lines[0].startswith("hwq: error: "), err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], lines[0]


def test_cli_decode_limits_and_inspect_note(trusted_sparse, capsys):
    d, p, numel = trusted_sparse
    out = d / "out" / "w.safetensors"
    out.parent.mkdir()
    rc, _, err = _cli(capsys, "decode", p, "--out", out)
    _one_line_error(rc, err, "--max-output-bytes 80000000")
    assert os.listdir(out.parent) == []
    rc, text, _ = _cli(capsys, "inspect", p)
    assert rc == 0 and "hwq decode refuses it unless given --max-output-bytes 80000000" in text
    rc, text, _ = _cli(capsys, "inspect", p, "--max-output-bytes", "100M")
    assert rc == 0 and "refuses" not in text and "decoded: 80,000,000 bytes" in text
    rc, text, _ = _cli(capsys, "decode", p, "--out", out, "--max-output-bytes", "100M")
    assert rc == 0, text
    from safetensors.numpy import load_file

    w = load_file(out)["w"]
    assert w.shape == (numel,) and np.count_nonzero(w) == 3
    assert os.listdir(out.parent) == ["w.safetensors"]  # no temporary left
    with pytest.raises(SystemExit) as info:  # argparse's own usage error
        main(["decode", str(p), "--out", str(out), "--max-output-bytes", "lots"])
    assert info.value.code == 2 and "not a size: 'lots'" in capsys.readouterr().err


def test_cli_unknown_tensor_is_one_line(files, capsys):
    d, bases, _ = files
    p = _write(d, "ok.hwq", bases["mixed-network"])
    out = d / "nosuch.safetensors"
    with pytest.raises(SystemExit):
        main(["decode", str(p), "--out", str(out), "--tensor"])  # argparse: needs a name
    capsys.readouterr()
    rc, _, err = _cli(capsys, "decode", p, "--out", out, "--tensor", "fc1.weigth")
    _one_line_error(rc, err, "no tensor named 'fc1.weigth'", "did you mean 'fc1.weight'",
                    "conv1.weight")
    rc, _, err = _cli(capsys, "decode", p, "--out", out, "--tensor", "NOSUCH")
    _one_line_error(rc, err, "no tensor named 'NOSUCH'", "the file has 22")
    assert not out.exists()
    with pytest.raises(KeyError):  # still a KeyError for API callers
        HwqReader(p).read(["NOSUCH"])
    assert issubclass(UnknownTensorError, ValueError)


def test_cli_output_into_a_missing_folder_is_one_line(files, capsys):
    d, bases, _ = files
    p = _write(d, "ok.hwq", bases["mixed-network"])
    rc, _, err = _cli(capsys, "decode", p, "--out", d / "missing_folder" / "x.safetensors")
    _one_line_error(rc, err, "missing_folder", "does not exist")
    assert not (d / "missing_folder").exists()
    rc, _, err = _cli(capsys, "decode", p, "--out", d)
    _one_line_error(rc, err, "is a folder")


def test_cli_decode_temporaries_are_unique_and_removed(files, capsys, monkeypatch):
    import safetensors.numpy

    d, bases, _ = files
    p = _write(d, "ok.hwq", bases["mixed-network"])
    folder = d / "conc"
    folder.mkdir()
    out = folder / "m.safetensors"
    real = safetensors.numpy.save_file
    temps: list[str] = []
    barrier = threading.Barrier(2)

    def recording(tensors, path, metadata=None):
        temps.append(os.path.basename(path))
        real(tensors, path, metadata=metadata)
        barrier.wait(timeout=30)  # both temporaries exist at once

    monkeypatch.setattr(safetensors.numpy, "save_file", recording)
    rcs: list[int] = []
    threads = [threading.Thread(target=lambda: rcs.append(main(["decode", str(p), "--out",
                                                                 str(out)])))
               for _ in range(2)]  # fmt: skip
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert rcs == [0, 0]
    assert len(set(temps)) == 2 and all(t.startswith("m.safetensors.tmp-") for t in temps)
    assert os.listdir(folder) == ["m.safetensors"]
    expect = read_hwq(p)
    got = safetensors.numpy.load_file(out)
    assert all(got[n].shape == expect[n].shape for n in expect)  # 0-d stays 0-d
    assert all(np.array_equal(got[n], expect[n]) for n in expect)

    def half_then_fail(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.numpy, "save_file", half_then_fail)
    capsys.readouterr()
    rc, _, err = _cli(capsys, "decode", p, "--out", folder / "n.safetensors")
    _one_line_error(rc, err, "cannot write", "No space left")
    assert os.listdir(folder) == ["m.safetensors"]  # no half file, no temporary


HOSTILE = ["zlib-bomb-900MiB", "pruned-2GiB", "8x2GiB", "overlapping-sections", "deep-json",
           "chunk-10^12-symbols"]


@pytest.mark.parametrize("name", HOSTILE)
def test_cli_hostile_files(files, capsys, name):
    d, _, bombs = files
    p = _write(d, f"cli-{name}.hwq", bombs[name][0])
    folder = d / f"cli-out-{name}"
    folder.mkdir()
    t0 = time.perf_counter()
    rc, _, err = _cli(capsys, "decode", p, "--out", folder / "x.safetensors")
    assert time.perf_counter() - t0 < 2
    _one_line_error(rc, err, str(p))
    assert os.listdir(folder) == []
    rc, text, err = _cli(capsys, "inspect", p)
    if name in ("pruned-2GiB", "8x2GiB"):
        # Inspect reads the header only and allocates nothing: it shows the declared size.
        assert rc == 0 and "hwq decode refuses it" in text
    else:
        _one_line_error(rc, err, str(p))


def test_cli_corrupt_files(files, capsys):
    d, bases, _ = files
    ok = bases["mixed-network"]
    h, payload = hf.split(ok)
    crafted = copy.deepcopy(h)
    hf.tensor(crafted, "fc2.weight")["indices"]["chunks"][0][3] ^= 1
    cases = {
        "truncated": (ok[:-3], "file has"),
        "flipped": (ok[:40] + bytes([ok[40] ^ 4]) + ok[41:], "checksum"),
        "crc": (hf.join(crafted, payload), "checksum mismatch"),
        "empty": (b"", "too short"),
        "bad-zlib": (hf.header_file(b"not zlib", payload, compressed=True), "inflate"),
    }
    for name, (blob, needle) in cases.items():
        p = _write(d, f"corrupt-{name}.hwq", blob)
        rc, _, err = _cli(capsys, "decode", p, "--out", d / "c.safetensors")
        _one_line_error(rc, err, needle)
        rc, _, err = _cli(capsys, "inspect", p)
        if name == "crc":
            assert rc == 0  # inspect reads the header only: a payload checksum is not its job
        else:
            _one_line_error(rc, err, needle)
        assert not (d / "c.safetensors").exists()
    assert zlib.crc32(ok) == zlib.crc32(bases["mixed-network"])  # the base is untouched
