"""`synth-cpt ingest`: new drops, once settled, then every asset the daemon would bring up to date.

Exit status: 0 all good; 1 a blocking check failed or a run failed (a drop kept out, a file still
changing after the longest wait); 2 a usage error (arguments, config, a drops location that is not there).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import threading
import time
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from synth_cpt.cli.common import QUIET_RUN_CONFIG, dagster_instance, run_tags, terminal, wide_console
from synth_cpt.core.config import DROPS_ENV, PipelineConfig, load_config
from synth_cpt.core.layout import CRAWL_DROPS, QUALITY_CUTPOINTS, QUALITY_SUBSETS, RAW_CORPUS, TOKENIZER, partition_file

if TYPE_CHECKING:  # the pipeline's modules load when a command runs, not when the CLI starts
    from synth_cpt.core.storage import Storage
    from synth_cpt.ingest.drops import DropPlan
    from synth_cpt.ingest.sources import Listing

USAGE = 2
WAIT_LIMIT_SECONDS = 600.0  # waiting for files that keep changing ends here (or at twice --settle, if longer)


def ingest_steps(defs, instance, new_drops: list[str]) -> list[tuple[list, str | None]]:
    """What `synth-cpt ingest` materializes, read from the Definitions: crawl_drops for the new drops,
    then, level by level of the asset graph, every downstream asset that the daemon would bring up to
    date by itself (it has an automation condition), for every partition. An asset added later joins
    this walk without a CLI change; GPU-bound generation assets stay out unless configured eager."""
    from dagster import AssetKey, AssetSelection, DynamicPartitionsDefinition

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


def merge_steps(graph, run: list, partition: str | None, queue: list[tuple[list, str | None]], why_not) -> tuple[list, list]:
    """The steps of `queue` that can join a run of `run` at `partition`, and the queue without them.

    One run per step costs a Dagster run each (its start, its event log, its end); a run may hold several
    assets of one partition, and assets without partitions. A step joins when it has that partition (or
    none), no step it would overtake holds an asset it depends on, and it has its input counting what the
    run publishes before it (`why_not(key, partition, pending)` is None for each of its assets). So
    raw_corpus of the last partition, the tokenizer and quality_subsets of that partition are one run;
    a step left out runs as before, in its place."""
    pending = {(k, partition) for k in run}
    pdefs = {id(graph.get(k).partitions_def) for k in run if graph.get(k).partitions_def is not None}
    taken, rest, overtaken = [], [], set()
    for keys, part in queue:
        defs_ = {id(graph.get(k).partitions_def) for k in keys if graph.get(k).partitions_def is not None}
        fits = part is None or partition is None or (part == partition and defs_ <= pdefs)
        ancestors = set().union(*(graph.get_ancestor_asset_keys(k) for k in keys)) if fits else set()
        if fits and not (ancestors & overtaken) and all(why_not(k, part, frozenset(pending)) is None for k in keys):
            taken.append((keys, part))
            pending |= {(k, part) for k in keys}
            pdefs |= defs_
            partition = partition if part is None else part
        else:
            rest.append((keys, part))
            overtaken |= set(keys)
    return taken, rest


def to_requeue(run: list, partition: str | None, started: set[str], requeued: set, op_of: Callable[[Any], str]) -> list:
    """The assets of a finished run whose steps never started (a step before them failed), to be run again
    on their own: an asset's step is its op's (`op_of`: a multi-asset's op holds several assets). Each is
    requeued at most once, and none when no step of the run started (a run that started none would start
    none again)."""
    if not started:
        return []
    return [k for k in run if op_of(k) not in started and (k, partition) not in requeued]


def wait_until_settled(
    location: Storage,
    storage: Storage,
    config: PipelineConfig,
    settle_seconds: float,
    say: Callable[[str], None],
    sleep: Callable[[float], None] = time.sleep,
) -> tuple[Listing, DropPlan]:
    """List the drops and plan them (`plan_drops`, the sensor's own answer); while some are still
    changing (being copied), say which and for how long, sleep until the youngest has settled, and plan
    again: a file that changed meanwhile is waited for again. Waiting ends after WAIT_LIMIT_SECONDS (or
    twice `settle_seconds`); what is still changing then stays in `plan.unsettled`, for the next run."""
    from synth_cpt.ingest.drops import plan_drops
    from synth_cpt.ingest.sources import list_drops

    limit = max(WAIT_LIMIT_SECONDS, 2 * settle_seconds)
    started = time.monotonic()
    while True:
        listing = list_drops(location, config.drops.patterns, config.drops.recursive)
        now_ns = time.time_ns()
        plan = plan_drops(storage, listing.drops, settle_seconds, now_ns=now_ns)
        if not plan.unsettled:
            return listing, plan
        wait = max(plan.settles_in.values())
        waited = time.monotonic() - started
        if waited + wait > limit:
            for drop in plan.unsettled:
                say(
                    f"[yellow]not settled[/yellow] {escape(drop.relative_path)}: still changing after {waited:.0f} s of waiting "
                    f"(at most {limit:.0f} s); left for the next run"
                )
            return listing, plan
        for drop in plan.unsettled:
            age = (now_ns - drop.changed_ns) / 1e9
            say(
                f"[yellow]waiting[/yellow] for {escape(drop.relative_path)}: changed {age:.1f} s ago, "
                f"settled in {plan.settles_in[drop.key]:.1f} s (--settle {settle_seconds:g})"
            )
        sleep(wait + 0.05)


def missing_input(
    asset: str, partition: str | None, storage: Storage, config: PipelineConfig, pending: set[tuple[str, str | None]] | None = None
) -> str | None:
    """Why a step of the ingest assets has nothing to work on, read from what is published, with the
    functions the asset itself reads it with; None: it has its input, run it. An asset without a rule
    here runs (unless an asset it depends on was skipped, see `cmd_ingest`). `pending`: (asset, partition)
    that run before it in the same run, counted as published (Dagster skips the step if they are not)."""
    pending = pending or set()
    from synth_cpt.corpus.tokenizer import published_tokenizer
    from synth_cpt.ingest.drops import drop_accepted, ingested_drops

    if asset == RAW_CORPUS:
        lang, quality = str(partition).split("|")
        if storage.exists(partition_file(RAW_CORPUS, lang, quality)):
            return None  # published before: it follows the drops, even to empty when every drop is kept out
        manifests = ingested_drops(storage)
        if not manifests:
            return "no drop is published in crawl_drops yet"
        if not any(drop_accepted(m, config) and m["documents"] > 0 for m in manifests):  # build_raw_corpus's own rule
            out = sum(not drop_accepted(m, config) for m in manifests)
            return "no accepted drop with documents in crawl_drops yet" + (f" ({out} kept out by the quarantine_rate check)" if out else "")
        return None
    if asset == QUALITY_CUTPOINTS:
        return None if ingested_drops(storage) else "no drop is published in crawl_drops yet"
    if asset == TOKENIZER:
        if config.tokenizer.model_file:
            return None  # a given model: nothing to train on is needed
        rows = 0
        rebuilt = {partition_file(RAW_CORPUS, *str(p).split("|")) for a, p in pending if a == RAW_CORPUS}  # not counted: may change
        for key in storage.list(RAW_CORPUS):  # what the asset trains on
            if key.endswith(".parquet") and key not in rebuilt:
                with contextlib.closing(storage.parquet_file(key)) as pf:
                    rows += pf.metadata.num_rows
        return None if rows else "no accepted drop in raw_corpus yet: nothing to train it on (or set tokenizer.model_file)"
    if asset == QUALITY_SUBSETS:
        lang, quality = str(partition).split("|")
        if (RAW_CORPUS, partition) not in pending and not storage.exists(partition_file(RAW_CORPUS, lang, quality)):
            return f"raw_corpus {partition} is not published"
        if (TOKENIZER, None) in pending:
            return None
        try:
            published_tokenizer(storage)
        except FileNotFoundError:
            return "tokenizer is not published"
    return None


def failure_line(result) -> str:
    """The first line of why a run failed: the blocking check that failed, else the step's own error
    (its innermost cause, not Dagster's wrapper)."""
    from dagster import DagsterEventType

    for event in result.all_events:
        if event.event_type == DagsterEventType.ASSET_CHECK_EVALUATION:
            check = event.event_specific_data
            if not check.passed and check.blocking:
                detail = (check.description or "").strip().splitlines()
                return f"blocking check {check.check_name} failed" + (f": {detail[0]}" if detail else "")
    for event in result.all_events:
        if event.is_step_failure or event.event_type == DagsterEventType.RUN_FAILURE:
            error = getattr(event.event_specific_data, "error", None)
            while error is not None and error.cause is not None:
                error = error.cause
            if error is not None:
                return (error.message.strip().splitlines() or ["failed"])[0]
            return (event.message or "failed").strip().splitlines()[0]
    return "failed"


def cmd_ingest(args: argparse.Namespace) -> int:
    if args.drops:
        os.environ[DROPS_ENV] = args.drops
    config = load_config(args.config) if args.config else load_config()
    if args.config:
        os.environ["SYNTH_CPT_CONFIG"] = str(Path(args.config).resolve())
    settle = config.drops.settle_seconds if args.settle is None else args.settle

    from synth_cpt.defs.resources import open_location
    from synth_cpt.ingest.sources import list_drops

    console = terminal()

    def say(line: str) -> None:  # one line, never folded (a terminal folds it; a log keeps it whole)
        console.print(line, highlight=False, soft_wrap=True)

    storage = open_location(config.storage_uri())
    location = config.drops_uri()
    try:
        drops_storage = open_location(location)
        list_drops(drops_storage, config.drops.patterns, config.drops.recursive)  # a location that is not there is a usage error
    except (FileNotFoundError, NotADirectoryError, ValueError) as exc:
        say(f"synth-cpt ingest: drops location {escape(location)}: {escape(str(exc))}")
        return USAGE

    if not os.environ.get("DAGSTER_HOME"):
        dagster_instance()  # says how to set it, before any waiting
    listing, plan = wait_until_settled(drops_storage, storage, config, settle, say)  # before Dagster loads: a wait starts at once
    for line in listing.refused:
        say(f"[yellow]refused[/yellow] {escape(line)}")
    with contextlib.ExitStack() as stack:
        if any(d.size > 2 * config.limits.batch_bytes for d in plan.new):  # a drop big enough for worker processes
            from synth_cpt.ingest.drops import worker_pool

            stack.enter_context(worker_pool(config))  # they start now, while Dagster loads, and serve every drop
        return _ingest(config, storage, location, listing, plan, console, say)


def _ingest(
    config: PipelineConfig, storage: Storage, location: str, listing: Listing, plan: DropPlan, console: Console, say: Callable[[str], None]
) -> int:
    """Register the planned drops, materialize every step, print the summary; the exit status."""
    from dagster import AssetKey, DagsterEventType

    from synth_cpt.defs.partitions import crawl_drop_partitions
    from synth_cpt.ingest.drops import register_drop

    instance = dagster_instance()
    with warnings.catch_warnings():  # partitioned check specs are "preview" in Dagster: known, and not the user's business
        warnings.filterwarnings("ignore", message=".*partitions_def on an AssetCheckSpec")
        from synth_cpt.defs.definitions import build_definitions

        defs = build_definitions()
    warming = threading.Thread(target=_import_what_steps_use, name="warm-imports", daemon=True)
    warming.start()
    todo = plan.new
    for drop in todo:
        register_drop(storage, drop, location)
    known = set(instance.get_dynamic_partitions(crawl_drop_partitions.name))
    new_keys = sorted({d.key for d in todo} - known)
    if new_keys:
        instance.add_dynamic_partitions(crawl_drop_partitions.name, new_keys)
    say(
        f"{len(listing.drops)} drop(s) in {escape(location)}: {len(todo)} new or changed, {len(plan.unchanged)} unchanged"
        + (f", {len(plan.unsettled)} still being written (left for the next run)" if plan.unsettled else "")
    )

    graph = defs.resolve_asset_graph()
    steps = ingest_steps(defs, instance, [d.key for d in todo])
    skipped: set[tuple[AssetKey, str | None]] = set()
    failures: list[str] = []
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn())

    def why_not(key: AssetKey, partition: str | None, pending: frozenset = frozenset()) -> str | None:
        """Why the step of `key` would have nothing to work on (None: run it); `pending` runs before it in the same run."""
        why = missing_input(key.to_user_string(), partition, storage, config, {(k.to_user_string(), p) for k, p in pending})
        if why is None:  # an asset without its own rule: skipped when an asset it reads was
            parents = [(p, part) for p in sorted(graph.get(key).parent_keys, key=str) for part in (partition, None)]
            parent = next((pp for pp in parents if pp in skipped), None)
            why = f"{_label(parent[0].to_user_string(), parent[1])} was skipped" if parent else None
        return why

    def _skip(key: AssetKey, partition: str | None, why: str | None) -> bool:
        if why is not None:
            skipped.add((key, partition))
            say(f"{_label(key.to_user_string(), partition)}: skipped, {escape(why)}")
        return why is not None

    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("materializing", total=sum(len(keys) for keys, _ in steps))
        queue = list(steps)
        requeued: set[tuple[AssetKey, str | None]] = set()
        while queue:
            keys, partition = queue.pop(0)
            run = [k for k in keys if not _skip(k, partition, why_not(k, partition))]
            done = len(keys) - len(run)  # skipped ones
            if run:  # later steps this run can take: see `merge_steps`
                taken, queue = merge_steps(graph, run, partition, queue, why_not)
                for more, part in taken:
                    run += more
                    partition = partition if part is None else part
            if run:
                names = _label(", ".join(k.to_user_string() for k in run), partition)
                progress.update(task, description=names)
                warming.join()  # no step imports what that thread may be importing (a half-initialized module)
                job = defs.resolve_implicit_job_def_def_for_assets(run)
                result = job.execute_in_process(
                    instance=instance,
                    partition_key=partition,
                    asset_selection=run,
                    raise_on_error=False,
                    run_config=QUIET_RUN_CONFIG,
                    tags=run_tags("ingest"),
                )
                started = {e.step_key for e in result.all_events if e.event_type == DagsterEventType.STEP_START}
                not_run = to_requeue(run, partition, started, requeued, lambda k: defs.get_assets_def(k).node_def.name)
                # after a failed step: their own steps again, judged on what is published now
                requeued.update((k, partition) for k in not_run)
                queue = [*(([k], partition if graph.get(k).partitions_def else None) for k in not_run), *queue]
                if not result.success:
                    why = failure_line(result)
                    kept_out = _kept_out_because(storage, config, str(partition)) if run == [AssetKey(CRAWL_DROPS)] else []
                    if kept_out and why.startswith("blocking check"):  # the drop's own words, not GX's
                        why = why.split(":")[0] + ": " + "; ".join(kept_out)
                    failures.append(f"{names}: {why} (run {result.run_id})")
                done += len(run) - len(not_run)
            progress.advance(task, done)
        progress.update(task, description="ingest")

    _print_summary(wide_console(), storage, config, [f"{lang}|{q}" for lang in config.languages for q in config.quality.buckets])
    if failures:
        console.print("[red]failed runs (their logs are in the Dagster UI):[/red]")
        for f in failures:
            say(f"  - {escape(f)}")
    ran = {str(p) for keys, p in steps if AssetKey(CRAWL_DROPS) in keys}
    kept_out = [d.key for d in listing.drops if d.key not in ran and _kept_out_because(storage, config, d.key)]
    if kept_out:  # ingested before, still kept out: the drop's check has failed and nothing has changed since
        say(
            f"[red]kept out by the quarantine_rate check since an earlier run:[/red] {escape(', '.join(kept_out))} (see the crawl drops table)"
        )
    return 1 if failures or kept_out or plan.unsettled else 0


def _import_what_steps_use() -> None:
    """Import, in the background, the libraries the steps' checks and metadata load on first use (GX takes
    seconds): this thread does it while drops are registered and the steps planned; the first run waits for it."""
    # no warnings.catch_warnings here: it swaps the process's filters, under the main thread's feet
    with contextlib.suppress(Exception):  # a failed import fails the step that needs it, with its error
        import great_expectations  # noqa: F401
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot  # noqa: F401


def _kept_out_because(storage: Storage, config: PipelineConfig, drop_id: str) -> list[str]:
    from synth_cpt.ingest.drops import drop_kept_out_because, published

    pointer = published(storage, drop_id)
    return drop_kept_out_because(pointer["manifest"], config) if pointer else []


def _label(asset: str, partition: str | None) -> str:
    return f"{asset} {partition}" if partition else asset


def _print_summary(console: Console, storage: Storage, config: PipelineConfig, corpus_keys: list[str]) -> None:
    import pyarrow.compute as pc

    from synth_cpt.ingest.drops import drop_kept_out_because, ingested_drops

    manifests = ingested_drops(storage)
    kept_out = {m["drop_id"]: drop_kept_out_because(m, config) for m in manifests}  # today's limits, as raw_corpus judges
    drops = Table(title="crawl drops")
    drops.add_column("drop", overflow="fold")
    for col in ("records", "documents", "quarantined", "rate", "accepted"):
        drops.add_column(col, justify="right")
    if any(kept_out.values()):
        drops.add_column("kept out because", overflow="fold")
    reasons: Counter[str] = Counter()
    for m in manifests:
        reasons.update(m["quarantine_by_reason"])
        why = kept_out[m["drop_id"]]
        cells = [m["drop_id"], f"{m['records']:,}", f"{m['documents']:,}", f"{m['quarantined']:,}", f"{m['quarantine_rate']:.1%}"]
        drops.add_row(*cells, "NO" if why else "yes", *([escape("; ".join(why))] if any(kept_out.values()) else []))
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


def _seconds(value: str) -> float:
    seconds = float(value)
    if not 0 <= seconds < float("inf"):  # also refuses nan and inf
        raise argparse.ArgumentTypeError(f"{value!r} is not a number of seconds >= 0")
    return seconds


def register(sub: argparse._SubParsersAction) -> None:
    ingest = sub.add_parser(
        "ingest",
        help="register new drops (waiting for files still being copied), then materialize crawl_drops, raw_corpus, tokenizer, "
        "quality_subsets; exit 0 all good, 1 a blocking check or a run failed, 2 usage",
    )
    ingest.add_argument("--drops", help="drops location: a folder, s3://bucket/prefix (default: the config's drops.location)")
    ingest.add_argument(
        "--settle",
        type=_seconds,
        metavar="SECONDS",
        help="wait until each file has not changed for this long (it may still be being copied); 0 takes them now "
        "(default: the config's drops.settle_seconds)",
    )
    ingest.set_defaults(func=cmd_ingest)
