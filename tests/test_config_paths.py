"""Relative paths in a config file are relative to the file, not to where hwq was started."""

import os

from pipeline.api import to_config
from pipeline.config import load_config


def _write(folder, text):
    folder.mkdir(parents=True, exist_ok=True)
    p = folder / "run.yaml"
    p.write_text(text)
    return p


def test_relative_paths_resolve_against_the_config_folder(tmp_path, monkeypatch):
    cfg_dir = tmp_path / "project" / "configs"
    path = _write(cfg_dir, """
model: {name: factory, factory: "mypkg.models:build", checkpoint: ../weights/w.safetensors}
data:
  name: text
  calibration: [corpus/*.txt, "{stdlib}/*.py", s3://bucket/text.txt, /abs/t.txt]
  eval: {a: held/a.txt, b: [held/b1.txt, ~/b2.txt]}
store: {url: runs/here}
quantize: {scope: channel}
""")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load_config(path)
    assert cfg.model.checkpoint == str(tmp_path / "project" / "weights" / "w.safetensors")
    assert cfg.data.calibration == [str(cfg_dir / "corpus" / "*.txt"), "{stdlib}/*.py",
                                    "s3://bucket/text.txt", "/abs/t.txt"]
    assert cfg.data.eval == {"a": str(cfg_dir / "held" / "a.txt"),
                             "b": [str(cfg_dir / "held" / "b1.txt"), "~/b2.txt"]}
    assert cfg.store.url == "runs/here"  # where the run writes: relative to the working folder
    assert cfg.model.factory == "mypkg.models:build"  # an import path, not a file
    # What the store records is the resolved config: a worker elsewhere reads the same files.
    assert cfg.redacted()["model"]["checkpoint"] == cfg.model.checkpoint


def test_overrides_are_relative_to_the_working_folder(tmp_path, monkeypatch):
    path = _write(tmp_path / "cfgs", "model: {name: factory, factory: 'm:f'}\nquantize: {scope: channel}\n")
    monkeypatch.chdir(tmp_path)
    cfg = load_config(path, ["model.checkpoint=ckpt/w.safetensors"])
    assert cfg.model.checkpoint == os.path.join(str(tmp_path), "ckpt", "w.safetensors")
    cfg = to_config({"model": {"name": "factory", "factory": "m:f", "checkpoint": "w.st"},
                     "quantize": {"scope": "channel"}})
    assert cfg.model.checkpoint == os.path.join(str(tmp_path), "w.st")


def test_the_same_config_means_the_same_files_from_any_folder(tmp_path, monkeypatch):
    path = _write(tmp_path / "c", "model: {name: factory, factory: 'm:f', checkpoint: w.st}\nquantize: {scope: channel}\n")
    keys = set()
    for where in (tmp_path, tmp_path / "c"):
        monkeypatch.chdir(where)
        keys.add(load_config(path).model.checkpoint)
        keys.add(load_config(os.path.relpath(path, where)).model.checkpoint)
    assert keys == {str(tmp_path / "c" / "w.st")}
