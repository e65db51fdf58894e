"""What the repository must not hold: Dagster's SQLite files once came from a template whose storage
`base_dir` was relative (`storage`), so any Dagster command run in the checkout wrote there."""

import shutil
import subprocess

import pytest
import yaml

from .conftest import REPO


def test_no_instance_files_are_tracked():
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    assert not [f for f in tracked if f.endswith(".db") or f.startswith(("storage/", ".dagster_home/", ".tmp_dagster_home"))]


def test_instance_storage_lives_under_dagster_home():
    template = yaml.safe_load((REPO / "dagster.yaml").read_text())
    assert template["storage"]["sqlite"]["base_dir"] == {"env": "DAGSTER_HOME"}, "never relative to the working folder"


def _imports(path) -> set[str]:
    import ast

    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_dagster_is_imported_only_in_defs_and_the_cli():
    """The house rule of the layout: plain packages stay plain, so unit tests call them directly."""
    package = REPO / "synth_cpt"
    offenders = {}
    for path in package.rglob("*.py"):
        relative = path.relative_to(package).as_posix()
        if relative.startswith("defs/") or relative.startswith("cli/") or relative == "definitions.py":
            continue
        dagster = sorted(n for n in _imports(path) if n.split(".")[0] in ("dagster", "dagster_aws") or n.startswith("synth_cpt.defs"))
        if dagster:
            offenders[relative] = dagster
    assert offenders == {}


def test_core_imports_no_domain_package():
    """core/ is the shared vocabulary: it never reaches up into a domain package."""
    for path in (REPO / "synth_cpt" / "core").glob("*.py"):
        upward = [n for n in _imports(path) if n.startswith("synth_cpt.") and not n.startswith("synth_cpt.core")]
        assert upward == [], (path.name, upward)
