"""Past the paper's rate, end to end on the quick LeNet-5 run's store: the rANS and
context coders through the encode stage (the same decoded network, a smaller file), and
Optimal Brain Damage pruning through the prune stage (same kept counts, different weights)."""

import shutil

import numpy as np
import pytest

from pipeline.encode import HwqReader, hwq_accounting, read_hwq
from pipeline.store import Store
from tests.quick import QUICK, hwq

CODERS = ["--set", "encode.coder=ans", "--set", "encode.positions=context",
          "--set", "encode.indices=context"]


@pytest.fixture(scope="module")
def store(quick_run, tmp_path_factory):
    dst = tmp_path_factory.mktemp("beyond") / "store"
    shutil.copytree(quick_run[0], dst)
    return dst


def _report(store):
    return Store(str(store), create=False).read_json("report.json")


def _stage_dir(store, report, name):
    return store / "stages" / f"{name}-{report['stages'][name]['key']}"


def test_new_coders_decode_to_the_same_network_in_a_smaller_file(store, ray_local):
    from pipeline import driver
    from pipeline.config import load_config

    ref = _report(store)
    # In this process, on the session's Ray (the command line is the quick run's own test):
    # only the encode stage computes.
    sets = [a for a in QUICK + CODERS if a != "--set"]
    driver.run(load_config("configs/lenet5_fmnist.yaml", [*sets, f"store.url={store}"]))
    new = _report(store)
    # Only the encode stage ran again.
    assert [s for s, v in new["stages"].items() if not v["cached"]] == ["encode"]
    e0, e1 = ref["metrics"]["encode"], new["metrics"]["encode"]
    assert e1["coders"] == {"static": "ans", "positions": "context", "indices": "context"}
    assert new["metrics"]["decoded_accuracy"] == ref["metrics"]["decoded_accuracy"]
    assert e1["file_bytes"] < e0["file_bytes"]
    assert e1["bits"]["positions"] < e0["bits"]["positions"]
    # Context-coded positions beat the order-0 entropy of the gap values.
    assert e1["position_bits_per_weight"] < e1["gap_entropy_bits"]
    f0, f1 = (str(_stage_dir(store, r, "encode") / "model.hwq") for r in (ref, new))
    assert HwqReader(f0).version == 1 and HwqReader(f1).version == 2
    a, b = read_hwq(f0), read_hwq(f1)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    # The reader's accounting of the file agrees with the writer's.
    acct = hwq_accounting(f1)
    assert acct["bits"] == e1["bits"]
    assert acct["gap_entropy_bits"] == pytest.approx(e1["gap_entropy_bits"])
    assert acct["index_entropy_bits"] == pytest.approx(e1["index_entropy_bits"])


@pytest.mark.slow  # (46 s: a prune stage end to end; OBD's choice is tests/test_prune.py's)
def test_obd_prunes_the_same_counts_by_a_different_choice(store):
    ref = _report(store)
    hwq("run", "configs/lenet5_fmnist.yaml", "--store", str(store), *QUICK,
        "--set", "prune.criterion=obd", "--set", "hessian.enabled=false",
        "--set", "quantize.enabled=false", "--set", "finetune.enabled=false",
        "--set", "encode.enabled=false")
    new = _report(store)
    assert new["stages"]["train"]["cached"] and not new["stages"]["prune"]["cached"]
    m = new["metrics"]
    assert m["criterion"] == "obd"
    assert m["keep"] == ref["metrics"]["keep"]  # per layer: the same fractions
    from safetensors.numpy import load_file

    a, b = (load_file(str(_stage_dir(store, r, "prune") / "masks.safetensors"))
            for r in (ref, new))
    assert a.keys() == b.keys()
    assert any(not np.array_equal(a[k], b[k]) for k in a)
    assert all(int(a[k].sum()) == int(b[k].sum()) for k in a)
    assert 0.5 < m["pruned_accuracy"] <= 1.0
