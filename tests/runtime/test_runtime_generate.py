"""`hwq generate` end to end on the tiny Llama written straight to a .hwq file."""

import shutil

import pytest
import torch

from pipeline.cli import main
from pipeline.runtime import load
from testkit.hwq_models import tiny_llama_hwq


@pytest.fixture(scope="module")
def hwq(tmp_path_factory):
    return tiny_llama_hwq(tmp_path_factory.mktemp("gen"))


@pytest.mark.parametrize("mode", ["fast", "reference"])
def test_generate_streams_the_greedy_completion(hwq, capsys, mode):
    prompt = "the quick brown fox"
    rc = main(["generate", str(hwq), "--prompt", prompt, "--max-new-tokens", "6",
               "--threads", "1", "--mode", mode])  # fmt: skip
    out, err = capsys.readouterr()
    assert rc == 0
    model, tok = load(str(hwq), mode=mode, threads=1)
    ids = tok(prompt, return_tensors="pt").input_ids
    want = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                          do_sample=False, pad_token_id=tok.eos_token_id)  # fmt: skip
    text = tok.decode(want[0, ids.shape[1] :], skip_special_tokens=True)
    assert out == prompt + text + "\n"
    assert "hwq generate: 6 tokens" in err and f"mode {mode}" in err


def test_generate_samples_with_a_temperature(hwq, capsys):
    rc = main(["generate", str(hwq), "--prompt", "the", "--max-new-tokens", "3",
               "--temperature", "0.8"])  # fmt: skip
    assert rc == 0 and "3 tokens" in capsys.readouterr().err


def test_generate_errors_are_one_line(hwq, tmp_path, capsys):
    lone = tmp_path / "lone.hwq"
    shutil.copy(hwq, lone)
    cases = [
        ([str(tmp_path / "none.hwq"), "--prompt", "x"], "none.hwq"),
        ([str(lone), "--prompt", "x"], "holds no config.json"),
        ([str(hwq), "--prompt", "x", "--chat"], "with a chat template"),
    ]
    for argv, msg in cases:
        assert main(["generate", *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("hwq: error: ") and msg in err and err.count("\n") == 1
    with pytest.raises(SystemExit) as e:
        main(["generate", str(hwq), "--prompt", "x", "--max-new-tokens", "0"])
    assert e.value.code == 2
