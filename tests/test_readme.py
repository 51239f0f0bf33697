"""The README stays true: every config key is documented, the two commands are shown."""

import re
from pathlib import Path

from pydantic import BaseModel

from pipeline.config import RunConfig

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def _keys(model: type[BaseModel], prefix: str = ""):
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            yield from _keys(ann, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}"


def test_every_config_key_is_in_the_reference():
    documented = set(re.findall(r"`([a-z_]+(?:\.[a-z_0-9]+)?)`", README))
    missing = [k for k in _keys(RunConfig) if k not in documented]
    assert not missing, f"README's configuration reference lacks {missing}"


def test_two_commands():
    assert "make run" in README and "make test" in README
