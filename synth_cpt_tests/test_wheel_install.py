"""A wheel install works anywhere: the wheel built from the tree, installed into a fresh venv outside the
repository, loads the Definitions and the prompt library, and every prompt has the prompt_sha of its file
in the tree (pyproject ships the top-level prompts/ as the package `synth_cpt_prompts`)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

import pytest

from .conftest import REPO

pytestmark = pytest.mark.wheel

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
PROMPT_FILES = sorted((REPO / "prompts").glob("*/*.yaml"))
DOCUMENT = "O Debian Edu é uma distribuição escolar. Os servidores fornecem serviços aos clientes das salas de aula."

# Run by the fresh venv's python: what the installed package sees, as JSON.
PROBE = """
import hashlib, json, sys
import synth_cpt
from synth_cpt.definitions import defs
from synth_cpt.synthesis.prompts import KINDS, load_kind, load_prompt, prompts_dir

prompt = load_prompt("rewrite", "medium")
request = prompt.request("pt", seed=0, text=DOCUMENT, context="", title="")
print(json.dumps({
    "synth_cpt": synth_cpt.__file__,
    "sys_path": sys.path,
    "editable_modules": sorted(m for m in sys.modules if "__editable__" in m),
    "editable_finders": [repr(f) for f in sys.meta_path if "__editable__" in getattr(f, "__module__", "")],
    "prompts_dir": str(prompts_dir()),
    "asset_keys": sorted(k.to_user_string() for k in defs.resolve_asset_graph().get_all_asset_keys()),
    "medium_sha": prompt.sha,
    "request_sha": request.prompt_sha,
    "messages": request.message_dicts(),
    "shas": {f"{kind}/{name}": p.sha for kind in KINDS for name, p in load_kind(kind).items()},
}))
"""


def _run(args: list, **kw) -> subprocess.CompletedProcess:
    out = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=120, **kw)
    assert out.returncode == 0, f"{args[:4]} exited {out.returncode}\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}"
    return out


def _tree_sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(wheel, fresh venv's bin folder, a work folder outside the repository)."""
    tmp = tmp_path_factory.mktemp("wheel")
    # Build from a clean copy of the build's inputs: `pip wheel .` in the tree would write build/ and
    # *.egg-info into a working tree others share, and setuptools reuses build/lib, so a file deleted
    # from the tree would still ship.
    src = tmp / "src"
    roots = {p.split(".")[0] for p in PYPROJECT["tool"]["setuptools"]["packages"]}
    roots = {PYPROJECT["tool"]["setuptools"].get("package-dir", {}).get(r, r) for r in roots}
    for name in sorted(roots):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", PYPROJECT["project"]["readme"], "MANIFEST.in"):
        if (REPO / name).is_file():
            shutil.copy2(REPO / name, src / name)
    dist = tmp / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", dist, src])
    (wheel,) = dist.glob("synth_cpt-*.whl")

    # A fresh venv outside the repository, the wheel installed into it by this venv's pip (nothing downloaded).
    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv])
    python = venv / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "-q", wheel])
    # The dependencies: this venv's site-packages named by a .pth. Python adds that folder to sys.path
    # without processing the .pth files inside it, so the editable install of the tree does not leak in.
    fresh_site = Path(_run([python, "-I", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    deps = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))
    (fresh_site / "_synth_cpt_test_deps.pth").write_text("".join(f"{d}\n" for d in deps))
    work = tmp / "work"
    work.mkdir()
    return wheel, venv / "bin", work


def _env(work: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SYNTH_CPT_", "PYTHON", "VIRTUAL_ENV"))}
    return {**env, "DAGSTER_HOME": str(work / "dagster_home"), "SYNTH_CPT_HOME": str(work / "home"), "COLUMNS": "300"}


def test_packages_list_every_folder():
    """pyproject lists the packages (the prompt library is mapped, so they cannot be found): a new folder
    under synth_cpt/ or prompts/ must be listed, or the wheel would silently lack it."""
    setuptools = PYPROJECT["tool"]["setuptools"]
    assert setuptools["package-dir"] == {"synth_cpt_prompts": "prompts"}
    folders = {".".join(p.relative_to(REPO).parts) for p in (REPO / "synth_cpt").rglob("*") if p.is_dir() and p.name != "__pycache__"}
    kinds = {f"synth_cpt_prompts.{p.name}" for p in (REPO / "prompts").iterdir() if p.is_dir()}
    assert set(setuptools["packages"]) == {"synth_cpt", *folders, "synth_cpt_prompts", *kinds}
    assert {f"synth_cpt_prompts.{p}" for p in ("rewrite", "entigraph", "judge")} <= kinds
    for kind in kinds:
        assert setuptools["package-data"].get(kind) == ["*.yaml"], f"{kind} ships no prompt files"


def test_the_wheel_carries_the_prompt_library_and_the_defaults(installed):
    wheel, _, _ = installed
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        assert PROMPT_FILES and len(PROMPT_FILES) == len([n for n in names if n.startswith("synth_cpt_prompts/")])
        for path in PROMPT_FILES:
            assert z.read(f"synth_cpt_prompts/{path.parent.name}/{path.name}") == path.read_bytes(), path
        defaults = sorted((REPO / "synth_cpt" / "defaults").glob("*.yaml"))
        assert defaults and all(f"synth_cpt/defaults/{p.name}" in names for p in defaults)
        top_level = z.read(next(n for n in names if n.endswith(".dist-info/top_level.txt"))).decode().split()
    assert sorted(top_level) == ["synth_cpt", "synth_cpt_prompts"]
    assert not any(n.startswith(("prompts/", "synth_cpt_tests/")) for n in names)


def test_an_installed_wheel_loads_the_definitions_and_renders_the_tree_s_prompts(installed):
    _, bin_dir, work = installed
    script = f"DOCUMENT = {DOCUMENT!r}\n{PROBE}"
    out = json.loads(_run([bin_dir / "python", "-I", "-c", script], cwd=work, env=_env(work)).stdout.splitlines()[-1])
    venv = bin_dir.parent.resolve()
    # the installed copy, not the tree, and nothing of the tree's editable install
    assert Path(out["synth_cpt"]).resolve().is_relative_to(venv), out["synth_cpt"]
    assert Path(out["prompts_dir"]).resolve().is_relative_to(venv), out["prompts_dir"]
    assert not out["editable_modules"] and not out["editable_finders"]
    deps = {Path(sysconfig.get_paths()[k]).resolve() for k in ("purelib", "platlib")}  # this venv's, which may be in the tree
    from_tree = [p for p in out["sys_path"] if p and Path(p).resolve().is_relative_to(REPO) and Path(p).resolve() not in deps]
    assert not from_tree
    # the Definitions load
    assert {"rewrites_medium", "entity_graphs"} <= set(out["asset_keys"])
    # a rendered prompt carries the sha of the tree's file, and every packaged prompt equals its tree file
    medium = _tree_sha(REPO / "prompts" / "rewrite" / "medium.yaml")
    assert out["medium_sha"] == out["request_sha"] == medium
    assert [m["role"] for m in out["messages"]] == ["system", "user"]
    assert DOCUMENT in out["messages"][-1]["content"] and "português" in out["messages"][-1]["content"]
    assert out["shas"] == {f"{p.parent.name}/{p.stem}": _tree_sha(p) for p in PROMPT_FILES}


def test_the_installed_console_script_lists_every_prompt(installed):
    _, bin_dir, work = installed
    out = _run([bin_dir / "synth-cpt", "prompts", "list"], cwd=work, env=_env(work))
    assert PROMPT_FILES, "the tree's prompt library is found"
    for path in PROMPT_FILES:
        assert path.stem in out.stdout and _tree_sha(path)[:12] in out.stdout, path
