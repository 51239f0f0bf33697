"""`hwq stream`'s checks before any work (stream_inputs.check_paths, then the config its flags
stand for): one line for each bad argument, path or tokenizer, and never a Ray start (a
monkeypatched init_ray fails the test if reached)."""

from __future__ import annotations

import json

import pytest
import torch

from pipeline.models.weights import write_folder
from testkit.models import tiny_llama, tiny_tokenizer, write_corpus


def _folder(path, tokenizer: bool = True):
    model = tiny_llama(layers=1, hidden=32).to(torch.bfloat16)
    model.config.save_pretrained(path)
    if tokenizer:
        tiny_tokenizer(300).save_pretrained(path)
    sd = dict(model.state_dict())
    write_folder(path, sd, [(n, t.dtype, tuple(t.shape)) for n, t in sd.items()])
    return path


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return _folder(tmp_path_factory.mktemp("m") / "model")


@pytest.fixture(autouse=True)
def no_ray(monkeypatch):
    import pipeline.executor

    def refuse(*a, **k):
        raise AssertionError("Ray started before the arguments were checked")

    monkeypatch.setattr(pipeline.executor, "init_ray", refuse)


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("hwq: error: "), err
    return err[0]


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--cpus", "0"], "argument --cpus: must be at least 1"),
        (["--windows", "-1"], "argument --windows: must be at least 1"),
        (["--windows", "0"], "argument --windows: must be at least 1"),
        (["--seq-len", "0"], "argument --seq-len: must be at least 2"),
        (["--eval-windows", "0"], "argument --eval-windows: must be at least 1"),
        (["--bits", "nan"], "argument --bits: must be a number of bits"),
        (["--seed", "-1"], "argument --seed: must be at least 0"),
        (["--prune", "4:2"], "argument --prune: '4:2': need 0 < N < M"),
        (["--prune", "1.5"], "argument --prune: a kept fraction is in (0, 1)"),
        (["--prune", "half"], "argument --prune: not N:M"),
    ],
)
def test_bad_numbers_are_refused_when_parsed(model, tmp_path, capsys, args, says):
    from pipeline.cli import main

    with pytest.raises(SystemExit) as e:
        main(["stream", str(model), str(tmp_path / "w"), *args])
    assert e.value.code == 2
    assert says in capsys.readouterr().err


def test_bad_paths_and_lengths_are_one_line_before_ray(model, tmp_path, capsys):
    from pipeline.cli import main

    text = write_corpus(tmp_path / "calib.txt", lines=5)
    (tmp_path / "file").write_text("x")
    cases = [
        ([str(tmp_path / "nope"), str(tmp_path / "w")], "model folder .*nope does not exist"),
        ([str(model), str(tmp_path / "file" / "w")], "cannot make the work folder"),
        ([str(model), "/dev/null"], "work folder /dev/null exists and is not a folder"),
        ([str(model), str(tmp_path / "w\x00x")], "contains a NUL byte"),
        (
            [str(model), str(tmp_path / "w"), "--seq-len", "100000"],
            "--seq-len 100000 is longer than the 256 positions",
        ),
        (
            [str(model), str(tmp_path / "w"), "--eval", str(text), "--eval-seq-len", "300"],
            "--eval-seq-len 300 is longer than the 256 positions",
        ),
        (
            [str(model), str(tmp_path / "w"), "--text", str(text), "--seq-len", "250"],
            # named by the config key --text stands for (driver.run's preflight)
            "data.calibration .*calib.txt.*: the text has .* tokens.* data.seq_len=250",
        ),
        ([str(model), str(tmp_path / "w"), "--text", str(tmp_path / "none.txt")], "none.txt"),
    ]
    import re

    for argv, says in cases:
        assert main(["stream", *argv]) == 2, argv
        line = _one_line(capsys)
        assert re.search(says, line), (argv, line)
        assert "math domain" not in line and "torch.cat" not in line


