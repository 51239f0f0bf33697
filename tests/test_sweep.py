"""Sweeps: grid parsing, and shared stages computed once (synthetic stages, real Ray)."""

import json

import pytest

from pipeline.config import ConfigError
from pipeline.plots import rate_accuracy_png
from pipeline.sweep import expand, parse_grid, sweep
from tests.test_driver import CALLS, _stages


def test_grid_parsing_keeps_yaml_values_whole():
    grid = parse_grid(["quantize.k=4,8", "quantize.layer_k={a: 1, b: 2},{a: 3}"])
    assert grid == [("quantize.k", ["4", "8"]), ("quantize.layer_k", ["{a: 1, b: 2}", "{a: 3}"])]
    points = expand(grid)
    assert len(points) == 4 and points[0] == ["quantize.k=4", "quantize.layer_k={a: 1, b: 2}"]
    with pytest.raises(ConfigError, match="key=v1,v2"):
        parse_grid(["quantize.k"])


def _points():
    return expand(parse_grid(["quantize.target_bits=2,3", "quantize.tol=0,1e-3"]))


def test_shared_stages_run_once(ray_local, tmp_path):
    CALLS.clear()
    res = sweep("configs/lenet5_fmnist.yaml", _points(), name="t", parallel=False,
                base=[f"store.url={tmp_path}"], stages=_stages())
    assert CALLS.count("train") == 1 and CALLS.count("hessian") == 1
    assert CALLS.count("quantize") == 4
    assert res["stage_counts"]["train"] == {"runs": 4, "distinct": 1, "cached": 0}
    assert len(res["runs"]) == 4
    saved = json.loads((tmp_path / "sweeps/t/sweep.json").read_text())
    assert [r["run"] for r in saved["runs"]] == [r["run"] for r in res["runs"]]
    assert (tmp_path / "sweeps/t/sweep.md").exists()
    # Every run has its own report; a second sweep is all cache hits.
    assert all((tmp_path / f"sweeps/t/{r['run']}/report.json").exists() for r in res["runs"])
    CALLS.clear()
    again = sweep("configs/lenet5_fmnist.yaml", _points(), name="t", parallel=False,
                  base=[f"store.url={tmp_path}"], stages=_stages())
    assert CALLS == [] and again["stage_counts"]["quantize"]["cached"] == 4


def test_parallel_sweep_on_ray_gives_the_same_results(ray_local, tmp_path):
    a = sweep("configs/lenet5_fmnist.yaml", _points(), name="p", parallel=True,
              base=[f"store.url={tmp_path / 'a'}"], stages=_stages())
    b = sweep("configs/lenet5_fmnist.yaml", _points(), name="p", parallel=False,
              base=[f"store.url={tmp_path / 'b'}"], stages=_stages())
    assert [r["metrics"] for r in a["runs"]] == [r["metrics"] for r in b["runs"]]


def test_invalid_points_fail_or_are_skipped(tmp_path):
    pts = expand(parse_grid(["quantize.method=kmeans,ecsq", "quantize.k=4"]))
    with pytest.raises(ConfigError, match="ecsq sets its rate by target_bits"):
        sweep("configs/lenet5_fmnist.yaml", pts, base=[f"store.url={tmp_path}"],
              stages=_stages(), parallel=False)


def test_rate_plot_is_a_png():
    runs = [{"metrics": {"quantize": {"method": m, "k": k}, "quantized_accuracy": 0.8 + k / 100,
                         "finetuned_accuracy": 0.85, "baseline_accuracy": 0.9,
                         "encode": {"index_bits_per_weight": k / 4}}}
            for m in ("kmeans", "uniform") for k in (2, 4, 8)]
    png = rate_accuracy_png(runs, "t")
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
