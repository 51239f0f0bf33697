"""The width a .hwq file serves at (hwq inspect, the run report): the largest row codebook's
levels, a pruned tensor's zero counted, mapped to 2/3/4/8 bits."""

from __future__ import annotations

import numpy as np

from pipeline.encode import TensorEntry, format_inspect, inspect_hwq, write_hwq
from pipeline.encode.inspection import serve_width, serve_widths


def test_serve_width_steps():
    assert [serve_width(k) for k in (1, 4, 5, 8, 9, 16, 17, 256, 257)] == [
        2,
        2,
        3,
        3,
        4,
        4,
        8,
        8,
        None,
    ]


def _file(tmp_path, levels: int, pruned_levels: int | None = None):
    rng = np.random.default_rng(0)
    cbs = {
        "rows": np.sort(rng.normal(size=(6, levels)), axis=1).astype(np.float16).astype(np.float32)
    }
    ents = [TensorEntry.quantized("a.weight", (6, 40), rng.integers(0, levels, 240), "rows")]
    if pruned_levels is not None:
        cbs["p"] = np.sort(rng.normal(size=pruned_levels)).astype(np.float32)
        mask = rng.random(200) < 0.5
        ents.append(
            TensorEntry.quantized(
                "b.weight",
                (10, 20),
                rng.integers(0, pruned_levels, int(mask.sum())),
                "p",
                mask=mask,
            )
        )
    path = tmp_path / "m.hwq"
    write_hwq(path, ents, cbs, codebook_dtype="float16" if pruned_levels is None else "float32")
    return inspect_hwq(path)


def test_inspect_and_the_report_say_the_width(tmp_path):
    from pipeline.report import render_markdown

    rows = _file(tmp_path, 8)
    assert serve_widths(rows) == {"serve_bits": 3, "levels": 8, "tensor": "a.weight"}
    assert (
        "serves at: 3 bits per index (largest row codebook: 8 levels, a.weight)"
        in format_inspect(rows)
    )
    # A pruned tensor with 16 levels needs a 17th, the zero: 8 bits.
    rows = _file(tmp_path, 4, pruned_levels=16)
    assert serve_widths(rows) == {"serve_bits": 8, "levels": 17, "tensor": "b.weight"}
    report = {
        "name": "r",
        "model": {"name": "m", "params": 1},
        "config_digest": "d",
        "seconds": 1.0,
        "stages": {},
        "metrics": {
            "encode": {
                "compression_ratio": 2.0,
                "file_bytes": 10,
                "original_bytes": 20,
                "bits": {"indices": 80},
                "serve": serve_widths(rows),
            }
        },
    }
    assert "Serves at **8 bits** per index" in render_markdown(report)
