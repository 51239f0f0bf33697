"""Bad input at the command line: one `hwq: error:` line on stderr, exit status 2, no traceback,
and quickly (no hang on an address nobody listens on).

Most cases call the CLI's `main(argv)` in this process (the `hwq` fixture: a fresh interpreter
costs ~3 s a case, importing torch); the cases that need one run `python -m pipeline.cli`
(`_hwq`, which other test files use too):
joining a Ray cluster (this process may hold the suite's embedded Ray already), a user error
inside a Ray task, and one plain case for the real entry point."""

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "configs/lenet5_fmnist.yaml"
# A case in process cannot be killed like a child: a hang (a FIFO read, a probe of an address
# nobody listens on) fails the test instead of stalling the suite.
pytestmark = pytest.mark.timeout(120)

_ENV = {"OMP_WAIT_POLICY": "PASSIVE", "PYTHONUNBUFFERED": "1",
        # Never let botocore look for an instance role on the network.
        "AWS_EC2_METADATA_DISABLED": "true"}


def _hwq(args, env_extra=None, drop=()):
    """`python -m pipeline.cli ARGS` in a fresh interpreter: (CompletedProcess, seconds)."""
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(_ENV)
    env.update(env_extra or {})
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    return p, time.perf_counter() - t0


@pytest.fixture
def hwq(capsys, monkeypatch):
    """`pipeline.cli.main(ARGS)` in this process, as the console script runs it: the working
    folder, the environment (`env_extra`, `drop`) and the CLI's logging to stderr as in a fresh
    interpreter; no Ray may start (each case is refused before any stage). Returns
    (CompletedProcess with the exit status and what was printed, seconds)."""
    import s3fs

    from pipeline import cli, executor

    def no_ray(*a, **k):
        raise AssertionError("Ray was started: the mistake was not found before the stages")

    def run(args, env_extra=None, drop=()):
        monkeypatch.chdir(ROOT)
        monkeypatch.setattr(executor, "init_ray", no_ray)
        # ...and none stops: the CLI's `finally` would shut down the session's Ray that the
        # other tests' fixture (`ray_local`) started, and the next Ray call in this process
        # would auto-start a plain one (no worker environment, other cancel behaviour)
        monkeypatch.setattr(executor, "shutdown_ray", lambda: None)
        for k in drop:
            monkeypatch.delenv(k, raising=False)
        for k, v in {**_ENV, **(env_extra or {})}.items():
            monkeypatch.setenv(k, v)
        # s3fs keeps one filesystem per set of arguments: credentials read by an earlier case
        # (or test) would be reused.
        s3fs.S3FileSystem.clear_instance_cache()
        # The CLI's basicConfig does nothing under pytest (its handlers are on the root
        # logger): a handler on the captured stderr shows any log line as the console would
        # (but the S3 server's, which runs in this process only in the tests).
        root, handler = logging.getLogger(), logging.StreamHandler(sys.stderr)
        handler.addFilter(lambda r: not r.name.startswith(("werkzeug", "moto")))
        level = root.level
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        capsys.readouterr()
        t0 = time.perf_counter()
        try:
            rc = cli.main(list(args))
        except SystemExit as e:  # argparse's refusals
            rc = e.code
        finally:
            root.removeHandler(handler)
            root.setLevel(level)
            s3fs.S3FileSystem.clear_instance_cache()
        seconds = time.perf_counter() - t0
        out = capsys.readouterr()
        return subprocess.CompletedProcess(args, rc, out.out, out.err), seconds

    return run


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
    # a store that cannot be a folder ({tmp}/file is a file)
    "store-dev-null": (["--store", "/dev/null"], ["store /dev/null is not a folder"]),
    "store-inside-a-file": (["--store", "{tmp}/file/store"], ["inside", "which is a file"]),
    # --out destinations that cannot work: refused before any stage runs, not after all
    "out-dev-null": (["--out", "/dev/null"], ["--out", "not a folder"]),
    "out-inside-a-file": (["--out", "{tmp}/file/out"], ["--out", "which is a file"]),
    "out-a-file": (["--out", "{tmp}/file"], ["--out", "is a file"]),
    "out-model-hwq-is-a-folder": (["--out", "{tmp}/published"], ["model.hwq is a folder"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_run_bad_input_is_one_line(case, tmp_path, hwq):
    args, needles = CASES[case]
    (tmp_path / "file").write_text("a file, not a folder\n")
    (tmp_path / "published" / "model.hwq").mkdir(parents=True)
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    if not any(a == "--store" for a in args):
        args = [*args, "--store", str(tmp_path / "store")]
    p, s = hwq(["run", CONFIG, *args])
    _assert_one_line(p, s, *needles)
    # Nothing that looks like a run was left behind.
    assert not (tmp_path / "store" / "stages").exists()


@pytest.mark.parametrize("address", ["127.0.0.1:9", "ray://127.0.0.1:9"])
def test_an_unreachable_ray_address_is_one_line(address, tmp_path):
    """Nothing listens on port 9 (a Ray GCS address and a Ray Client one). In a fresh
    interpreter: this process may hold the suite's embedded Ray, which init_ray would use."""
    p, s = _hwq(["run", CONFIG, "--ray-address", address,
                 "--store", str(tmp_path / "store")])
    _assert_one_line(p, s, "cannot reach the Ray cluster")
    assert not (tmp_path / "store" / "stages").exists()


def test_out_to_a_missing_bucket_is_refused_before_any_stage(s3_endpoint, tmp_path, hwq):
    p, s = hwq(["run", CONFIG, "--store", str(tmp_path / "store"), "--out",
                 "s3://hwq-no-such-bucket/out", "--endpoint-url", s3_endpoint],
                env_extra={"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"})
    _assert_one_line(p, s, "--out", "does not exist")
    assert not (tmp_path / "store" / "stages").exists()


class PanicException(BaseException):
    """What pyo3 raises for a Rust panic (tokenizers, on a regex it cannot run)."""


def test_a_library_panic_is_one_line(monkeypatch, capsys):
    from pipeline import cli

    def panics(args):
        raise PanicException("called `Option::unwrap()` on a `None` value\n\x1b[31mmore")

    monkeypatch.setattr(cli, "_cmd_status", panics)
    assert cli.main(["status", "nowhere"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hwq: error: a library aborted (") and err.count("\n") == 1
    assert "PanicException: called `Option::unwrap()`" in err and "\x1b" not in err
    with pytest.raises(PanicException):  # -v: the traceback
        cli.main(["-v", "status", "nowhere"])


def test_missing_config_file(tmp_path):
    """Through the console entry point (`python -m pipeline.cli`), as a user runs it."""
    p, s = _hwq(["run", str(tmp_path / "nope.yaml")])
    _assert_one_line(p, s, "not found")


def test_s3_store_without_credentials(s3_endpoint, tmp_path, hwq):
    p, s = hwq(["run", CONFIG, "--store", "s3://hwq-nocreds/run", "--endpoint-url", s3_endpoint],
                env_extra={"AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
                           "AWS_CONFIG_FILE": str(tmp_path / "none")},
                drop=_NO_AWS)
    _assert_one_line(p, s, "credentials", "AWS_ACCESS_KEY_ID")


def test_s3_store_missing_bucket(s3_endpoint, hwq):
    p, s = hwq(["run", CONFIG, "--store", "s3://hwq-no-such-bucket/run",
                 "--endpoint-url", s3_endpoint],
                env_extra={"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"})
    _assert_one_line(p, s, "does not exist")


def test_status_of_a_folder_without_a_run(tmp_path, hwq):
    p, s = hwq(["status", str(tmp_path)])
    _assert_one_line(p, s, "holds no hwq run")


def test_status_of_an_s3_store_without_credentials(s3_endpoint, tmp_path, hwq):
    p, s = hwq(["status", "s3://hwq-nocreds/run", "--endpoint-url", s3_endpoint],
                env_extra={"AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
                           "AWS_CONFIG_FILE": str(tmp_path / "none")},
                drop=_NO_AWS)
    _assert_one_line(p, s, "credentials")


def test_read_only_commands_create_nothing(tmp_path, hwq):
    p, s = hwq(["report", str(tmp_path / "nothing-here")])
    _assert_one_line(p, s, "does not exist")
    assert not (tmp_path / "nothing-here").exists()


def _special_checkpoints(tmp_path):
    fifo = tmp_path / "ckpt.fifo"
    os.mkfifo(fifo)
    huge = tmp_path / "huge.safetensors"
    with open(huge, "wb") as f:
        f.truncate(100 << 30)  # sparse: 100 GiB that would be read whole
    folder = tmp_path / "ckpt.dir"
    folder.mkdir()
    return {"fifo": (fifo, "not a regular file"), "dir": (folder, "not a regular file"),
            "huge": (huge, "more than a checkpoint"), "zero": ("/dev/zero", "not a regular file")}


@pytest.mark.parametrize("kind", ["fifo", "dir", "huge", "zero"])
def test_special_model_checkpoint_is_one_line(tmp_path, kind, hwq):
    path, needle = _special_checkpoints(tmp_path)[kind]
    p, s = hwq(["run", CONFIG, "--store", str(tmp_path / "store"),
                 "--set", f"model.checkpoint={path}"])
    _assert_one_line(p, s, "model.checkpoint", needle)


CONFIG_CASES = {
    # 10^9 leaves through aliases, all under one key: refused without expanding them.
    "billion-laughs": ("name: [&a [x, x, x, x, x, x, x, x, x, x], "
                       + ", ".join(f"&{c} [{', '.join(['*' + p] * 10)}]"
                                   for p, c in zip("abcdefgh", "bcdefghi", strict=True)) + "]\n",
                       "aliases"),
    "alias-cycle": ("quantize: {layer_k: &a [*a]}\n", "contains it"),
    "deeply-nested": ("name: " + "[" * 500 + "]" * 500 + "\n", "nested more than"),
    "deeply-nested-blocks": ("".join(" " * i + f"k{i}:\n" for i in range(300)) + " " * 300 + "1\n",
                             "nested more than"),
    "python-tag": ("name: !!python/object/apply:os.system ['true']\n", "not valid YAML"),
    "seed-too-large": ("seed: 99999999999999999999999999999\n", "seed"),
    "not-utf8": (b"name: \xff\xfe\n", "UTF-8"),
}


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_hostile_config_files_are_one_line(tmp_path, case, hwq):
    text, needle = CONFIG_CASES[case]
    cfg = tmp_path / "c.yaml"
    cfg.write_bytes(text if isinstance(text, bytes) else text.encode())
    p, s = hwq(["run", str(cfg), "--store", str(tmp_path / "store")])
    _assert_one_line(p, s, needle)


def _alias_bomb() -> str:
    # One 2,000-override list reused by 600 entries: 1.2 million values from 10 KB.
    sets = ", ".join(["quantize.k=4"] * 2000)
    return ("entries:\n" + f"  - {{config: {ROOT / CONFIG}, set: &s [{sets}]}}\n"
            + f"  - {{config: {ROOT / CONFIG}, set: *s}}\n" * 599)


BATCH_CASES = {
    "alias-bomb": (_alias_bomb(), ["--only", "nope"], "aliases"),
    "deeply-nested": ("entries: " + "[" * 500 + "]" * 500 + "\n", [], "nested more than"),
    "store-dev-null": (f"entries: [{{config: {ROOT / CONFIG}}}]\n", ["--store", "/dev/null"],
                       "store /dev/null is not a folder"),
    "only-unknown": (f"entries: [{{config: {ROOT / CONFIG}}}]\n", ["--only", "nope"],
                     "--only nope: no such entry"),
}


@pytest.mark.parametrize("case", sorted(BATCH_CASES))
def test_hostile_batch_files_are_one_line(tmp_path, case, hwq):
    text, args, needle = BATCH_CASES[case]
    batch = tmp_path / "b.yaml"
    batch.write_text(text)
    if "--store" not in args:
        args = [*args, "--store", str(tmp_path / "store")]
    p, s = hwq(["batch", str(batch), *args])
    _assert_one_line(p, s, needle)


def test_huge_config_file_and_deep_override(tmp_path, hwq):
    big = tmp_path / "big.yaml"
    with open(big, "wb") as f:
        f.truncate(3 << 30)
    p, s = hwq(["run", str(big)])
    _assert_one_line(p, s, "such a file is a few KB")
    p, s = hwq(["run", CONFIG, "--store", str(tmp_path / "s"), "--set", "name=" + "[" * 5000])
    _assert_one_line(p, s, "name")


@pytest.mark.parametrize("url,needle", [("s3://", "names no bucket"),
                                        ("s3://Bad_Bucket!!/x", "")])
def test_unusable_store_urls(url, needle, s3_endpoint, hwq):
    p, s = hwq(["status", url, "--endpoint-url", s3_endpoint],
                env_extra={"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"})
    _assert_one_line(p, s, needle)
    assert not (ROOT / "s3:").exists()


def test_report_of_a_planted_special_file(tmp_path, hwq):
    (tmp_path / "report.md").symlink_to("/dev/zero")
    p, s = hwq(["report", str(tmp_path)])
    _assert_one_line(p, s, "not a regular file")
    (tmp_path / "report.md").unlink()
    (tmp_path / "report.md").write_text("fine \x1b[31mred\x1b]0;title\x07 text\n")
    p, _ = hwq(["report", str(tmp_path)])
    assert p.returncode == 0 and "\x1b" not in p.stdout and "\x07" not in p.stdout


def test_decode_refuses_to_replace_a_special_output(tmp_path, hwq):
    fifo = tmp_path / "out.fifo"
    os.mkfifo(fifo)
    hwq_file = tmp_path / "m.hwq"
    hwq_file.write_bytes(b"not used: the output is checked first")
    p, s = hwq(["decode", str(hwq_file), "--out", str(fifo)])
    _assert_one_line(p, s, "not a regular file")
    assert fifo.is_fifo()


# -- language models: every mistake the config and the files show, before Ray starts --------


@pytest.fixture(scope="module")
def lm_folder(tmp_path_factory):
    pytest.importorskip("transformers")
    from testkit.models import tiny_llama_folder, write_corpus

    d = tmp_path_factory.mktemp("lm")
    tiny_llama_folder(d / "llama")
    write_corpus(d / "calib.txt", 300, 1)  # ~4,000 tokens of the tiny tokenizer
    (d / "short.txt").write_text("the quick brown fox.\n")
    no_tok = d / "no-tokenizer"
    no_tok.mkdir()
    for f in ("config.json", "model.safetensors"):
        (no_tok / f).write_bytes((d / "llama" / f).read_bytes())
    return d


def _lm_yaml(tmp_path, d, **sections):
    import yaml

    cfg = {"model": {"name": "hf_causal_lm", "path": str(d / "llama")},
           "data": {"calibration": str(d / "calib.txt"), "seq_len": 64, "calibration_windows": 8},
           "store": {"url": str(tmp_path / "store")}}
    for k, v in sections.items():
        cfg[k] = {**cfg.get(k, {}), **v}
    p = tmp_path / "lm.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


LM_CASES = {
    "model-path-missing": ({"model": {"path": "MISSING"}}, ["model.path", "does not exist"]),
    "eval-text-too-short": ({"data": {"eval": {"tiny": "SHORT"}}},
                            ["data.eval.tiny", "short.txt", "fewer than one window",
                             "data.seq_len=64"]),
    "metric-without-direction": ({"evaluate": {"metric": "math:fsum"}},
                                 ["math:fsum", "direction"]),
}


@pytest.mark.parametrize("case", sorted(LM_CASES))
def test_language_model_mistakes_are_one_line_before_ray_starts(case, lm_folder, tmp_path, hwq):
    """One line, exit 2, and nothing else on stderr: not even the line that Ray is starting
    (the config's mistakes are found before any stage or Ray)."""
    change, needles = LM_CASES[case]
    subs = {"MISSING": str(tmp_path / "nothing"), "SHORT": str(lm_folder / "short.txt")}
    change = {s: {k: ({n: subs.get(t, t) for n, t in v.items()} if isinstance(v, dict)
                      else subs.get(v, v)) for k, v in kv.items()} for s, kv in change.items()}
    p, s = hwq(["run", str(_lm_yaml(tmp_path, lm_folder, **change))])
    _assert_one_line(p, s, *needles)
    assert not (tmp_path / "store" / "stages").exists()


def test_preflight_finds_each_mistake_the_files_show(lm_folder, tmp_path):
    """The checks themselves, in process (no Ray, no stage): each names its key and file."""
    from pipeline.config import load_config
    from pipeline.errors import UserError
    from pipeline.preflight import check_before_work

    def check(**sections):
        check_before_work(load_config(_lm_yaml(tmp_path, lm_folder, **sections)))

    check()  # the three-line config itself is fine
    cases = [
        ({"model": {"path": str(lm_folder / "no-tokenizer")}}, "no tokenizer files"),
        ({"data": {"seq_len": 4000}}, r"data.calibration '.*calib.txt': the text has \d+ "
                                      r"tokens, fewer than 2 windows"),
        ({"data": {"calibration": str(lm_folder / "short.txt")}}, "short.txt"),
        ({"data": {"calibration": str(lm_folder / "none.txt")}}, "none.txt.* does not exist"),
        ({"quantize": {"targets": ["model.layers.*.no_such_proj"]}}, "no_such_proj"),
        ({"quantize": {"ignore": ["no_such_module"]}}, "no_such_module"),
        ({"model": {"checkpoint": str(lm_folder / "none.safetensors")}}, "model.checkpoint"),
    ]
    for sections, needle in cases:
        with pytest.raises(UserError, match=needle):
            check(**sections)


def _user_code_config(path, store, **sections) -> None:
    """A bring-your-own MLP (tests/byo_model.py) config, the smallest the stages allow."""
    import yaml

    cfg = {"model": {"name": "factory", "factory": "tests.byo_model:small_mlp",
                     "kwargs": {"hidden": 8}},
           "data": {"name": "custom", "factory": "tests.byo_model:few_batches"},
           "evaluate": {"metric": "tests.byo_model:batch_accuracy"},
           "quantize": {"method": "hw_kmeans", "k": 4},
           "executor": {"num_cpus": 2}, "store": {"url": str(store)}}
    for k, v in sections.items():
        cfg[k] = {**cfg.get(k, {}), **v}
    path.write_text(yaml.safe_dump(cfg))


def assert_user_error_line(p, *needles) -> str:
    """The run ended with one `hwq: error:` line (its last line), exit status 2, no
    traceback anywhere (Ray's and Ray Train's output included); the line's text."""
    out = p.stdout + p.stderr
    assert p.returncode == 2, (p.returncode, out[-3000:])
    assert "Traceback" not in out, out[-3000:]
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("hwq: error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], out[-3000:]
    for n in needles:
        assert n in errors[0], errors[0]
    return errors[0].removeprefix("hwq: error: ")


def test_an_error_of_the_users_code_in_a_ray_task_is_one_line_and_not_retried(tmp_path):
    """data.factory returns images the model cannot take: the user's metric fails inside the
    load stage's Ray task. One attempt (the data function ran once), one line naming the
    setting, the exception and the user's line; run.json records it."""
    import json

    calls, store = tmp_path / "calls.txt", tmp_path / "store"
    _user_code_config(tmp_path / "run.yaml", store,
                      data={"factory": "tests.byo_model:bad_batches"})
    p, _ = _hwq(["run", str(tmp_path / "run.yaml")], env_extra={"HWQ_TEST_CALLS": str(calls)})
    line = assert_user_error_line(
        p, "evaluate.metric 'tests.byo_model:batch_accuracy' raised RuntimeError: mat1 and "
        "mat2 shapes cannot be multiplied", "(at tests/byo_model.py:")
    assert calls.read_text().splitlines() == ["bad_batches eval"]
    run = json.loads((store / "run.json").read_text())
    assert (run["status"], run["failed_stage"], run["error"]) == ("failed", "load", line)
