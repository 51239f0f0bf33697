"""hwq inspect's last row: the whole file over every parameter it holds (raw tensors too)."""

from pipeline.encode.inspection import format_inspect


def test_inspect_prints_bits_over_all_parameters():
    rows = [{"kind": "header", "name": "(header)", "bytes": 100, "share": 0.1},
            {"kind": "quantized", "name": "w", "shape": [4, 4], "numel": 16, "n_kept": 16,
             "kept_fraction": 1.0, "bits_per_weight": 3.0, "bytes": 6, "share": 0.06},
            {"kind": "codebook", "name": "w", "shape": [4, 2], "bytes": 8, "share": 0.08},
            {"kind": "raw", "name": "norm", "shape": [4], "numel": 4, "bytes": 8, "share": 0.08}]
    last = next(ln for ln in format_inspect(rows).splitlines() if ln.startswith("total (all"))
    assert last.startswith("total (all 20 parameters)")
    assert f"{8 * 122 / 20:.3f}" in last and "122" in last
