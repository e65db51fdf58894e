"""The README's promises: its asset graph names every asset, its commands exist, its config keys are real."""

import re
import subprocess
import sys
from pathlib import Path

import yaml

from synth_cpt.core.config import PipelineConfig, default_config_text

from .conftest import REPO

README = (REPO / "README.md").read_text(encoding="utf-8")


def test_asset_graph_figure_names_every_asset_and_edge(isolated_env):
    from synth_cpt.defs.definitions import build_definitions

    defs = build_definitions()
    graph = defs.resolve_asset_graph()
    figure = README.split("```mermaid", 1)[1].split("```", 1)[0]
    for key in graph.get_all_asset_keys():
        name = key.to_user_string()
        assert re.search(rf"\b{name}\b", figure), f"{name} is missing from the README figure"
        for parent in graph.get(key).parent_keys:
            assert re.search(rf"{parent.to_user_string()}\b[^\n]*-->\s*{name}\b", figure), f"edge {parent} -> {name}"


def test_readme_commands_are_make_targets():
    makefile = (REPO / "Makefile").read_text()
    targets = re.findall(r"^make (\w[\w-]*)", README, flags=re.M)
    assert {"demo", "test", "ui", "install"} <= set(targets), targets
    for target in targets:
        assert re.search(rf"^{target}:", makefile, flags=re.M), f"make {target} is in the README but not the Makefile"
    assert "make test" in (REPO / ".ci" / "run").read_text()


def test_every_config_key_in_the_readme_table_exists():
    keys = re.findall(r"^\| `([a-z_.]+)`", README, flags=re.M)
    defaults = yaml.safe_load(default_config_text())
    config_keys = [k for k in keys if "." in k or k in PipelineConfig.model_fields]  # the others: asset names in other tables
    assert len(config_keys) >= 10, config_keys
    for key in config_keys:
        node = defaults
        for part in key.split("."):
            assert isinstance(node, dict) and part in node, f"README config key {key} is not in the shipped defaults"
            node = node[part]


def test_config_command_prints_the_effective_config(isolated_env):
    exe = Path(sys.executable).with_name("synth-cpt")
    out = subprocess.run([str(exe), "config"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert '"max_quarantine_rate": 0.2' in out.stdout


def test_the_readme_methods_table_states_every_prompts_limits():
    """The README says per prompt which paper and which limits it follows: the limits it states are the files'."""
    from synth_cpt.synthesis.prompts import load_kind

    rows = {}
    for line in README.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("| `") else None
        if cells and len(cells) == 6:
            for name in re.findall(r"`([a-z_]+)`", cells[0]):
                rows[name] = cells
    prompts = {**load_kind("rewrite"), **load_kind("entigraph"), **load_kind("judge")}
    assert set(rows) == set(prompts)
    for name, prompt in prompts.items():
        spec, cells = prompt.spec, rows[name]
        assert cells[3] == str(spec.output.max_tokens), name
        if prompt.kind != "judge":
            assert cells[2].startswith(str(spec.chunking.max_input_tokens)), name
        temperature = spec.sampling["temperature"]
        assert cells[4].split(",")[0] == ("greedy" if temperature == 0 else f"T {temperature}"), name
