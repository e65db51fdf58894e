"""What every command shares: the Dagster instance, consoles, and materializing a group of assets."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from synth_cpt.core.config import ConfigError, load_config
from synth_cpt.core.processes import process_started, this_machine
from synth_cpt.core.secrets import redact

GPU_POOL = "gpu"
# Dagster's console logger prints a failed step's stack trace at ERROR: the CLI prints one line per failed
# run instead, and the trace stays in the run's logs (the UI).
QUIET_RUN_CONFIG = {"loggers": {"console": {"config": {"log_level": "CRITICAL"}}}}


def dagster_instance():
    from dagster import DagsterInstance

    home = os.environ.get("DAGSTER_HOME")
    if not home:
        say("synth-cpt: set DAGSTER_HOME to the Dagster instance folder (`make instance` prepares .dagster_home)")
        raise SystemExit(2)
    Path(home).mkdir(parents=True, exist_ok=True)
    instance = DagsterInstance.get()
    storage = instance.event_log_storage
    if GPU_POOL not in storage.get_concurrency_keys():
        storage.set_concurrency_slots(GPU_POOL, 1)  # one engine per machine (DESIGN.md)
    for line in fail_runs_of_dead_processes(instance):
        say(line)
    return instance


def run_tags(label: str) -> dict[str, str]:
    """Tags of a run this process executes: who launched it, and the process, so that a later command can tell
    a run whose process was killed from one still going."""
    return {
        "synth_cpt/launched_by": f"synth-cpt {label}",
        "synth_cpt/machine": this_machine(),
        "synth_cpt/pid": str(os.getpid()),
        "synth_cpt/pid_started": process_started(os.getpid()) or "?",
    }


def fail_runs_of_dead_processes(instance) -> list[str]:
    """Runs this machine's CLI started whose process is gone (SIGKILL, a lost session) stay STARTED for ever and
    keep their `gpu` slot, so every later run would wait for it: mark them failed and free their slots. Only runs of
    this very machine and pid namespace are judged: another's pids mean nothing here."""
    from dagster import DagsterRunStatus, RunsFilter

    said = []
    live = [DagsterRunStatus.STARTED, DagsterRunStatus.STARTING, DagsterRunStatus.NOT_STARTED]
    for run in instance.get_runs(RunsFilter(statuses=live, tags={"synth_cpt/machine": this_machine()})):
        pid, started = run.tags.get("synth_cpt/pid"), run.tags.get("synth_cpt/pid_started", "")
        if not pid or process_started(int(pid)) == started:  # still running (a reused pid started at another tick)
            continue
        message = f"its process ({run.tags.get('synth_cpt/launched_by', 'synth-cpt')}, pid {pid}) is gone: killed before the run ended"
        instance.report_run_failed(run, message)
        instance.event_log_storage.free_concurrency_slots_for_run(run.run_id)
        said.append(f"run {run.run_id[:8]} failed: {message}; its gpu slot is free again")
    return said


_TERMINAL: list = [None]  # the terminal's stderr while quiet_console sends fd 2 to a log file


def terminal() -> Console:
    """Where bars, tables and messages of a command go: the terminal, even while its stderr goes to a log."""
    return Console(file=_TERMINAL[0]) if _TERMINAL[0] is not None else Console(stderr=True)


def say(message: str) -> None:
    """One message on the terminal, as written: no markup, no wrapping (errors of commands whose stderr is a log)."""
    terminal().print(message, markup=False, highlight=False, soft_wrap=True)


def log_dir(config_path: str | None = None) -> Path:
    """`<storage root>/logs` for a local root, else ~/.cache/synth-cpt/logs."""
    try:
        root = load_config(config_path).storage_uri()
    except ConfigError:
        root = "s3://"  # the command itself reports the config error
    return Path(root) / "logs" if "://" not in root else Path.home() / ".cache" / "synth-cpt" / "logs"


