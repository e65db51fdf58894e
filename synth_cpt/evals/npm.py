"""NPM (normalized preferred metric) of lm-evaluation-harness results on PoETa V2 (METHODS §8).

Per task, NPM = 100 * (raw - random) / (max - random) on the task's preferred metric; the benchmark
NPM is the unweighted mean over tasks, also over native and translated tasks apart. Two things make
it silently wrong, so neither is left implicit here:
- names: result files spell tasks differently (`_greedy` suffixes, years, `pt` infixes). Names are
  mapped through a versioned alias table (plus `--alias old=new` given by hand), never guessed; a name
  it does not know is listed as unmatched, with the table's closest task as a suggestion to confirm.
- scales: the table gives random and max on the task's scale (its max: 1 or 100). The scale a raw value
  was written on is declared, never read off the value: by `--scale` if given, else by the alias
  table (a task's entry, else what lm-eval writes its metric on: acc/f1/em/mcc are 0-1, best_f1 0-100).
  A value its declared scale cannot hold (a 0-1 metric at 62.5) is left out with a warning; a 0-100
  metric whose every value is <= 1 is counted with a warning (it may have been written on 0-1).
  A result file has one scale: when a value the alias table declares 0-1 is above 1, the file is
  written in percent, so every 0-1-declared value of that file is left out (a near-random 0.58 there is
  0.58%, not 58%), with one warning naming the file; `--scale` values are exempt (no inference).
A task of the table with no value, or a NaN value, is listed and left out of the means, which say how
many tasks they cover and how many are missing: nothing is counted or dropped without a line saying so.
"""

from __future__ import annotations

import csv
import difflib
import json
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

TABLE = "evals/poeta_v2_tasks.csv"
ALIASES = "evals/poeta_aliases.yaml"
SCALES = {"0-1": 1.0, "0-100": 100.0}
ALL_TASKS = "*"  # the key of a `--scale` given for every task
RESULTS = "the results"  # the file of values given without `sources`


@dataclass(frozen=True)
class Task:
    name: str
    metric: str
    random: float
    max: float
    native: bool

    @property
    def scale(self) -> str:
        """The scale the table gives random and max on: its max says it (1 or 100, checked on load)."""
        return "0-100" if self.max == 100.0 else "0-1"


def _package_text(name: str) -> str:
    return resources.files("synth_cpt").joinpath(name).read_text(encoding="utf-8")


def load_tasks(text: str | None = None) -> dict[str, Task]:
    rows = csv.DictReader((text or _package_text(TABLE)).splitlines())
    tasks = {
        r["task"]: Task(r["task"], r["preferred_metric"], float(r["random_score"]), float(r["max_score"]), r["native"].strip() == "true")
        for r in rows
    }
    odd = [t.name for t in tasks.values() if t.max not in (1.0, 100.0)]
    if odd:
        raise ValueError(f"task table: max_score must be 1 or 100 (it names the task's scale): {odd}")
    return tasks


def metric_key(name: str) -> str:
    """`acc,none`, `f1-macro`, `f1_macro,none` -> one spelling."""
    return name.split(",", 1)[0].strip().lower().replace("-", "_")


def _scale(value: Any, where: str) -> str:
    scale = str(value).strip()
    if scale not in SCALES:
        raise ValueError(f"{where}: scale {value!r} is not one of {', '.join(SCALES)}")
    return scale


@dataclass(frozen=True)
class AliasTable:
    """The versioned alias table: result-file names -> table tasks, and the scale each metric is written on."""

    version: int
    names: dict[str, str]  # result-file name -> table task (each task also answers to its own name)
    metric_scales: dict[str, str]  # metric_key -> "0-1" | "0-100": what lm-eval writes the metric on
    task_scales: dict[str, str] = field(default_factory=dict)  # table task -> scale, where it differs from its metric's


