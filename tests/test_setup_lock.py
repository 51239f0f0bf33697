"""The lock of the resolved dependency set: what `make setup` installs and the tests assert."""

import re
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


def _lock() -> dict[str, str]:
    pins = {}
    for ln in (ROOT / "requirements.lock").read_text().splitlines():
        if not ln.strip() or ln.startswith("#"):
            continue
        m = re.fullmatch(r"([A-Za-z0-9_.\-]+)==(\S+)", ln.strip())
        assert m, f"requirements.lock: not a pin: {ln!r}"
        pins[canonicalize_name(m.group(1))] = m.group(2)
    return pins


def test_every_direct_dependency_is_pinned_in_the_lock():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = meta["dependencies"] + meta["optional-dependencies"]["dev"]
    lock = _lock()
    missing = [r for r in reqs if canonicalize_name(Requirement(r).name) not in lock]
    assert not missing, f"not in requirements.lock (run make lock): {missing}"
    for r in map(Requirement, reqs):  # the lock satisfies pyproject's own bounds
        assert r.specifier.contains(Version(lock[canonicalize_name(r.name)]).public, prereleases=True), r


def test_the_installed_set_is_the_lock():
    """A fresh `make setup` installs exactly the locked versions (public part: a CUDA image's
    torch has no `+cpu` label)."""
    wrong = {}
    for name, pin in _lock().items():
        try:
            got = version(name)
        except PackageNotFoundError:
            wrong[name] = (pin, None)
            continue
        if Version(got).public != Version(pin).public:
            wrong[name] = (pin, got)
    assert not wrong, f"installed versions differ from requirements.lock (rerun make setup): {wrong}"


def test_the_image_pins_are_the_lock():
    lock = _lock()
    image = dict(ln.split("==") for ln in (ROOT / "deploy" / "constraints-image.txt").read_text()
                 .splitlines() if ln and not ln.startswith("#"))
    assert image == {k: lock[k] for k in image}
    constraints = dict(ln.split("==") for ln in (ROOT / "constraints.txt").read_text()
                       .splitlines() if ln and not ln.startswith("#"))
    for name, pin in constraints.items():  # the hand-written pins the lock was resolved under
        assert Version(lock[canonicalize_name(name)]).public == Version(pin).public, name
