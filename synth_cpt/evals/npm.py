"""NPM (normalized preferred metric) of lm-evaluation-harness results on PoETa V2 (METHODS §8).

Per task, NPM = 100 * (raw - random) / (max - random) on the task's preferred metric; the benchmark
NPM is the unweighted mean over tasks, also over native and translated tasks apart. Two things make
it silently wrong, so neither is left implicit here:
- names: result files spell tasks differently (`_greedy` suffixes, years, `pt` infixes). Names are
  mapped through a versioned alias table, never guessed; a name it does not know is listed as unmatched.
- scales: the table gives random and max on the task's scale (0-1 or 0-100), and result files often
  report 0-1 for a task the table scores on 0-100. A raw value is brought to the table's scale per
  task, and every conversion is listed with the task.
A task of the table with no value, or a NaN value, is listed and left out of the means, which say how
many tasks they cover: nothing is counted or dropped without a line saying so.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

TABLE = "evals/poeta_v2_tasks.csv"
ALIASES = "evals/poeta_aliases.yaml"


@dataclass(frozen=True)
class Task:
    name: str
    metric: str
    random: float
    max: float
    native: bool


def _package_text(name: str) -> str:
    return resources.files("synth_cpt").joinpath(name).read_text(encoding="utf-8")


def load_tasks(text: str | None = None) -> dict[str, Task]:
    rows = csv.DictReader((text or _package_text(TABLE)).splitlines())
    return {
        r["task"]: Task(r["task"], r["preferred_metric"], float(r["random_score"]), float(r["max_score"]), r["native"].strip() == "true")
        for r in rows
    }


def load_aliases(text: str | None = None) -> tuple[int, dict[str, str]]:
    """(version, result-file name -> table task); each task also answers to its own name."""
    data = yaml.safe_load(text or _package_text(ALIASES))
    mapping: dict[str, str] = {}
    for task, names in (data.get("aliases") or {}).items():
        for name in [task, *(names or [])]:
            if mapping.get(name, task) != task:
                raise ValueError(f"alias table: {name!r} maps to both {mapping[name]!r} and {task!r}")
            mapping[name] = task
    return int(data["version"]), mapping


def _metric_key(name: str) -> str:
    """`acc,none`, `f1-macro`, `f1_macro,none` -> one spelling."""
    return name.split(",", 1)[0].strip().lower().replace("-", "_")


def read_results(path: str | Path) -> dict[str, dict[str, Any]]:
    """task name -> its metrics, from an lm-eval results file (`{"results": {task: {"acc,none": ..}}}`)."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    results = data.get("results") if isinstance(data, dict) else None
    if not isinstance(results, dict):
        raise ValueError(f"{path}: not an lm-evaluation-harness results file (no 'results' mapping)")
    return {str(k): v for k, v in results.items() if isinstance(v, dict)}


@dataclass
class TaskScore:
    task: str
    source_name: str
    metric: str
    raw: float
    value: float  # raw on the table's scale
    scaled: str  # how raw was brought to the table's scale ("" when it already was)
    npm: float
    native: bool


@dataclass
class NPMReport:
    alias_version: int
    scores: list[TaskScore] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # table tasks with no result
    nan: list[str] = field(default_factory=list)  # table tasks whose preferred metric is NaN or absent
    unmatched: list[str] = field(default_factory=list)  # result names the alias table does not know
    duplicates: list[str] = field(default_factory=list)  # a task reported under two names: the first kept

    def mean(self, native: bool | None = None) -> float | None:
        values = [s.npm for s in self.scores if native is None or s.native == native]
        return sum(values) / len(values) if values else None

    def summary(self, tasks: int) -> dict[str, Any]:
        def part(native: bool | None) -> dict[str, Any]:
            covered = [s for s in self.scores if native is None or s.native == native]
            return {"npm": None if self.mean(native) is None else round(self.mean(native), 2), "tasks": len(covered)}

        return {
            "all": part(None), "native": part(True), "translated": part(False), "tasks_in_table": tasks,
            "missing": self.missing, "nan": self.nan, "unmatched": self.unmatched, "duplicates": self.duplicates,
            "scaled": {s.task: s.scaled for s in self.scores if s.scaled}, "alias_version": self.alias_version,
        }  # fmt: skip


def to_table_scale(raw: float, task: Task) -> tuple[float, str]:
    """`raw` on the task's scale. The table's max says the scale (1 or 100): a 0-100 task whose value is
    at most 1 was reported on 0-1 (lm-eval's habit), a 0-1 task whose value is above 1 on 0-100."""
    if task.max > 1.0 and 0.0 <= raw <= 1.0:
        return raw * 100.0, "x100 (reported on 0-1, the table's scale is 0-100)"
    if task.max <= 1.0 and raw > 1.0:
        return raw / 100.0, "/100 (reported on 0-100, the table's scale is 0-1)"
    return raw, ""


def npm(results: dict[str, dict[str, Any]], tasks: dict[str, Task] | None = None, aliases: tuple[int, dict[str, str]] | None = None) -> NPMReport:
    tasks = tasks or load_tasks()
    version, mapping = aliases or load_aliases()
    report = NPMReport(version)
    found: dict[str, tuple[str, dict[str, Any]]] = {}
    for name, metrics in results.items():
        task = mapping.get(name)
        if task is None or task not in tasks:
            report.unmatched.append(name)
        elif task in found:
            report.duplicates.append(f"{name} (also {found[task][0]}, kept)")
        else:
            found[task] = (name, metrics)
    for task in tasks.values():
        if task.name not in found:
            report.missing.append(task.name)
            continue
        name, metrics = found[task.name]
        values = {_metric_key(k): v for k, v in metrics.items() if not k.split(",", 1)[0].endswith("_stderr")}
        raw = values.get(_metric_key(task.metric))
        if not isinstance(raw, (int, float)) or isinstance(raw, bool) or math.isnan(raw):
            report.nan.append(f"{task.name}: {task.metric} is {'absent' if raw is None else raw!r}")
            continue
        value, how = to_table_scale(float(raw), task)
        score = 100.0 * (value - task.random) / (task.max - task.random)
        report.scores.append(TaskScore(task.name, name, task.metric, float(raw), value, how, score, task.native))
    return report


def npm_of_files(paths: list[str | Path]) -> NPMReport:
    """NPM over one or more result files (a harness run split in several); a task in two files is a duplicate."""
    merged: dict[str, dict[str, Any]] = {}
    doubled: list[str] = []
    for path in paths:
        for name, metrics in read_results(path).items():
            if name in merged:
                doubled.append(f"{name} (in {path} too, first kept)")
                continue
            merged[name] = metrics
    report = npm(merged)
    report.duplicates += doubled
    return report
