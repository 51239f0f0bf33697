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
