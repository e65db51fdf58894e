"""NPM on PoETa V2 against values computed by hand (METHODS §8)."""

import json
import math

import pytest

from synth_cpt.evals.npm import load_aliases, load_tasks, npm, npm_of_files, read_results

RESULTS = {
    "results": {
        "assin_rte": {"alias": "assin_rte", "f1,none": 0.8, "f1_stderr,none": 0.01},  # 0-1 reported, table 0-100
        "boolq_pt_greedy": {"acc,none": 0.75},
        "enem_greedy": {"acc": 0.6},  # old harness: no filter suffix
        "tweetsentbr": {"f1_macro,none": float("nan")},
        "agnews_pt_greedy": {"acc,none": 62.5},  # already 0-100
        "imdb_pt": {"acc,none": 80.0},  # 0-100 reported, table 0-1
        "mystery_task_pt": {"acc,none": 0.9},
    }
}


def test_npm_by_hand_with_scales_aliases_nan_and_missing():
    report = npm(RESULTS["results"])
    by = {s.task: s for s in report.scores}
    assert by["assin_rte_greedy"].npm == pytest.approx(60.0)  # 100 * (80 - 50) / (100 - 50)
    assert by["assin_rte_greedy"].scaled.startswith("x100") and by["assin_rte_greedy"].source_name == "assin_rte"
    assert by["boolq_pt_greedy"].npm == pytest.approx(50.0)  # 100 * (0.75 - 0.5) / 0.5
    assert by["enem_greedy"].npm == pytest.approx(50.0)  # 100 * (0.6 - 0.2) / 0.8
    assert by["agnews_pt_greedy"].npm == pytest.approx(50.0) and by["agnews_pt_greedy"].scaled == ""
    assert by["imdb_pt_greedy"].npm == pytest.approx(60.0) and by["imdb_pt_greedy"].scaled.startswith("/100")
    assert report.mean() == pytest.approx(54.0)  # (60 + 50 + 50 + 50 + 60) / 5
    assert report.mean(native=True) == pytest.approx(55.0)  # assin_rte, enem
    assert report.mean(native=False) == pytest.approx(160 / 3)  # boolq, agnews, imdb
    assert report.unmatched == ["mystery_task_pt"]
    assert report.nan == ["tweetsentbr_greedy: f1-macro is nan"]
    assert len(report.missing) == 44 - 6 and "faquad" in report.missing
    summary = report.summary(44)
    assert summary["all"] == {"npm": 54.0, "tasks": 5} and summary["native"]["tasks"] == 2 and summary["alias_version"] == 1


def test_npm_can_be_negative_and_duplicates_are_listed(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps({"results": {"boolq_pt": {"acc,none": 0.25}, "enem_greedy": {"acc,none": 0.2}}}))
    b.write_text(json.dumps({"results": {"boolq_pt_greedy": {"acc,none": 0.9}, "enem_greedy": {"acc,none": 0.9}}}))
    report = npm_of_files([a, b])
    by = {s.task: s for s in report.scores}
    assert by["boolq_pt_greedy"].npm == pytest.approx(-50.0) and by["enem_greedy"].npm == pytest.approx(0.0)
    assert len(report.duplicates) == 2 and any("enem_greedy (in" in d for d in report.duplicates)


def test_the_shipped_tables_agree():
    tasks = load_tasks()
    version, mapping = load_aliases()
    assert len(tasks) == 44 and sum(t.native for t in tasks.values()) == 12
    assert set(mapping.values()) == set(tasks), "every task has an entry, every entry is a task"
    assert all(not math.isclose(t.max, t.random) for t in tasks.values())
    with pytest.raises(ValueError, match="maps to both"):
        load_aliases("version: 2\naliases:\n  a: [x]\n  b: [x]\n")


def test_a_file_that_is_not_a_results_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"acc": 1}))
    with pytest.raises(ValueError, match="not an lm-evaluation-harness results file"):
        read_results(bad)


def test_npm_command_prints_scores_and_what_was_not_counted(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    results = tmp_path / "results.json"
    results.write_text(json.dumps(RESULTS))
    exe = Path(sys.executable).with_name("synth-cpt")
    out = subprocess.run([str(exe), "npm", str(results)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "NPM all: 54.00 over 5 tasks" in out.stdout and "NPM native: 55.00 over 2 tasks" in out.stdout
    assert "unmatched names (not in the alias table) (1): mystery_task_pt" in out.stdout
    assert "tweetsentbr_greedy: f1-macro is nan" in out.stdout and "missing from the results (38)" in out.stdout
    as_json = json.loads(subprocess.run([str(exe), "npm", str(results), "--json"], capture_output=True, text=True, timeout=120).stdout)
    assert as_json["all"] == {"npm": 54.0, "tasks": 5} and as_json["unmatched"] == ["mystery_task_pt"]
    bad = subprocess.run([str(exe), "npm", str(tmp_path / "none.json")], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "none.json" in bad.stderr
