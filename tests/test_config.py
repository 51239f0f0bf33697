import pytest

from pipeline.config import ConfigError, digest, load_config

CFG = "configs/lenet5_fmnist.yaml"


def test_default_config_loads_and_digest_is_stable():
    a, b = load_config(CFG), load_config(CFG)
    assert digest(a) == digest(b)
    assert a.quantize.method == "uniform" and a.quantize.target_bits == 3.0


def test_unknown_key_names_its_path_and_suggests():
    with pytest.raises(ConfigError, match=r"prune\.kep: unknown key; did you mean 'keep'"):
        load_config(CFG, ["prune.kep=0.5"])
    with pytest.raises(ConfigError, match=r"trian: unknown key; did you mean 'train'"):
        load_config(CFG, ["trian.epochs=3"])


def test_wrong_type_and_impossible_values():
    with pytest.raises(ConfigError, match=r"train\.epochs"):
        load_config(CFG, ["train.epochs=many"])
    with pytest.raises(ConfigError, match=r"train\.epochs"):
        load_config(CFG, ["train.epochs=0"])
    with pytest.raises(ConfigError, match=r"keep ratio of 'fc1.weight' is 1.5"):
        load_config(CFG, ["prune.keep={fc1.weight: 1.5}"])
    with pytest.raises(ConfigError, match="either quantize.k or quantize.target_bits"):
        load_config(CFG, ["quantize.k=8", "quantize.target_bits=2"])
    with pytest.raises(ConfigError, match="takes a fixed k"):
        load_config(CFG, ["quantize.method=kmeans", "quantize.target_bits=2"])


def test_overrides_change_digest_but_placement_does_not():
    base = load_config(CFG)
    assert digest(load_config(CFG, ["quantize.target_bits=2.5"])) != digest(base)
    # Where the work runs is not what it computes.
    assert digest(load_config(CFG, ["store.url=s3://b/x", "executor.address=auto"])) == digest(base)


def test_bad_override_syntax_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="expected section.key=value"):
        load_config(CFG, ["quantize"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad)


# -- language-model defaults ----------------------------------------------------------------

MINIMAL_LM = {"model": {"name": "hf_causal_lm", "path": "DIR"},
              "data": {"calibration": "corpus.txt"}}


def test_a_model_folder_and_one_text_is_a_whole_config():
    from pipeline.config import from_dict

    cfg = from_dict(MINIMAL_LM)
    assert cfg.data.name == "text" and cfg.data.calibration == ["corpus.txt"]
    assert cfg.data.eval == {}  # evaluated on the held-out tail of the calibration text
    assert cfg.quantize.scope == "channel" and cfg.hessian.estimator == "fisher"
    assert cfg.evaluate.metric == "perplexity"
    assert cfg.finetune.batch_size == 64  # 128 cut to the 64 calibration windows
    assert not cfg.prune.enabled


def test_inferred_defaults_hash_like_the_explicit_values_they_stand_for():
    """So a store made by an explicit config keeps its cache hits under the short one."""
    from pipeline.config import from_dict
    from pipeline.stages import default_stages

    explicit = {"model": {"name": "hf_causal_lm", "path": "DIR"},
                "data": {"name": "text", "calibration": ["corpus.txt"]},
                "quantize": {"scope": "channel"}, "hessian": {"estimator": "fisher"},
                "finetune": {"batch_size": 64}, "evaluate": {"metric": "perplexity"}}
    a, b = from_dict(MINIMAL_LM), from_dict(explicit)
    assert a.resolved() == b.resolved() and digest(a) == digest(b)
    for stage in default_stages():
        if stage.name != "load":  # (its sources section reads the files)
            assert stage.sections(a) == stage.sections(b), stage.name
    # The round trip through a dump (what --set and the API do) changes nothing either.
    assert digest(from_dict(a.resolved())) == digest(a)


def test_explicit_values_win_over_inferred_ones():
    from pipeline.config import from_dict

    def cfg(**sections):
        return from_dict({**MINIMAL_LM, **{k: {**MINIMAL_LM.get(k, {}), **v}
                                           for k, v in sections.items()}})

    assert cfg(quantize={"scope": "group"}).quantize.scope == "group"
    assert cfg(finetune={"batch_size": 8}).finetune.batch_size == 8
    assert cfg(hessian={"estimator": "activation"}).hessian.estimator == "activation"
    assert cfg(data={"eval": {"gpl": "g.txt"}}).data.eval == {"gpl": "g.txt"}
    # The default batch follows the windows, in whole shares of the workers.
    assert cfg(data={"calibration_windows": 7}).finetune.batch_size == 6
    assert cfg(data={"calibration_windows": 500}).finetune.batch_size == 128
    with pytest.raises(ConfigError, match="needs data.name=text"):
        cfg(data={"name": "fashion_mnist"})
    # every scope for every model: a loaded model may take the paper's network or layer
    # scope (the default stays per channel); streaming still needs per-channel rows
    assert cfg(quantize={"scope": "layer", "method": "kmeans", "k": 8}).quantize.scope == "layer"
    assert cfg().quantize.scope == "channel"
    with pytest.raises(ConfigError, match="scope=channel"):
        cfg(quantize={"scope": "network", "method": "kmeans", "k": 8},
            model={"residency": "streamed"}, finetune={"enabled": False})


def test_fine_tune_batches_are_checked_against_the_windows_when_the_config_loads():
    from pipeline.config import from_dict

    lm = {**MINIMAL_LM, "data": {"calibration": "c.txt", "calibration_windows": 16}}
    with pytest.raises(ConfigError, match=r"finetune.batch_size=32 is larger than the 16 "
                                          r"samples .*data.calibration_windows"):
        from_dict({**lm, "finetune": {"batch_size": 32}})
    with pytest.raises(ConfigError, match="not divisible by finetune.workers=2"):
        from_dict({**lm, "finetune": {"batch_size": 9}})
    with pytest.raises(ConfigError, match="finetune.workers=4 is more than the 3"):
        from_dict({**lm, "data": {"calibration": "c.txt", "calibration_windows": 3},
                   "finetune": {"workers": 4}})
    from_dict({**lm, "finetune": {"batch_size": 32, "enabled": False}})  # not fine-tuned: fine
    with pytest.raises(ConfigError, match=r"data.train_samples"):
        load_config(CFG, ["data.train_samples=100"])  # LeNet-5: batch 128 of 100 images


def test_error_feedback_is_refused_where_it_cannot_run(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "t.txt").write_text("text")
    lm = [f"model.path={tmp_path / 'm'}", "model.name=hf_causal_lm",
          f"data.calibration=[{tmp_path / 't.txt'}]", "finetune.enabled=false"]
    cfg = load_config(None, [*lm, "quantize.method=ecsq", "quantize.feedback=ldl"])
    assert cfg.quantize.feedback == "ldl" and cfg.quantize.feedback_block == 128
    with pytest.raises(ConfigError, match="quantize.feedback=ldl needs quantize.scope=channel"):
        load_config(None, [*lm, "quantize.scope=group", "quantize.feedback=ldl"])
    with pytest.raises(ConfigError, match="quantize.feedback=ldl needs model.name=hf_causal_lm"):
        load_config(CFG, ["quantize.scope=channel", "quantize.method=ecsq",
                          "quantize.feedback=ldl"])
    with pytest.raises(ConfigError, match="quantize.feedback=ldl needs finetune.mode=blockwise"):
        load_config(None, [*lm[:3], "quantize.feedback=ldl"])