def test_a_model_without_tokenizer_files_says_so(tmp_path, capsys):
    """transformers returns an empty tokenizer for such a folder ("the text has 0 tokens")."""
    from pipeline.cli import main

    bare = _folder(tmp_path / "bare", tokenizer=False)
    text = write_corpus(tmp_path / "calib.txt", lines=20)
    assert main(["stream", str(bare), str(tmp_path / "w"), "--text", str(text)]) == 2
    line = _one_line(capsys)
    assert "holds no tokenizer files" in line and "--tokenizer" in line
    # --tokenizer names a folder that has them: the check passes (and reaches Ray, refused here)
    tok = tmp_path / "tok"
    tiny_tokenizer(300).save_pretrained(tok)
    with pytest.raises(AssertionError, match="Ray started"):
        main(
            [
                "stream",
                str(bare),
                str(tmp_path / "w"),
                "--text",
                str(text),
                "--tokenizer",
                str(tok),
                "--seq-len",
                "16",
            ]
        )
    assert (
        main(
            [
                "stream",
                str(bare),
                str(tmp_path / "w"),
                "--text",
                str(text),
                "--tokenizer",
                str(tmp_path / "nope"),
            ]
        )
        == 2
    )
    assert "tokenizer folder" in _one_line(capsys)


def test_tokenizer_and_hf_files_of_a_model_on_s3(model, s3_bucket):
    """A model on s3://: its tokenizer files are copied (bounded) to a private local folder
    and loaded; the files for hf/ include them and a generation config."""
    import s3fs

    from pipeline.stream_inputs import hf_files, load_tokenizer

    url, opts = s3_bucket
    s3fs.S3FileSystem(**opts).put(str(model), f"{url[5:]}/model", recursive=True)
    tok = load_tokenizer(f"{url}/model", opts)
    local = load_tokenizer(str(model), None)
    assert tok("the quick brown fox")["input_ids"] == local("the quick brown fox")["input_ids"]
    files = hf_files(f"{url}/model", opts)
    assert {"config.json", "tokenizer.json", "generation_config.json"} <= set(files)
    assert json.loads(files["config.json"]) == json.loads((model / "config.json").read_text())


def test_a_folder_without_weights_is_refused(tmp_path, capsys):
    from pipeline.cli import main

    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    assert main(["stream", str(tmp_path / "m"), str(tmp_path / "w")]) == 2
    _one_line(capsys)


def test_eval_without_text_is_one_line_before_ray(model, tmp_path, capsys):
    from pipeline.cli import main

    text = write_corpus(tmp_path / "calib.txt", lines=20)
    argv = ["stream", str(model), str(tmp_path / "w"), "--eval", str(text), "--eval-seq-len", "32"]
    assert main(argv) == 2
    assert "--eval needs --text" in _one_line(capsys)


def test_serve_bits_caps_the_rows_levels_of_a_streamed_run(model, tmp_path):
    """`--serve-bits B` is quantize.serve_bits: the run's config caps k_max at 2^B."""
    from pipeline.cli import build_parser
    from pipeline.config import from_dict
    from pipeline.stream_cli import stream_config

    def config(*extra):
        args = build_parser().parse_args(["stream", str(model), str(tmp_path / "w"), *extra])
        return from_dict(stream_config(args))

    assert config().quantize.serve_bits is None
    q = config("--method", "ecsq", "--serve-bits", "3").quantize
    assert q.serve_bits == 3 and q.k_max == 8
    with pytest.raises(SystemExit):
        config("--serve-bits", "5")


def test_prune_is_one_shot_pruning_of_every_decoder_linear(model, tmp_path):
    """`--prune 2:4` / `--prune 0.75`: prune.method one_shot, OBD, every decoder Linear."""
    from pipeline.cli import build_parser
    from pipeline.config import from_dict
    from pipeline.config_checks import one_shot
    from pipeline.stream_cli import stream_config

    def config(*extra):
        args = build_parser().parse_args(["stream", str(model), str(tmp_path / "w"), *extra])
        return from_dict(stream_config(args))

    assert not config().prune.enabled
    p = config("--prune", "2:4").prune
    assert (p.n_m, p.keep, p.criterion, p.scope) == ("2:4", {"*": 0.5}, "obd", "row")
    cfg = config("--prune", "0.75")
    assert one_shot(cfg) and cfg.prune.keep == {"*": 0.75}
