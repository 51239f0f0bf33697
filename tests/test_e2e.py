"""The real thing, small: `hwq run` on embedded Ray with Fashion-MNIST, then a cached rerun."""

import json
import time
from pathlib import Path

import pytest

from tests.quick import QUICK, hwq


@pytest.fixture(scope="module")
def first_run(quick_run):
    return quick_run


def test_run_writes_report_with_the_contract(first_run):
    store, _ = first_run
    report = json.loads((store / "report.json").read_text())
    assert report["model"] == {"name": "lenet5", "params": 431_080}
    m = report["metrics"]
    assert 0.5 < m["baseline_accuracy"] <= 1
    assert 0.5 < m["pruned_accuracy"] <= 1
    assert 0.08 < m["kept_fraction"] < 0.09
    assert set(report["stages"]) == {"train", "prune", "hessian", "quantize", "finetune",
                                     "encode"}
    q = m["quantize"]
    assert q["method"] == "uniform" and q["scope"] == "network"
    assert abs(q["index_entropy_bits"] - 3.0) <= 0.02
    assert 0.5 < m["quantized_accuracy"] <= 1 and 0.5 < m["finetuned_accuracy"] <= 1
    assert m["hessian"]["estimator"] == "ggn" and m["hessian"]["samples"] == 512
    enc = m["encode"]
    hwq_file = Path(enc["file"])
    assert enc["file_bytes"] == hwq_file.stat().st_size
    assert enc["original_bytes"] == 4 * 431_080
    assert enc["compression_ratio"] == pytest.approx(enc["original_bytes"] / enc["file_bytes"])
    assert sum(enc["bits"].values()) == 8 * enc["file_bytes"]
    # The decoded file is the fine-tuned quantized model: same accuracy.
    assert m["decoded_accuracy"] == m["finetuned_accuracy"]
    assert not any(s["cached"] for s in report["stages"].values())
    for name, s in report["stages"].items():
        manifest = json.loads((store / "stages" / f"{name}-{s['key']}" / "manifest.json").read_text())
        assert manifest["outputs"], name
        # Memory as a figure: the driver's peak and every worker process's that ran a task.
        mem = manifest["memory"]
        assert mem["driver_peak_rss"] > 50 << 20, name
        assert mem["workers"] and all(w["peak_rss"] > 50 << 20 and w["pid"] > 0
                                      for w in mem["workers"]), name
        assert mem["workers_peak_rss"] == max(w["peak_rss"] for w in mem["workers"])
        assert s["memory"] == mem
    text = (store / "report.md").read_text()
    assert "# hwq report" in text and "worker peak RSS" in text


def test_second_run_is_all_cache_hits_and_fast(first_run):
    store, first_seconds = first_run
    t0 = time.perf_counter()
    p = hwq("run", "configs/lenet5_fmnist.yaml", "--store", str(store), *QUICK)
    second = time.perf_counter() - t0
    report = json.loads((store / "report.json").read_text())
    assert all(s["cached"] for s in report["stages"].values())
    assert second < first_seconds
    # Nothing to compute: the embedded Ray is never started.
    assert "starting embedded local Ray" not in p.stderr + p.stdout
    out = hwq("status", str(store)).stdout
    assert "train" in out and "cached" in out and "baseline_accuracy" in out


def test_decode_cli_gives_a_checkpoint_the_model_loader_takes(first_run, tmp_path):
    from pipeline.models import build, load_checkpoint

    store, _ = first_run
    report = json.loads((store / "report.json").read_text())
    out = tmp_path / "dense.safetensors"
    hwq("decode", report["metrics"]["encode"]["file"], "--out", str(out))
    state = load_checkpoint(str(out), build("lenet5"))
    kept = sum(int((v != 0).sum()) for k, v in state.items() if k.endswith("weight"))
    assert kept <= report["metrics"]["encode"]["n_kept"]
    text = hwq("inspect", report["metrics"]["encode"]["file"]).stdout
    assert "fc1.weight" in text and "total" in text


def test_user_errors_are_one_line_not_tracebacks(tmp_path):
    p = hwq("run", "configs/lenet5_fmnist.yaml", "--store", str(tmp_path),
            "--set", "prune.kep=0.1", check=False)
    assert p.returncode == 2 and "did you mean 'keep'" in p.stderr and "Traceback" not in p.stderr
    p = hwq("run", "configs/lenet5_fmnist.yaml", "--store", str(tmp_path),
            "--set", f"data.root={tmp_path}", "--set", "data.train_samples=1000", check=False)
    assert p.returncode == 2 and "dataset-fashion-mnist" in p.stderr
    assert "Traceback" not in p.stderr


# That a run in other processes (another hash seed, so other dict and loader orders) writes the
# same bytes, stage by stage and file by file, is checked by tests/test_cluster.py's two-node
# run against this quick run: one more full run here would repeat it.
