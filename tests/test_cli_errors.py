"""Bad input at the command line: one `hwq: error:` line on stderr, exit status 2, no traceback,
and quickly (no hang on an address nobody listens on)."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "configs/lenet5_fmnist.yaml"


def _hwq(args, env_extra=None, drop=()):
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update({"OMP_WAIT_POLICY": "PASSIVE", "PYTHONUNBUFFERED": "1",
                # Never let botocore look for an instance role on the network.
                "AWS_EC2_METADATA_DISABLED": "true"})
    env.update(env_extra or {})
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    return p, time.perf_counter() - t0


def _assert_one_line(p, seconds, *needles):
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 2, (p.returncode, p.stderr[-3000:])
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("hwq: error: "), p.stderr[-3000:]
    for n in needles:
        assert n in lines[0], lines[0]
    assert seconds < 60, seconds


_NO_AWS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
           "AWS_ENDPOINT_URL")

CASES = {
    # the cluster address: nothing listens on port 9
    "ray-address-gcs": (["--ray-address", "127.0.0.1:9"], ["cannot reach the Ray cluster"]),
    "ray-address-client": (["--ray-address", "ray://127.0.0.1:9"],
                           ["cannot reach the Ray cluster"]),
    # stores that cannot work
    "store-gcs-without-gcsfs": (["--store", "gs://bucket/hwq"], ["gcsfs"]),
    "store-unknown-protocol": (["--store", "nosuch://bucket/hwq"], ["unknown protocol"]),
    "store-ftp-unreachable": (["--store", "ftp://127.0.0.1:9/hwq"], ["cannot connect"]),
    # config values that validate as types but cannot work
    "target-bits-inf": (["--set", "quantize.target_bits=.inf"], ["quantize.target_bits"]),
    "target-bits-nan": (["--set", "quantize.target_bits=.nan"], ["quantize.target_bits"]),
    "lr-inf": (["--set", "train.lr=.inf"], ["train.lr"]),
    "prune-keep-unknown-tensor": (["--set", "prune.keep={nosuch.weight: 0.5}"],
                                  ["prune.keep", "nosuch.weight", "not a parameter"]),
    "prune-keep-typo": (["--set", "prune.keep={fc1.weigth: 0.5}"], ["did you mean 'fc1.weight'"]),
    "layer-k-unknown-tensor": (["--set", "quantize.scope=layer", "--set", "quantize.method=kmeans",
                                "--set", "quantize.layer_k={conv9.weight: 8}"],
                               ["quantize.layer_k", "conv9.weight"]),
    "unknown-key": (["--set", "quantize.bitz=3"], ["unknown key"]),
    "force-unknown-stage": (["--force", "nosuch"], ["not a stage"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_run_bad_input_is_one_line(case, tmp_path):
    args, needles = CASES[case]
    if not any(a == "--store" for a in args):
        args = [*args, "--store", str(tmp_path / "store")]
    p, s = _hwq(["run", CONFIG, *args])
    _assert_one_line(p, s, *needles)
    # Nothing that looks like a run was left behind.
    assert not (tmp_path / "store" / "stages").exists()


def test_missing_config_file(tmp_path):
    p, s = _hwq(["run", str(tmp_path / "nope.yaml")])
    _assert_one_line(p, s, "not found")


def test_s3_store_without_credentials(s3_endpoint, tmp_path):
    p, s = _hwq(["run", CONFIG, "--store", "s3://hwq-nocreds/run", "--endpoint-url", s3_endpoint],
                env_extra={"AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
                           "AWS_CONFIG_FILE": str(tmp_path / "none")},
                drop=_NO_AWS)
    _assert_one_line(p, s, "credentials", "AWS_ACCESS_KEY_ID")


def test_s3_store_missing_bucket(s3_endpoint):
    p, s = _hwq(["run", CONFIG, "--store", "s3://hwq-no-such-bucket/run",
                 "--endpoint-url", s3_endpoint],
                env_extra={"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"})
    _assert_one_line(p, s, "does not exist")


def test_status_of_a_folder_without_a_run(tmp_path):
    p, s = _hwq(["status", str(tmp_path)])
    _assert_one_line(p, s, "holds no hwq run")


def test_status_of_an_s3_store_without_credentials(s3_endpoint, tmp_path):
    p, s = _hwq(["status", "s3://hwq-nocreds/run", "--endpoint-url", s3_endpoint],
                env_extra={"AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
                           "AWS_CONFIG_FILE": str(tmp_path / "none")},
                drop=_NO_AWS)
    _assert_one_line(p, s, "credentials")


def test_read_only_commands_create_nothing(tmp_path):
    p, s = _hwq(["report", str(tmp_path / "nothing-here")])
    _assert_one_line(p, s, "does not exist")
    assert not (tmp_path / "nothing-here").exists()
