import pytest
import torch
from safetensors.torch import save_file

from pipeline.data import DatasetMissing, load_split
from pipeline.models import build, load_checkpoint, num_params


def test_lenet5_has_the_papers_431080_parameters():
    m = build("lenet5")
    assert num_params(m) == 431_080
    assert m(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def test_unknown_model_is_a_clear_error():
    with pytest.raises(ValueError, match="not a known model"):
        build("resnet9000")


def test_checkpoint_roundtrip_and_validation(tmp_path):
    m = build("lenet5")
    p = tmp_path / "m.safetensors"
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, p)
    state = load_checkpoint(str(p), build("lenet5"))
    assert all(torch.equal(state[k], v) for k, v in m.state_dict().items())
    bad = dict(m.state_dict())
    bad["fc2.weight"] = torch.full_like(bad["fc2.weight"], float("nan"))
    save_file({k: v.contiguous() for k, v in bad.items()}, tmp_path / "nan.safetensors")
    with pytest.raises(ValueError, match="NaN"):
        load_checkpoint(str(tmp_path / "nan.safetensors"), build("lenet5"))
    (tmp_path / "junk.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        load_checkpoint(str(tmp_path / "junk.safetensors"), build("lenet5"))
    with pytest.raises(ValueError, match="does not exist"):
        load_checkpoint(str(tmp_path / "missing.safetensors"), build("lenet5"))


def test_checkpoint_from_s3(s3_bucket):
    import fsspec

    url, opts = s3_bucket
    m = build("lenet5")
    from safetensors.torch import save

    with fsspec.open(f"{url}/ckpt.safetensors", "wb", **opts) as f:
        f.write(save({k: v.contiguous() for k, v in m.state_dict().items()}))
    state = load_checkpoint(f"{url}/ckpt.safetensors", build("lenet5"), opts)
    assert torch.equal(state["fc1.weight"], m.state_dict()["fc1.weight"])


def test_fashion_mnist_loads_and_missing_data_names_the_package(tmp_path):
    test = load_split("/usr/share/datasets/fashion-mnist", "test")
    assert test.x.shape == (10_000, 1, 28, 28) and test.y.max() == 9
    with pytest.raises(DatasetMissing, match="dataset-fashion-mnist.*data.root"):
        load_split(str(tmp_path), "test")
