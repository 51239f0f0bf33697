"""Text sources and token windows: reading files, globs and URLs with clear errors, piecewise
tokenization equal to whole-text tokenization, seeded calibration windows, GPTQ eval windows."""

import gzip
import uuid

import numpy as np
import pytest
import torch

from pipeline.data.text import (
    TextSourceError,
    _pieces,
    calibration_windows,
    eval_windows,
    read_text,
    token_ids,
)

transformers = pytest.importorskip("transformers")

WORDS = ("the quick brown fox jumps over a lazy dog while hessian weighted quantization of "
         "every layer keeps the loss low and the file small é 日本 🙂").split()


def corpus(lines: int = 200, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    return "".join(" ".join(rng.choice(WORDS, size=rng.integers(3, 12)))
                   + (".\n" if i % 7 else "\n\n") for i in range(lines))


@pytest.fixture(scope="module")
def tok():
    """A byte-level BPE (300 tokens) trained here, as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    t.train_from_iterator([corpus()], trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<s>", "</s>"]))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<s>",
                                                eos_token="</s>")


def _whole(tok, text):
    return torch.tensor(tok(text, add_special_tokens=False)["input_ids"])


# -- read_text ----------------------------------------------------------------------------------


def test_read_text_files_globs_urls_and_compression(tmp_path):
    import fsspec

    (tmp_path / "b.txt").write_text("second\n", encoding="utf-8")
    (tmp_path / "a.txt").write_text("first é\n", encoding="utf-8")
    with gzip.open(tmp_path / "c.txt.gz", "wt", encoding="utf-8") as f:
        f.write("zipped")
    assert read_text(str(tmp_path / "a.txt")) == "first é\n"
    assert read_text(str(tmp_path / "*.txt")) == "first é\n\n\nsecond\n"  # sorted, blank line
    assert read_text([str(tmp_path / "b.txt"), str(tmp_path / "c.txt.gz")]) == \
        "second\n\n\nzipped"
    root = f"memory://hwq-text-{uuid.uuid4().hex[:8]}"
    with fsspec.open(f"{root}/x.txt", "wb") as f:
        f.write(b"in memory")
    assert read_text(f"{root}/*.txt") == "in memory"
    fsspec.filesystem("memory").rm(root, recursive=True)


def test_read_text_errors_name_the_source(tmp_path):
    with pytest.raises(TextSourceError, match="nope.txt' does not exist"):
        read_text(str(tmp_path / "nope.txt"))
    with pytest.raises(TextSourceError, match=r"\*.md': the pattern matches no file"):
        read_text(str(tmp_path / "*.md"))
    (tmp_path / "empty.txt").write_text(" \n\t")
    with pytest.raises(TextSourceError, match="empty.txt' is empty"):
        read_text(str(tmp_path / "empty.txt"))
    (tmp_path / "bin.txt").write_bytes(b"ok\xff\xfe")
    with pytest.raises(TextSourceError, match=r"bin.txt' .*is not UTF-8 text \(byte 2"):
        read_text([str(tmp_path / "*.txt")])
    with pytest.raises(TextSourceError, match="is a folder"):
        read_text(str(tmp_path))
    with pytest.raises(TextSourceError, match="no text sources"):
        read_text([])


# -- tokenization -------------------------------------------------------------------------------


def test_piecewise_tokenization_equals_the_whole_text(tok):
    text = corpus(600, seed=1)
    whole = _whole(tok, text)
    stitched = _pieces(tok.backend_tokenizer, text, 1000, 250, agree=32)
    assert stitched is not None  # the pieces really were stitched, not re-tokenized whole
    assert torch.equal(torch.from_numpy(stitched), whole)
    for piece in (1000, 3000, 10**9):  # 10**9: a single call
        assert torch.equal(token_ids(tok, text, piece_chars=piece), whole)
    # Pieces too small to find 32 agreeing tokens fall back to one call: still equal.
    assert _pieces(tok.backend_tokenizer, text, 97, 64, agree=32) is None
    assert torch.equal(token_ids(tok, text, piece_chars=97), whole)
    with_bos = token_ids(tok, text, add_special_tokens=True, piece_chars=1000)
    assert torch.equal(with_bos, torch.tensor(tok(text)["input_ids"]))


# -- windows ------------------------------------------------------------------------------------


def test_calibration_windows_are_seeded_uniform_slices(tok):
    text = corpus(100, seed=2)
    ids = _whole(tok, text)
    n, length = 16, 32
    w = calibration_windows(tok, text, n, length, seed=7)
    assert w.shape == (n, length) and w.dtype == torch.int64
    assert torch.equal(w, calibration_windows(tok, text, n, length, seed=7))
    assert not torch.equal(w, calibration_windows(tok, text, n, length, seed=8))
    # Exactly the documented draw: distinct starts from default_rng(seed).choice.
    starts = np.random.default_rng(7).choice(len(ids) - length + 1, size=n, replace=False)
    assert len(set(starts.tolist())) == n
    for row, s in zip(w, starts, strict=True):
        assert torch.equal(row, ids[s : s + length])
    # Token ids can be given instead of text; more windows than starts draw with replacement.
    assert torch.equal(calibration_windows(None, ids, n, length, seed=7), w)
    short = ids[:40]
    many = calibration_windows(None, short, 20, 32, seed=0)
    assert many.shape == (20, 32) and int(many.max()) < 300
    last = calibration_windows(None, short, 1, 40, seed=0)
    assert torch.equal(last[0], short)  # the only valid start is 0


def test_eval_windows_are_consecutive_and_drop_the_tail(tok):
    text = corpus(100, seed=3)
    ids = _whole(tok, text)
    w = eval_windows(tok, text, 64)
    m = len(ids) // 64
    assert w.shape == (m, 64) and torch.equal(w.flatten(), ids[: m * 64])
    assert torch.equal(eval_windows(tok, text, 64, max_windows=3), w[:3])
    assert eval_windows(tok, text, 64, max_windows=10**6).shape == (m, 64)


def test_windows_need_enough_text(tok):
    with pytest.raises(TextSourceError, match=r"has \d+ tokens, fewer than one window of "
                                              r"seq_len=4096"):
        calibration_windows(tok, "a few words", 4, 4096, seed=0)
    with pytest.raises(TextSourceError, match="fewer than one window"):
        eval_windows(tok, "a few words", 4096)
    with pytest.raises(ValueError, match="seq_len must be ≥ 2"):
        eval_windows(tok, corpus(10), 1)
    with pytest.raises(ValueError, match="n must be ≥ 1"):
        calibration_windows(tok, corpus(10), 0, 8, seed=0)


def test_held_out_tail_is_whole_windows_the_calibration_never_sees():
    import torch

    from pipeline.data.text import TextSourceError, split_heldout

    ids = torch.arange(10_000)
    calib, held = split_heldout(ids, 512)
    assert len(held) == 512 * 1 and len(calib) == 10_000 - 512  # ⌊1000 / 512⌋ = 1 window
    assert torch.equal(torch.cat([calib, held]), ids)
    calib, held = split_heldout(torch.arange(100_000), 512)
    assert len(held) == 512 * 19  # 10%, in whole windows
    calib, held = split_heldout(torch.arange(1024), 512)  # the least: one window each
    assert len(calib) == len(held) == 512
    with pytest.raises(TextSourceError, match=r"data.calibration 'c.txt' has 1023 tokens"):
        split_heldout(torch.arange(1023), 512, source="data.calibration 'c.txt'")
