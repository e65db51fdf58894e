"""What every command shares: the Dagster instance, consoles, and materializing a group of assets."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from synth_cpt.core.config import load_config

GPU_POOL = "gpu"
QUIET_RUN_CONFIG = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}


def dagster_instance():
    from dagster import DagsterInstance

    home = os.environ.get("DAGSTER_HOME")
    if not home:
        raise SystemExit("synth-cpt: set DAGSTER_HOME to the Dagster instance folder (`make instance` prepares .dagster_home)")
    Path(home).mkdir(parents=True, exist_ok=True)
    instance = DagsterInstance.get()
    storage = instance.event_log_storage
    if GPU_POOL not in storage.get_concurrency_keys():
        storage.set_concurrency_slots(GPU_POOL, 1)  # one engine per machine (DESIGN.md)
    return instance


def wide_console(width: int = 160) -> Console:
    """Stdout tables: the terminal's width, or `width` when piped (Rich would fold them at 80)."""
    return Console(width=None if sys.stdout.isatty() else width)


def materialize_group(args: argparse.Namespace, group: str, label: str) -> tuple[list[dict], list[str], list[str], str]:
    """Materialize a group's assets (or those asked) for every partition (or those asked), one Dagster run
    per partition in this process: (metadata rows, failed runs, partitions, storage root)."""
    if args.config:
        os.environ["SYNTH_CPT_CONFIG"] = str(Path(args.config).resolve())
    config = load_config(args.config) if args.config else load_config()

    from dagster import AssetKey

    from synth_cpt.defs.definitions import build_definitions

    console = Console(stderr=True)
    instance = dagster_instance()
    defs = build_definitions()
    graph = defs.resolve_asset_graph()
    everything = sorted((k for k in graph.get_all_asset_keys() if graph.get(k).group_name == group), key=str)
    keys = [AssetKey(a) for a in args.asset] if args.asset else everything
    unknown = [k.to_user_string() for k in keys if k not in everything]
    if unknown:
        raise SystemExit(f"synth-cpt {label}: unknown assets {unknown}; there are {[k.to_user_string() for k in everything]}")
    partitions = args.partition or [f"{lang}|{q}" for lang in config.languages for q in config.quality.buckets]
    job = defs.resolve_implicit_job_def_def_for_assets(keys)
    rows: list[dict] = []
    failures: list[str] = []
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console) as progress:
        task = progress.add_task(label, total=len(partitions))
        for partition in partitions:
            progress.update(task, description=f"{label} {partition}")
            result = job.execute_in_process(
                instance=instance, partition_key=partition, asset_selection=keys, raise_on_error=False,
                run_config=QUIET_RUN_CONFIG, tags={"synth_cpt/launched_by": f"synth-cpt {label}"},
            )  # fmt: skip
            if not result.success:
                failure = next((e.event_specific_data.error.message.strip() for e in result.all_events if e.is_step_failure), "")
                failures.append(f"{partition} (run {result.run_id}): {failure[:400]}")
            for event in result.get_asset_materialization_events():
                m = event.event_specific_data.materialization
                meta = {k: v.value for k, v in m.metadata.items()}
                rows.append({"asset": m.asset_key.to_user_string(), "partition": partition, "run": result.run_id, **meta})
            progress.advance(task)
    return rows, failures, partitions, config.storage_uri()


def report_failures(failures: list[str]) -> int:
    if not failures:
        return 0
    console = Console(stderr=True)
    console.print("[red]failed runs (see them in the Dagster UI):[/red]")
    for f in failures:
        console.print(f"  - {f}")
    return 1
