"""The product package holds no test infrastructure: tests' tools live in testkit/, which
`pipeline` never imports (module level or inside a function) and the image does not copy; the
one seam between them, pipeline.hooks, does nothing unless HWQ_HOOK is set."""

import ast
import re
from pathlib import Path

import pytest

from pipeline import hooks
from testkit.faults import crash_finetune

ROOT = Path(__file__).resolve().parents[1]
INFRA = {"chaos", "faults", "localcluster", "testing", "testkit"}


def _imports(path: Path) -> set[str]:
    """Every module name an import in `path` names (absolute imports; relative ones stay in
    pipeline), function-local imports included."""
    out = set()
    for n in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(n, ast.Import):
            out |= {a.name for a in n.names}
        elif isinstance(n, ast.ImportFrom) and not n.level and n.module:
            out |= {n.module} | {f"{n.module}.{a.name}" for a in n.names}
    return out


def test_pipeline_holds_and_imports_no_test_infrastructure():
    files = sorted((ROOT / "pipeline").rglob("*.py"))
    assert len(files) > 50
    assert not [f for f in files if f.stem in INFRA]
    bad = {f"{f.relative_to(ROOT)}: {m}" for f in files for m in _imports(f)
           if m.split(".")[0] in {"testkit", "tests", "benchmarks"}}
    assert not bad


def test_the_image_copies_the_product_not_the_test_tools():
    copies = re.findall(r"^COPY\s+(.*)$", (ROOT / "deploy" / "Dockerfile").read_text(), re.M)
    sources = {s.rstrip("/") for c in copies for s in c.split()[1:-1]}
    assert "pipeline" in sources
    assert not sources & {"testkit", "tests", "benchmarks", "."}


def test_no_hook_is_nothing(monkeypatch):
    monkeypatch.delenv(hooks.ENV, raising=False)
    assert hooks.from_env() is None
    hooks.fire(None, "finetune.step", step=3, rank=0)


def test_the_crash_hook_fires_at_its_step_only(monkeypatch):
    monkeypatch.setenv(hooks.ENV, crash_finetune(3))
    spec = hooks.from_env()
    hooks.fire(spec, "finetune.step", step=2, rank=0)
    hooks.fire(spec, "other.event", step=3, rank=0)
    with pytest.raises(RuntimeError, match="simulated failure after step 3"):
        hooks.fire(spec, "finetune.step", step=3, rank=1)


def test_the_kill_once_hook_stays_quiet_once_its_marker_exists(tmp_path):
    marker = tmp_path / "killed"
    marker.touch()  # fired already: a restarted worker must go on (the firing case is os._exit)
    hooks.fire(crash_finetune(3, marker), "finetune.step", step=3, rank=0)


@pytest.mark.parametrize("spec", ["testkit.faults", ":f", "testkit.faults:"])
def test_a_malformed_hook_is_one_clear_error(spec):
    with pytest.raises(ValueError, match="module:function"):
        hooks.fire(spec, "finetune.step", step=1, rank=0)