@contextlib.contextmanager
def quiet_console(command: str, config_path: str | None = None) -> Iterator[Path | None]:
    """vLLM, torch, transformers and Dagster write warnings, engine logs and stack traces to stderr, from this
    process and from the engine's own processes: they go to a log file, named at the end, and the terminal
    keeps the command's bars and tables. A stderr that is not the process's own (a test capturing it) is
    left alone."""
    try:
        own = sys.stderr.fileno() == 2
    except (AttributeError, OSError, ValueError):
        own = False
    if not own or _TERMINAL[0] is not None:
        yield None
        return
    folder = log_dir(config_path)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{command}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    saved_env = {k: os.environ.get(k) for k in ("VLLM_CONFIGURE_LOGGING",)}
    os.environ["VLLM_CONFIGURE_LOGGING"] = "0"  # vLLM's loggers then reach the root logger (below), not stdout
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    previous_level = root.level
    root.addHandler(handler)
    root.setLevel(min(previous_level, logging.INFO) if previous_level else logging.INFO)
    logging.captureWarnings(True)
    sys.stderr.flush()
    saved_fd = os.dup(2)
    log_fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(log_fd, 2)  # the engine's processes inherit it too
    os.close(log_fd)
    _TERMINAL[0] = os.fdopen(os.dup(saved_fd), "w", buffering=1)
    try:
        yield path
    finally:
        sys.stderr.flush()
        os.dup2(saved_fd, 2)
        os.close(saved_fd)
        _TERMINAL[0].close()
        _TERMINAL[0] = None
        logging.captureWarnings(False)
        root.removeHandler(handler)
        root.setLevel(previous_level)
        handler.close()
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        Console(stderr=True).print(f"[dim]warnings and engine logs: {path}[/dim]")


def wide_console(width: int = 160) -> Console:
    """Stdout tables: the terminal's width, or `width` when piped (Rich would fold them at 80)."""
    return Console(width=None if sys.stdout.isatty() else width)


def partition_ranges(partitions: list[str], languages: list[str], qualities: list[str]) -> list[tuple[str, str]]:
    """The `language|quality` partitions asked, as the fewest (first, last) ranges that each run as one Dagster run.
    A range of two dimensions is every pair of its languages and qualities, each taken in the config's order, so the
    whole set is one range when it is such a rectangle; otherwise each language's consecutive qualities are one."""
    asked = {tuple(p.split("|", 1)) for p in partitions}
    langs = [lang for lang in languages if any(a[0] == lang for a in asked)]
    quals = [q for q in qualities if any(a[1] == q for a in asked)]

    def consecutive(chosen: list[str], order: list[str]) -> bool:
        return [order.index(c) for c in chosen] == list(range(order.index(chosen[0]), order.index(chosen[0]) + len(chosen)))

    if asked == {(lang, q) for lang in langs for q in quals} and consecutive(langs, languages) and consecutive(quals, qualities):
        return [(f"{langs[0]}|{quals[0]}", f"{langs[-1]}|{quals[-1]}")]
    ranges: list[tuple[str, str]] = []
    for lang in langs:
        run: list[str] = []
        for q in [*qualities, None]:
            if q is not None and (lang, q) in asked:
                run.append(q)
            elif run:
                ranges.append((f"{lang}|{run[0]}", f"{lang}|{run[-1]}"))
                run = []
    return ranges


def _watch(instance, marker: str, progress: Progress, task, stop: threading.Event, before: int) -> None:
    """Advance the bar as the run of `marker` publishes outputs (read from the instance every 2 s)."""
    from dagster import DagsterEventType, RunsFilter

    while not stop.wait(2.0):
        try:
            runs = instance.get_runs(RunsFilter(tags={RUN_MARKER: marker}), limit=1)
            if runs:
                made = len(instance.all_logs(runs[0].run_id, of_type=DagsterEventType.ASSET_MATERIALIZATION))
                progress.update(task, completed=before + made)
        except Exception:  # the bar is a courtesy: a busy SQLite instance is read again at the next tick
            continue


