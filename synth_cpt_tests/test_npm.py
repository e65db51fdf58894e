"""NPM on PoETa V2 against values computed by hand (METHODS §8): declared scales, aliases, suggestions."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from synth_cpt.evals.npm import load_aliases, load_tasks, npm, npm_of_files, parse_scales, read_results, suggest

RESULTS = {
    "results": {
        "assin_rte": {"alias": "assin_rte", "f1,none": 0.8, "f1_stderr,none": 0.01},  # lm-eval writes f1 on 0-1, table 0-100
        "boolq_pt_greedy": {"acc,none": 0.75},
        "enem_greedy": {"acc": 0.6},  # old harness: no filter suffix
        "tweetsentbr": {"f1_macro,none": float("nan")},
        "agnews_pt_greedy": {"acc,none": 0.625},  # 0-1, table 0-100
        "mystery_task_pt": {"acc,none": 0.9},
    }
}
EXE = Path(sys.executable).with_name("synth-cpt")


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(EXE), "npm", *args], capture_output=True, text=True, timeout=120)


def test_npm_by_hand_with_declared_scales_aliases_nan_and_missing():
    report = npm(RESULTS["results"])
    by = {s.task: s for s in report.scores}
    assert set(by) == {"assin_rte_greedy", "boolq_pt_greedy", "enem_greedy", "agnews_pt_greedy"}
    assert by["assin_rte_greedy"].npm == pytest.approx(60.0)  # 100 * (80 - 50) / (100 - 50)
    assert by["assin_rte_greedy"].value == pytest.approx(80.0) and by["assin_rte_greedy"].source_name == "assin_rte"
    assert by["assin_rte_greedy"].scaled == "x100 (written on 0-1, the table's scale is 0-100)"
    assert (by["assin_rte_greedy"].raw_scale, by["assin_rte_greedy"].scale_from) == ("0-1", "alias table: metric")
    assert by["boolq_pt_greedy"].npm == pytest.approx(50.0) and by["boolq_pt_greedy"].scaled == ""  # 100 * (0.75 - 0.5) / 0.5
    assert by["enem_greedy"].npm == pytest.approx(50.0)  # 100 * (0.6 - 0.2) / 0.8
    assert by["agnews_pt_greedy"].npm == pytest.approx(50.0)  # 100 * (62.5 - 25) / 75
    assert report.mean() == pytest.approx(52.5)  # (60 + 50 + 50 + 50) / 4
    assert report.mean(native=True) == pytest.approx(55.0)  # assin_rte, enem
    assert report.mean(native=False) == pytest.approx(50.0)  # boolq, agnews
    assert report.unmatched == ["mystery_task_pt"] and report.suggestions == {}
    assert report.nan == ["tweetsentbr_greedy: f1-macro is nan"] and report.warnings == []
    assert len(report.missing) == 44 - 5 and "faquad" in report.missing
    summary = report.summary()
    assert summary["all"] == {"npm": 52.5, "tasks": 4, "of": 44, "missing": 40}
    assert summary["native"] == {"npm": 55.0, "tasks": 2, "of": 12, "missing": 10}
    assert summary["translated"] == {"npm": 50.0, "tasks": 2, "of": 32, "missing": 30}
    assert summary["alias_version"] == 2 and summary["tasks_in_table"] == 44


def test_the_scale_is_declared_never_read_off_the_value():
    """A near-random score must not move 100x because it happens to be <= 1 (the old guess multiplied it)."""
    # mkqa: best_f1 is written on 0-100 by the MKQA script; 0.5 is near random (0), not 50.
    # massive: lm-eval writes f1-macro on 0-1; 0.005847 is the table's random 0.5847 on 0-100.
    report = npm({"mkqa_greedy": {"best_f1,none": 0.5, "f1,none": 0.4}, "massive": {"f1_macro,none": 0.005847}})
    by = {s.task: s for s in report.scores}
    assert by["mkqa_greedy"].value == 0.5 and by["mkqa_greedy"].scaled == "" and by["mkqa_greedy"].npm == pytest.approx(0.5)
    assert by["massive_greedy"].value == pytest.approx(0.5847) and by["massive_greedy"].npm == pytest.approx(0.0, abs=1e-9)
    # every 0-100 value of these results is <= 1: counted as declared, and said
    assert report.warnings == [
        "mkqa_greedy: best_f1 = 0.5 is counted on 0-100 (alias table: metric), but every 0-100 value of these results is <= 1: "
        "if the file holds 0-1, pass --scale mkqa_greedy=0-1"
    ]
    assert report.summary()["warnings"] == report.warnings
    # the same mkqa beside another 0-100 value above 1 is not suspect
    assert npm({"mkqa_greedy": {"best_f1,none": 0.5}, "massive": {"f1_macro,none": 0.3}}, scales={"massive": "0-100"}).warnings == [
        "mkqa_greedy: best_f1 = 0.5 is counted on 0-100 (alias table: metric), but every 0-100 value of these results is <= 1: "
        "if the file holds 0-1, pass --scale mkqa_greedy=0-1"
    ], "a value given by --scale is not evidence either way"


def test_a_file_written_in_percent_needs_scale_and_says_so():
    percent = {"massive_greedy": {"f1_macro,none": 0.5847}, "boolq_pt_greedy": {"acc,none": 75.0}, "imdb_pt": {"acc,none": 80.0}}
    # without --scale: boolq and imdb cannot be on 0-1, so the file is in percent and massive's 0.5847 (near random) is
    # not read as 58.47: every 0-1-declared value of the file is left out, with one warning naming the file
    plain = npm(percent)
    assert plain.scores == [] and plain.summary()["all"]["tasks"] == 0
    assert plain.warnings == [
        "the results: boolq_pt_greedy acc = 75, imdb_pt_greedy acc = 80 cannot be on 0-1 (alias table), so the file is written "
        "in percent: every value of it declared 0-1 is left out (boolq_pt_greedy, imdb_pt_greedy, massive_greedy); "
        "pass --scale 0-100 if it holds percent"
    ]
    assert plain.nan == [
        f"{t}: {m} = {v} left out: the results is written in percent (see its warning)"
        for t, m, v in (("boolq_pt_greedy", "acc", 75), ("imdb_pt_greedy", "acc", 80), ("massive_greedy", "f1-macro", 0.5847))
    ]
    # --scale for one task (by its table name or its name in the file): those are counted as given, boolq is still evidence
    one = npm(percent, scales={"massive_greedy": "0-100", "imdb_pt": "0-100"})
    by = {s.task: s for s in one.scores}
    assert by["massive_greedy"].value == pytest.approx(0.5847) and by["massive_greedy"].npm == pytest.approx(0.0, abs=1e-9)
    assert by["massive_greedy"].scale_from == "--scale" and by["imdb_pt_greedy"].npm == pytest.approx(60.0)
    assert by["imdb_pt_greedy"].scaled == "/100 (written on 0-100, the table's scale is 0-1)" and "boolq_pt_greedy" not in by
    assert one.nan == ["boolq_pt_greedy: acc = 75 left out: the results is written in percent (see its warning)"]
    every = npm(percent, scales=parse_scales(["0-100"]))
    assert {s.task: round(s.npm, 6) for s in every.scores} == {"massive_greedy": 0.0, "boolq_pt_greedy": 50.0, "imdb_pt_greedy": 60.0}
    assert every.warnings == [] and every.summary()["scales_given"] == {"*": "0-100"}
    with pytest.raises(ValueError, match="not one of 0-1, 0-100"):
        parse_scales(["massive_greedy=percent"])
    with pytest.raises(ValueError, match="'nope' is not a task"):
        npm(percent, scales={"nope": "0-1"})


def test_a_result_file_has_one_scale(tmp_path):
    """boolq = 75 proves the file is in percent, so its massive f1_macro = 0.5847 is 0.5847%, not 58.47%."""
    percent, fractions = tmp_path / "percent.json", tmp_path / "fractions.json"
    percent.write_text(json.dumps({"results": {"boolq_pt": {"acc,none": 75.0}, "massive": {"f1_macro,none": 0.5847}}}))
    fractions.write_text(json.dumps({"results": {"enem_greedy": {"acc,none": 0.6}, "mkqa_greedy": {"best_f1,none": 20.0}}}))
    alone = npm_of_files([percent])
    assert alone.scores == [] and alone.warnings == [
        f"{percent}: boolq_pt_greedy acc = 75 cannot be on 0-1 (alias table), so the file is written in percent: every value of "
        "it declared 0-1 is left out (boolq_pt_greedy, massive_greedy); pass --scale 0-100 if it holds percent"
    ]
    assert alone.nan == [
        f"boolq_pt_greedy: acc = 75 left out: {percent} is written in percent (see its warning)",
        f"massive_greedy: f1-macro = 0.5847 left out: {percent} is written in percent (see its warning)",
    ]
    scaled = npm_of_files([percent], scales=parse_scales(["0-100"]))
    assert {s.task: s.npm for s in scaled.scores} == {"boolq_pt_greedy": 50.0, "massive_greedy": 0.0}  # 100*(75-50)/50; random
    assert scaled.warnings == [] and scaled.nan == []
    # another file of the run, in fractions, is read on its own scale; the hint names the percent file's tasks
    both = npm_of_files([percent, fractions])
    assert {s.task: s.npm for s in both.scores} == {"enem_greedy": pytest.approx(50.0), "mkqa_greedy": 20.0}
    assert both.warnings == [
        f"{percent}: boolq_pt_greedy acc = 75 cannot be on 0-1 (alias table), so the file is written in percent: every value of "
        "it declared 0-1 is left out (boolq_pt_greedy, massive_greedy); pass --scale boolq_pt_greedy=0-100 "
        "--scale massive_greedy=0-100 if it holds percent"
    ]
    fixed = npm_of_files([percent, fractions], scales={"boolq_pt_greedy": "0-100", "massive_greedy": "0-100"})
    assert {s.task: s.npm for s in fixed.scores} == {
        "enem_greedy": pytest.approx(50.0), "boolq_pt_greedy": 50.0, "massive_greedy": 0.0, "mkqa_greedy": 20.0,
    } and fixed.warnings == []  # fmt: skip
    # a small value alone is never evidence: the same massive in a file with nothing above 1 is read on 0-1
    assert npm({"massive": {"f1_macro,none": 0.5847}}).scores[0].value == pytest.approx(58.47)


def test_unmatched_names_get_a_suggestion_and_an_alias_brings_them_back():
    results = {"massive_pt_greedy": {"f1_macro,none": 0.3}, "mkqa_pt_greedy": {"best_f1,none": 20.0}, "boolq_pt": {"acc,none": 0.75}}
    report = npm(results)
    assert report.unmatched == ["massive_pt_greedy", "mkqa_pt_greedy"]
    assert report.suggestions == {"massive_pt_greedy": "massive_greedy", "mkqa_pt_greedy": "mkqa_greedy"}
    assert report.summary()["translated"] == {"npm": 50.0, "tasks": 1, "of": 32, "missing": 31}
    fixed = npm(results, extra_aliases={"massive_pt_greedy": "massive_greedy", "mkqa_pt_greedy": "mkqa"})  # NEW may be any known name
    assert fixed.unmatched == [] and fixed.summary()["translated"]["tasks"] == 3
    assert {s.task: s.source_name for s in fixed.scores}["mkqa_greedy"] == "mkqa_pt_greedy"
    assert suggest("enem2022_greedy", load_aliases().names) == "enem_2022_greedy"
    assert suggest("faquad_nli_greedy", load_aliases().names) == "faquad"
    assert suggest("hellaswag", load_aliases().names) is None
    with pytest.raises(ValueError, match="'massive_pt' is not a task of the table"):
        npm(results, extra_aliases={"massive_pt_greedy": "massive_pt"})


def test_npm_can_be_negative_and_duplicates_are_listed(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps({"results": {"boolq_pt": {"acc,none": 0.25}, "enem_greedy": {"acc,none": 0.2}}}))
    b.write_text(json.dumps({"results": {"boolq_pt_greedy": {"acc,none": 0.9}, "enem_greedy": {"acc,none": 0.9}}}))
    report = npm_of_files([a, b])
    by = {s.task: s for s in report.scores}
    assert by["boolq_pt_greedy"].npm == pytest.approx(-50.0) and by["enem_greedy"].npm == pytest.approx(0.0)
    assert report.duplicates == ["boolq_pt_greedy (also boolq_pt, kept)", "enem_greedy (in " + str(b) + " too, first kept)"]


def test_the_shipped_tables_agree():
    tasks = load_tasks()
    table = load_aliases()
    assert len(tasks) == 44 and sum(t.native for t in tasks.values()) == 12
    assert set(table.names.values()) == set(tasks), "every task has an entry, every entry is a task"
    assert all(not math.isclose(t.max, t.random) for t in tasks.values())
    assert table.version == 2 and table.task_scales == {}
    declared = {t.metric: table.metric_scales.get(t.metric.replace("-", "_")) for t in tasks.values()}
    assert declared == {"f1": "0-1", "pearson": "0-1", "acc": "0-1", "f1-macro": "0-1", "best_f1": "0-100"}
    with pytest.raises(ValueError, match="maps to both"):
        load_aliases("version: 2\naliases:\n  a: [x]\n  b: [x]\n")
    with pytest.raises(ValueError, match="scale 'percent' is not one of"):
        load_aliases("version: 2\nmetric_scales:\n  acc: percent\naliases: {}\n")
    with pytest.raises(ValueError, match="max_score must be 1 or 100"):
        load_tasks("task,preferred_metric,random_score,max_score,native\nx,acc,0.5,10,true\n")


def test_a_file_that_is_not_a_results_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"acc": 1}))
    with pytest.raises(ValueError, match="not an lm-evaluation-harness results file"):
        read_results(bad)


def test_npm_command_prints_scores_and_what_was_not_counted(tmp_path):
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"results": {**RESULTS["results"], "massive_pt_greedy": {"f1_macro,none": 0.3}}}))
    out = run(str(results))
    assert out.returncode == 0, out.stderr
    assert "NPM all: 52.50 over 4 of 44 tasks (40 missing)" in out.stdout
    assert "NPM native: 55.00 over 2 of 12 tasks (10 missing)" in out.stdout
    assert "NPM translated: 50.00 over 2 of 32 tasks (30 missing)" in out.stdout
    assert (
        "unmatched names (not in the alias table) (2): mystery_task_pt, massive_pt_greedy (did you mean massive_greedy? "
        "--alias massive_pt_greedy=massive_greedy)" in out.stdout
    )
    assert "no usable value (1): tweetsentbr_greedy: f1-macro is nan" in out.stdout and "missing from the results (39)" in out.stdout
    as_json = json.loads(run(str(results), "--json").stdout)
    assert as_json["all"] == {"npm": 52.5, "tasks": 4, "of": 44, "missing": 40} and as_json["unmatched"] == [
        "mystery_task_pt",
        "massive_pt_greedy",
    ]
    assert as_json["suggestions"] == {"massive_pt_greedy": "massive_greedy"}
    # --alias brings massive back (0.3 on 0-1: 30 on 0-100); --aliases FILE does the same from a file
    aliased = json.loads(run(str(results), "--json", "--alias", "massive_pt_greedy=massive_greedy").stdout)
    massive = {t["task"]: t for t in aliased["tasks"]}["massive_greedy"]
    assert massive["value"] == pytest.approx(30.0) and aliased["translated"]["tasks"] == 3 and aliased["unmatched"] == ["mystery_task_pt"]
    alias_file = tmp_path / "aliases.yaml"
    alias_file.write_text("massive_pt_greedy: massive_greedy\nmystery_task_pt: boolq_pt_greedy\n")
    from_file = json.loads(run(str(results), "--json", "--aliases", str(alias_file)).stdout)
    assert from_file["unmatched"] == [] and from_file["aliases_given"] == {
        "massive_pt_greedy": "massive_greedy",
        "mystery_task_pt": "boolq_pt_greedy",
    }
    assert from_file["duplicates"] == ["mystery_task_pt (also boolq_pt_greedy, kept)"]
    # --scale: the whole file in percent; the warning is printed
    scaled = run(str(results), "--alias", "massive_pt_greedy=massive_greedy", "--scale", "massive_greedy=0-100")
    assert "warning:" not in scaled.stdout and "scales given (1): massive_greedy=0-100" in scaled.stdout
    percent = tmp_path / "percent.json"
    percent.write_text(json.dumps({"results": {"boolq_pt": {"acc,none": 75.0}}}))
    warned = run(str(percent))
    assert f"warning: {percent}: boolq_pt_greedy acc = 75 cannot be on 0-1 (alias table), so the file is written in percent" in (
        warned.stdout
    )
    assert "pass --scale 0-100 if it holds percent" in warned.stdout
    assert "NPM all: n/a over 0 of 44 tasks (44 missing)" in warned.stdout
    assert "NPM all: 50.00 over 1 of 44 tasks (43 missing)" in run(str(percent), "--scale", "0-100").stdout
    bad = run(str(tmp_path / "none.json"))
    assert bad.returncode == 2 and "none.json" in bad.stderr
    bad_scale = run(str(results), "--scale", "massive_greedy=percent")
    assert bad_scale.returncode == 2 and "not one of 0-1, 0-100" in bad_scale.stderr
