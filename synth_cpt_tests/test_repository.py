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