RUN_MARKER = "synth_cpt/invocation"


def materialize_group(
    args: argparse.Namespace, group: str, label: str, one_run: bool = False
) -> tuple[list[dict], list[str], list[str], str]:
    """Materialize a group's assets (or those asked) for every partition (or those asked): (metadata rows, failed
    runs, partitions, storage root). One Dagster run per partition in this process, or, `one_run`, one run for
    every partition asked (one per range, see `partition_ranges`), whose steps share one engine run."""
    if args.config:
        os.environ["SYNTH_CPT_CONFIG"] = str(Path(args.config).resolve())
    config = load_config(args.config) if args.config else load_config()

    from dagster import AssetKey

    from synth_cpt.defs.definitions import build_definitions

    console = terminal()
    instance = dagster_instance()
    defs = build_definitions()
    graph = defs.resolve_asset_graph()
    everything = sorted((k for k in graph.get_all_asset_keys() if graph.get(k).group_name == group), key=str)
    if not everything:  # e.g. no mix recipe in the config: say so, not Dagster's error about an empty selection
        where = " (add recipes under mixes.recipes)" if label == "mix" else ""
        raise SystemExit(f"synth-cpt {label}: the config defines no {group} assets{where}")
    keys = [AssetKey(a) for a in args.asset] if args.asset else everything
    unknown = [k.to_user_string() for k in keys if k not in everything]
    if unknown:
        raise SystemExit(f"synth-cpt {label}: unknown assets {unknown}; there are {[k.to_user_string() for k in everything]}")
    every = [f"{lang}|{q}" for lang in config.languages for q in config.quality.buckets]
    partitions = args.partition or every
    unknown = [p for p in partitions if p not in every]
    if unknown:
        raise SystemExit(f"synth-cpt {label}: unknown partitions {unknown}; there are {every} (language|quality)")
    if one_run:
        runs = partition_ranges(partitions, list(config.languages), list(config.quality.buckets))
    else:
        runs = [(p, p) for p in partitions]
    job = defs.resolve_implicit_job_def_def_for_assets(keys)
    rows: list[dict] = []
    failures: list[str] = []
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console) as progress:
        task = progress.add_task(label, total=len(partitions) * len(keys))  # one step per output published
        for first, last in runs:
            span = first if first == last else f"{first} .. {last}"
            progress.update(task, description=f"{label} {span}")
            marker = uuid.uuid4().hex
            tags = {**run_tags(label), RUN_MARKER: marker}
            if first != last:
                tags |= {"dagster/asset_partition_range_start": first, "dagster/asset_partition_range_end": last}
            stop = threading.Event()
            watcher = threading.Thread(target=_watch, args=(instance, marker, progress, task, stop, len(rows)), daemon=True)
            watcher.start()
            try:
                result = job.execute_in_process(
                    instance=instance, partition_key=first if first == last else None, asset_selection=keys, raise_on_error=False,
                    run_config=QUIET_RUN_CONFIG, tags=tags,
                )  # fmt: skip
            finally:
                stop.set()
                watcher.join()
            if not result.success:
                failure = next((e.event_specific_data.error.message.strip() for e in result.all_events if e.is_step_failure), "")
                failures.append(f"{span} (run {result.run_id}): {redact(failure)[:400]}")
            for event in result.get_asset_materialization_events():
                m = event.event_specific_data.materialization
                meta = {k: v.value for k, v in m.metadata.items()}
                rows.append({"asset": m.asset_key.to_user_string(), "partition": str(m.partition), "run": result.run_id, **meta})
            progress.update(task, completed=len(rows))
    return rows, failures, partitions, config.storage_uri()


def report_failures(failures: list[str]) -> int:
    if not failures:
        return 0
    console = terminal()
    console.print("[red]failed runs (see them in the Dagster UI):[/red]")
    for f in failures:
        console.print(f"  - {f}")
    return 1