def load_aliases(text: str | None = None) -> AliasTable:
    data = yaml.safe_load(text or _package_text(ALIASES))
    mapping: dict[str, str] = {}
    for task, names in (data.get("aliases") or {}).items():
        for name in [task, *(names or [])]:
            if mapping.get(name, task) != task:
                raise ValueError(f"alias table: {name!r} maps to both {mapping[name]!r} and {task!r}")
            mapping[name] = task
    metrics = {metric_key(m): _scale(s, f"alias table, metric {m}") for m, s in (data.get("metric_scales") or {}).items()}
    tasks = {t: _scale(s, f"alias table, task {t}") for t, s in (data.get("task_scales") or {}).items()}
    return AliasTable(int(data["version"]), mapping, metrics, tasks)


def parse_pairs(items: list[str], what: str) -> dict[str, str]:
    """`["a=b", ...]` -> {a: b}; a malformed item is an error naming it."""
    out: dict[str, str] = {}
    for item in items:
        old, sep, new = item.partition("=")
        if not sep or not old.strip() or not new.strip():
            raise ValueError(f"{what} {item!r}: expected NAME=VALUE")
        out[old.strip()] = new.strip()
    return out


def parse_scales(items: list[str]) -> dict[str, str]:
    """`--scale TASK=0-1|0-100` (a task or any name the alias table knows) or `--scale 0-100` (every task)."""
    out: dict[str, str] = {}
    for item in items:
        if "=" in item:
            ((task, scale),) = parse_pairs([item], "--scale").items()
            out[task] = _scale(scale, f"--scale {item}")
        else:
            out[ALL_TASKS] = _scale(item, f"--scale {item}")
    return out


def read_alias_file(path: str | Path) -> dict[str, str]:
    """`--aliases FILE`: a YAML mapping `name in the result file: table task`."""
    data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
        raise ValueError(f"{path}: an alias file is a YAML mapping of result-file name to table task (`old: new`)")
    return dict(data)


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
    raw_scale: str  # the scale raw was written on ("0-1" | "0-100")
    scale_from: str  # who said so: "--scale", "alias table: task", "alias table: metric"
    value: float  # raw on the table's scale
    scaled: str  # how raw was brought to the table's scale ("" when it already was)
    npm: float
    native: bool


@dataclass
class NPMReport:
    alias_version: int
    scores: list[TaskScore] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # table tasks with no result
    nan: list[str] = field(default_factory=list)  # table tasks with no usable value: NaN, absent, off its scale, no declared scale
    unmatched: list[str] = field(default_factory=list)  # result names the alias table does not know
    suggestions: dict[str, str] = field(default_factory=dict)  # unmatched name -> the table task it most resembles
    duplicates: list[str] = field(default_factory=list)  # a task reported under two names: the first kept
    warnings: list[str] = field(default_factory=list)  # values that contradict their declared scale
    aliases_given: dict[str, str] = field(default_factory=dict)  # --alias / --aliases: name -> task
    scales_given: dict[str, str] = field(default_factory=dict)  # --scale: task (or "*") -> scale
    table_tasks: dict[str, int] = field(default_factory=dict)  # all / native / translated -> tasks of the table

    def mean(self, native: bool | None = None) -> float | None:
        values = [s.npm for s in self.scores if native is None or s.native == native]
        return sum(values) / len(values) if values else None

    def summary(self) -> dict[str, Any]:
        """All / Native / Translated, each with how many of the table's tasks it covers and how many it misses."""

        def part(native: bool | None) -> dict[str, Any]:
            covered = sum(1 for s in self.scores if native is None or s.native == native)
            of = self.table_tasks[{None: "all", True: "native", False: "translated"}[native]]
            mean = self.mean(native)
            return {"npm": None if mean is None else round(mean, 2), "tasks": covered, "of": of, "missing": of - covered}

        return {
            "all": part(None), "native": part(True), "translated": part(False), "tasks_in_table": self.table_tasks["all"],
            "missing": self.missing, "nan": self.nan, "unmatched": self.unmatched, "suggestions": self.suggestions,
            "duplicates": self.duplicates, "warnings": self.warnings,
            "scaled": {s.task: s.scaled for s in self.scores if s.scaled}, "alias_version": self.alias_version,
            "aliases_given": self.aliases_given, "scales_given": self.scales_given,
        }  # fmt: skip


