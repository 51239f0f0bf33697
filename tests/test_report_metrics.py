"""Reports, sweep pages and plots key on the run's metric (perplexity for language models)."""

from pipeline.plots import rate_metric_png, sweep_markdown
from pipeline.report import render_markdown


def _lm_report(ppl_q=30.0, ppl_ft=28.0, bits=3.2):
    by = lambda v: {"GPL-3": v * 1.1, "GFDL-1.3": v * 0.9}  # noqa: E731
    return {
        "name": "smol", "config_digest": "0" * 16, "seconds": 10.0,
        "model": {"name": "hf_causal_lm", "path": "x.gguf", "params": 1000,
                  "quantized_params": 800},
        "metric": {"name": "perplexity", "direction": "lower"},
        "stages": {"load": {"order": 0, "key": "a" * 16, "cached": False, "seconds": 1.0,
                            "compute_seconds": 1.0}},
        "metrics": {
            "baseline_perplexity": 20.0, "baseline_perplexity_by_set": by(20.0),
            "quantized_perplexity": ppl_q, "quantized_perplexity_by_set": by(ppl_q),
            "finetuned_perplexity": ppl_ft, "finetuned_perplexity_by_set": by(ppl_ft),
            "decoded_perplexity": ppl_ft, "decoded_perplexity_by_set": by(ppl_ft),
            "bits_per_weight": bits,
            "quantize": {"method": "ecsq", "scope": "channel"},
            "encode": {"file": "m.hwq", "file_bytes": 500, "bits_per_weight": bits,
                       "quantized_params": 800, "index_bits_per_weight": bits - 0.3,
                       "codebook_bits_per_weight": 0.25, "original_bytes": 4000,
                       "compression_ratio": 8.0, "compression_ratio_vs_fp32": 8.0,
                       "raw_tensor_bytes": 100,
                       "bits": {"indices": 2000, "codebooks": 200, "code_tables": 10,
                                "positions": 0, "raw_tensors": 800, "header": 990}},
        },
    }


def test_report_markdown_is_about_perplexity_per_text():
    md = render_markdown(_lm_report())
    assert "## Perplexity (lower is better)" in md
    assert "| model state | perplexity | GPL-3 | GFDL-1.3 |" in md
    assert "| quantized + fine-tuned | 28 | 30.8 | 25.2 |" in md
    assert "fine-tuned 1.400×" in md
    assert "**3.200 bits per weight**" in md and "800 quantized weights" in md
    assert "accuracy" not in md.lower()


def test_a_fine_tune_that_made_things_worse_says_so():
    assert "worse" not in render_markdown(_lm_report(ppl_q=30.0, ppl_ft=28.0))
    md = render_markdown(_lm_report(ppl_q=30.0, ppl_ft=31.5))
    assert "**Fine-tuning made the perplexity worse**: 30 quantized, 31.5 after" in md
    acc = _lm_report()
    acc["metric"] = {"name": "accuracy", "direction": "higher"}
    acc["metrics"] = {"quantized_accuracy": 0.91, "finetuned_accuracy": 0.907}
    assert "Fine-tuning made the accuracy worse" in render_markdown(acc)
    # block-wise: the block errors and the held-out calibration perplexity
    bw = _lm_report()
    bw["metrics"]["finetune"] = {
        "mode": "blockwise", "steps_per_block": 32, "validation_windows": 8, "reverted_blocks": 1,
        "blocks": [{"errors": {"val_before": 0.2, "val_after": 0.1}},
                   {"errors": {"val_before": 0.4, "val_after": 0.5}}],
        "validation_perplexity": {"unquantized": 10.0, "quantized": 12.0, "finetuned": 12.5}}
    md = render_markdown(bw)
    assert "relative block output error on the held-out calibration windows 0.3 → 0.3" in md
    assert "1 blocks kept their quantized codebooks" in md
    assert "**Block-wise fine-tuning made the held-out perplexity worse**" in md


def test_lenet_report_still_shows_accuracy_in_percent():
    r = _lm_report()
    r["metric"] = {"name": "accuracy", "direction": "higher"}
    r["metrics"] = {"baseline_accuracy": 0.9157, "decoded_accuracy": 0.9079}
    md = render_markdown(r)
    assert "| baseline | 91.57% |" in md and "| decoded from the .hwq file | 90.79% |" in md


class _Store:
    def __init__(self):
        self.files = {}

    def write_bytes(self, rel, data):
        self.files[rel] = data


def test_sweep_page_and_plot_for_perplexity():
    runs = [{"run": f"00{i}", "metric": {"name": "perplexity", "direction": "lower"},
             "metrics": _lm_report(30 - i, 28 - i, 3 + i)["metrics"]} for i in range(3)]
    store = _Store()
    md = sweep_markdown({"name": "s", "seconds": 1.0, "stage_counts": {}, "runs": runs},
                        store, "sweeps/s")
    assert "quantized perplexity" in md and "| 001 | ecsq | 4 | 29 | 27 | 27 |" in md
    assert store.files["sweeps/s/rate_perplexity.png"][:8] == b"\x89PNG\r\n\x1a\n"
    assert rate_metric_png(runs, "perplexity")[:4] == b"\x89PNG"
