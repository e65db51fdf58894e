"""`synth-cpt ingest`: new drops, then every asset the daemon would bring up to date."""

from __future__ import annotations

import argparse
import os
from collections import Counter
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from synth_cpt.cli.common import QUIET_RUN_CONFIG, dagster_instance
from synth_cpt.core.config import DROPS_ENV, load_config


def ingest_steps(defs, instance, new_drops: list[str]) -> list[tuple[list, str | None]]:
    """What `synth-cpt ingest` materializes, read from the Definitions: crawl_drops for the new drops,
    then, level by level of the asset graph, every downstream asset that the daemon would bring up to
    date by itself (it has an automation condition), for every partition. An asset added later joins
    this walk without a CLI change; GPU-bound generation assets stay out unless configured eager."""
    from dagster import AssetKey, AssetSelection, DynamicPartitionsDefinition

    from synth_cpt.core.layout import CRAWL_DROPS

    graph = defs.resolve_asset_graph()
    root = AssetKey(CRAWL_DROPS)
    wanted = AssetSelection.assets(root).downstream().resolve(graph)
    steps: list[tuple[list, str | None]] = []
    for level in graph.toposorted_asset_keys_by_level:
        chosen = sorted((k for k in level if k in wanted and (k == root or graph.get(k).automation_condition is not None)), key=str)
        groups: dict[int, list] = {}
        for key in chosen:
            groups.setdefault(id(graph.get(key).partitions_def), []).append(key)
        for keys in groups.values():
            pdef = graph.get(keys[0]).partitions_def
            if pdef is None:
                partitions: list[str | None] = [None]
            elif isinstance(pdef, DynamicPartitionsDefinition):
                partitions = list(new_drops)
            else:
                partitions = list(pdef.get_partition_keys(dynamic_partitions_store=instance))
            steps += [(keys, p) for p in partitions]
    return steps


def cmd_ingest(args: argparse.Namespace) -> int:
    if args.drops:
        os.environ[DROPS_ENV] = args.drops
    config = load_config(args.config) if args.config else load_config()
    if args.config:
        os.environ["SYNTH_CPT_CONFIG"] = str(Path(args.config).resolve())

    from synth_cpt.defs.definitions import build_definitions
    from synth_cpt.defs.partitions import crawl_drop_partitions
    from synth_cpt.defs.resources import open_location
    from synth_cpt.ingest.drops import plan_drops, register_drop
    from synth_cpt.ingest.sources import list_drops

    console = Console(stderr=True)
    instance = dagster_instance()
    defs = build_definitions()
    storage = open_location(config.storage_uri())
    location = config.drops_uri()
    listing = list_drops(open_location(location), config.drops.patterns, config.drops.recursive)
    for line in listing.refused:
        console.print(f"[yellow]refused[/yellow] {line}")

    plan = plan_drops(storage, listing.drops, config.drops.settle_seconds)  # the sensor's own answer
    for drop in plan.unsettled:
        console.print(
            f"[yellow]waiting[/yellow] {drop.relative_path}: changed under {config.drops.settle_seconds:g} s ago (still being copied?)"
        )
    todo = plan.new
    for drop in todo:
        register_drop(storage, drop, location)
    known = set(instance.get_dynamic_partitions(crawl_drop_partitions.name))
    new_keys = sorted({d.key for d in todo} - known)
    if new_keys:
        instance.add_dynamic_partitions(crawl_drop_partitions.name, new_keys)
    console.print(
        f"{len(listing.drops)} drop(s) in {location}: {len(todo)} new or changed, {len(plan.unchanged)} unchanged"
        + (f", {len(plan.unsettled)} still being written" if plan.unsettled else "")
    )

    corpus_keys = [f"{lang}|{q}" for lang in config.languages for q in config.quality.buckets]
    steps = ingest_steps(defs, instance, [d.key for d in todo])
    failures: list[str] = []
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("materializing", total=len(steps))
        for keys, partition in steps:
            names = ", ".join(k.to_user_string() for k in keys)
            progress.update(task, description=f"{names} {partition or ''}".strip())
            job = defs.resolve_implicit_job_def_def_for_assets(keys)
            result = job.execute_in_process(
                instance=instance,
                partition_key=partition,
                asset_selection=keys,
                raise_on_error=False,
                run_config=QUIET_RUN_CONFIG,
                tags={"synth_cpt/launched_by": "synth-cpt ingest"},
            )
            if not result.success:
                failures.append(f"{names} {partition or ''} (run {result.run_id})")
            progress.advance(task)

    _print_summary(Console(), storage, config, corpus_keys)
    if failures:
        console.print("[red]failed runs (see them in the Dagster UI):[/red]")
        for f in failures:
            console.print(f"  - {f}")
        return 1
    return 0


def _print_summary(console: Console, storage, config, corpus_keys: list[str]) -> None:
    import pyarrow.compute as pc

    from synth_cpt.core.layout import QUALITY_SUBSETS, RAW_CORPUS, partition_file
    from synth_cpt.ingest.drops import ingested_drops

    drops = Table(title="crawl drops")
    drops.add_column("drop", overflow="fold")
    for col in ("records", "documents", "quarantined", "rate", "accepted"):
        drops.add_column(col, justify="right")
    reasons: Counter[str] = Counter()
    for m in ingested_drops(storage):
        reasons.update(m["quarantine_by_reason"])
        drops.add_row(
            m["drop_id"],
            f"{m['records']:,}",
            f"{m['documents']:,}",
            f"{m['quarantined']:,}",
            f"{m['quarantine_rate']:.1%}",
            "yes" if m["accepted"] else "NO",
        )
    console.print(drops)

    parts = Table(title="partitions (language|quality)")
    for col in ("partition", "raw_corpus docs", "subset docs", "subset tokens", "budget"):
        parts.add_column(col, justify="left" if col == "partition" else "right")
    for key in corpus_keys:
        lang, q = key.split("|")
        raw_n = sub_n = sub_tok = None
        if storage.exists(partition_file(RAW_CORPUS, lang, q)):  # the footer says how many rows: nothing else is read
            raw_n = storage.parquet_file(partition_file(RAW_CORPUS, lang, q)).metadata.num_rows
        if storage.exists(partition_file(QUALITY_SUBSETS, lang, q)):
            sub = storage.parquet_file(partition_file(QUALITY_SUBSETS, lang, q)).read(columns=["n_tokens"])
            sub_n, sub_tok = sub.num_rows, int(pc.sum(sub["n_tokens"]).as_py() or 0)
        budget = config.subsets.budget_for(key)
        fmt = lambda v: "-" if v is None else f"{v:,}"  # noqa: E731
        parts.add_row(key, fmt(raw_n), fmt(sub_n), fmt(sub_tok), fmt(budget))
    console.print(parts)

    q = Table(title="quarantined records by reason")
    q.add_column("reason")
    q.add_column("records", justify="right")
    for reason, n in sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0])):
        q.add_row(reason, f"{n:,}")
    console.print(q)


def register(sub: argparse._SubParsersAction) -> None:
    ingest = sub.add_parser("ingest", help="register new drops, then materialize crawl_drops, raw_corpus, tokenizer, quality_subsets")
    ingest.add_argument("--drops", help="drops location: a folder, s3://bucket/prefix (default: the config's drops.location)")
    ingest.set_defaults(func=cmd_ingest)