def declared_scale(task: Task, source_name: str, table: AliasTable, given: dict[str, str]) -> tuple[str | None, str]:
    """(scale the task's raw value was written on, who said so); None when nobody did."""
    for key in (task.name, source_name):
        if key in given:
            return given[key], "--scale"
    if ALL_TASKS in given:
        return given[ALL_TASKS], "--scale"
    if task.name in table.task_scales:
        return table.task_scales[task.name], "alias table: task"
    scale = table.metric_scales.get(metric_key(task.metric))
    return scale, "alias table: metric"


def to_table_scale(raw: float, raw_scale: str, task: Task) -> tuple[float, str]:
    """`raw`, written on `raw_scale`, on the task's scale, and how it was brought there."""
    factor = SCALES[task.scale] / SCALES[raw_scale]
    if factor == 1.0:
        return raw, ""
    how = "x100" if factor > 1 else "/100"
    return raw * factor, f"{how} (written on {raw_scale}, the table's scale is {task.scale})"


def suggest(name: str, names: dict[str, str]) -> str | None:
    """The table task whose known spelling is closest to `name` (difflib), ignoring `greedy` and `pt` tokens."""

    def key(n: str) -> str:
        return "_".join(t for t in n.lower().split("_") if t not in ("greedy", "pt"))

    keys: dict[str, str] = {}
    for known, task in sorted(names.items()):
        keys.setdefault(key(known), task)
    close = difflib.get_close_matches(key(name), list(keys), n=1, cutoff=0.6)
    return keys[close[0]] if close else None


def npm(
    results: dict[str, dict[str, Any]],
    tasks: dict[str, Task] | None = None,
    aliases: AliasTable | None = None,
    extra_aliases: dict[str, str] | None = None,
    scales: dict[str, str] | None = None,
    sources: dict[str, str] | None = None,
) -> NPMReport:
    """NPM of one harness run. `extra_aliases` (name -> table task) add to the alias table; `scales`
    (task, result-file name or "*" -> "0-1" | "0-100") say what the file's values were written on;
    `sources` (result name -> the file it came from) groups values by file: all `results` are one file
    if not given."""
    tasks = tasks or load_tasks()
    table = aliases or load_aliases()
    mapping = dict(table.names)
    for old, new in (extra_aliases or {}).items():
        target = table.names.get(new, new)
        if target not in tasks:
            raise ValueError(f"--alias {old}={new}: {new!r} is not a task of the table")
        mapping[old] = target
    given: dict[str, str] = {}
    for key, scale in (scales or {}).items():
        target = key if key == ALL_TASKS else mapping.get(key)
        if target is None or (target != ALL_TASKS and target not in tasks):
            raise ValueError(f"--scale {key}={scale}: {key!r} is not a task of the table nor a name the alias table knows")
        given[target] = _scale(scale, f"--scale {key}")
    native = sum(t.native for t in tasks.values())
    counts = {"all": len(tasks), "native": native, "translated": len(tasks) - native}
    report = NPMReport(table.version, aliases_given=dict(extra_aliases or {}), scales_given=given, table_tasks=counts)
    found: dict[str, tuple[str, dict[str, Any]]] = {}
    for name, metrics in results.items():
        task = mapping.get(name)
        if task is None or task not in tasks:
            report.unmatched.append(name)
            close = suggest(name, mapping)
            if close is not None:
                report.suggestions[name] = close
        elif task in found:
            report.duplicates.append(f"{name} (also {found[task][0]}, kept)")
        else:
            found[task] = (name, metrics)
    usable: list[tuple[Task, str, float, str, str]] = []  # task, name in the file, raw, its scale, who said so
    for task in tasks.values():
        if task.name not in found:
            report.missing.append(task.name)
            continue
        name, metrics = found[task.name]
        values = {metric_key(k): v for k, v in metrics.items() if not k.split(",", 1)[0].endswith("_stderr")}
        raw = values.get(metric_key(task.metric))
        if not isinstance(raw, (int, float)) or isinstance(raw, bool) or math.isnan(raw):
            report.nan.append(f"{task.name}: {task.metric} is {'absent' if raw is None else raw!r}")
            continue
        raw_scale, said = declared_scale(task, name, table, given)
        if raw_scale is None:
            report.nan.append(
                f"{task.name}: no declared scale for {task.metric} (add it to the alias table or pass --scale {task.name}=0-1|0-100)"
            )
            continue
        usable.append((task, name, float(raw), raw_scale, said))
    percent = _files_in_percent(usable, sources or {}, report)
    suspect: list[TaskScore] = []
    for task, name, raw, raw_scale, said in usable:
        file = (sources or {}).get(name, RESULTS)
        if file in percent and raw_scale == "0-1" and said != "--scale":
            report.nan.append(f"{task.name}: {task.metric} = {raw:g} left out: {file} is written in percent (see its warning)")
            continue
        if abs(raw) > SCALES[raw_scale]:
            line = (
                f"{task.name}: {task.metric} = {raw:g} cannot be on {raw_scale} ({said}); left out: "
                f"pass --scale {task.name}={'0-100' if raw_scale == '0-1' else '0-1'} if that is what the file holds"
            )
            report.warnings.append(line)
            report.nan.append(line)
            continue
        value, how = to_table_scale(raw, raw_scale, task)
        score = TaskScore(
            task.name,
            name,
            task.metric,
            raw,
            raw_scale,
            said,
            value,
            how,
            100.0 * (value - task.random) / (task.max - task.random),
            task.native,
        )
        report.scores.append(score)
        if raw_scale == "0-100" and said != "--scale":
            suspect.append(score)
    if suspect and all(abs(s.raw) <= 1.0 for s in suspect):
        for s in suspect:
            report.warnings.append(
                f"{s.task}: {s.metric} = {s.raw:g} is counted on 0-100 ({s.scale_from}), but every 0-100 value of these "
                f"results is <= 1: if the file holds 0-1, pass --scale {s.task}=0-1"
            )
    return report


