"""The README stays true: the two commands are shown, every config key is in docs/CONFIG.md,
and every document the README names exists."""

import re
from pathlib import Path

from pydantic import BaseModel

from pipeline.config import RunConfig

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
CONFIG_DOC = (ROOT / "docs" / "CONFIG.md").read_text()


def _keys(model: type[BaseModel], prefix: str = ""):
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            yield from _keys(ann, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}"


def test_every_config_key_is_in_the_reference():
    documented = set(re.findall(r"`([a-z_]+(?:\.[a-z_0-9]+)?)`", CONFIG_DOC))
    missing = [k for k in _keys(RunConfig) if k not in documented]
    assert not missing, f"docs/CONFIG.md lacks {missing}"


def test_two_commands():
    assert "make run" in README and "make test" in README


def test_documents_named_exist_and_the_readme_is_short():
    for name in re.findall(r"docs/[A-Z_]+\.md", README):
        assert (ROOT / name).exists(), name
    assert len(README.splitlines()) <= 150, "the README is the five-minute read: detail goes in docs/"