def _files_in_percent(usable: list[tuple[Task, str, float, str, str]], sources: dict[str, str], report: NPMReport) -> set[str]:
    """Files written in percent: those holding a value the alias table declares 0-1 above 1. The evidence is
    always a value its declared scale cannot hold, never a small value alone; `--scale` values are no evidence."""
    evidence: dict[str, list[str]] = {}
    declared: dict[str, list[str]] = {}
    for task, name, raw, raw_scale, said in usable:
        if raw_scale != "0-1" or said == "--scale":
            continue
        file = sources.get(name, RESULTS)
        declared.setdefault(file, []).append(task.name)
        if abs(raw) > 1.0:
            evidence.setdefault(file, []).append(f"{task.name} {task.metric} = {raw:g}")
    files = set(sources.values()) or {RESULTS}
    for file, seen in evidence.items():
        hint = "--scale 0-100" if len(files) == 1 else " ".join(f"--scale {t}=0-100" for t in declared[file])
        report.warnings.append(
            f"{file}: {', '.join(seen)} cannot be on 0-1 (alias table), so the file is written in percent: "
            f"every value of it declared 0-1 is left out ({', '.join(declared[file])}); pass {hint} if it holds percent"
        )
    return set(evidence)


def npm_of_files(paths: list[str | Path], extra_aliases: dict[str, str] | None = None, scales: dict[str, str] | None = None) -> NPMReport:
    """NPM over one or more result files (a harness run split in several); a task in two files is a duplicate."""
    merged: dict[str, dict[str, Any]] = {}
    sources: dict[str, str] = {}
    doubled: list[str] = []
    for path in paths:
        for name, metrics in read_results(path).items():
            if name in merged:
                doubled.append(f"{name} (in {path} too, first kept)")
                continue
            merged[name] = metrics
            sources[name] = str(path)
    report = npm(merged, extra_aliases=extra_aliases, scales=scales, sources=sources)
    report.duplicates += doubled
    return report
