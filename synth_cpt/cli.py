"""`synth-cpt`: run from a terminal what the sensor and the daemon do, in the same Dagster instance.

Runs go through the instance at $DAGSTER_HOME, so every one shows in the UI with its logs, checks and
metadata, exactly as if the sensor had launched it.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from synth_cpt.core.config import DROPS_ENV, ConfigError, load_config
from synth_cpt.core.layout import GENERATIONS

GPU_POOL = "gpu"
QUIET_RUN_CONFIG = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}


def _instance():
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
    instance = _instance()
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


def _read_chat_requests(path: str) -> list:
    """Chat requests from JSONL; every bad line is reported with its number before anything is sent."""
    import json

    from synth_cpt.generation.requests import ChatRequest, Sampling

    requests, problems = [], []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                msgs = obj["messages"]
                if not isinstance(msgs, list) or not all(isinstance(m, dict) and {"role", "content"} <= set(m) for m in msgs):
                    raise ValueError("'messages' must be a list of {role, content} objects")
                sampling = Sampling.from_dict(obj)  # temperature, top_p, max_tokens, stop, seed at the top level of the line
                requests.append(
                    ChatRequest.chat(msgs, sampling, json_schema=obj.get("json_schema"), prompt_name=str(obj.get("prompt_name", "cli")))
                )
            except (ValueError, KeyError, TypeError) as exc:
                problems.append(f"{path}:{n}: {type(exc).__name__}: {exc}")
    if problems:
        raise SystemExit("synth-cpt generate: bad input, nothing was sent:\n  " + "\n  ".join(problems[:20]))
    return requests


def cmd_generate(args: argparse.Namespace) -> int:
    import json

    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # the progress bar says what matters

    from synth_cpt.defs.resources import LLM, open_location

    config = load_config(args.config) if args.config else load_config()
    requests = _read_chat_requests(args.input)
    fields = {"backend": args.backend}
    if args.model:
        fields["model"] = args.model
    if args.endpoint:
        fields["endpoints"] = args.endpoint
    if args.served_model_name:
        fields["served_model_name"] = args.served_model_name
    if args.model_revision:
        fields["model_revision"] = args.model_revision
    if args.speculative:
        fields["speculative"] = args.speculative
    llm = LLM(**fields)
    console = Console(stderr=True)
    root = config.storage_uri()
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("generating", total=None, rate="")

        def on_progress(done: int, total: int, tokens: int, elapsed: float) -> None:
            progress.update(task, total=total, completed=done, rate=f"{tokens / max(elapsed, 1e-9):,.0f} tok/s")

        engine = llm.engine(open_location(root), root, log=lambda m: console.log(m), progress=on_progress)
        report = engine.run(requests, scope=args.scope)
    rows = {r["request_id"]: r for r in engine.results(requests, scope=args.scope).iter_rows(named=True)}
    failures = report.failures
    out = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout
    try:
        for req in requests:
            rid = req.request_id(engine.fingerprint)
            row = rows.get(rid)
            record = {"request_id": rid}
            if row:
                record.update({k: row[k] for k in ("text", "finish_reason", "prompt_tokens", "completion_tokens", "rejected")})
            else:
                record["error"] = failures.get(rid, "not generated")
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
    finally:
        if args.output:
            out.close()
    console.print(
        f"{report.requests} requests, {report.unique} unique, {report.cache_hits} from the cache, {report.sent} sent, "
        f"{report.failed} failed, {report.rejected} rejected, {report.completion_tokens:,} output tokens, {report.tokens_per_s:,.0f} tok/s"
    )
    return 1 if report.failed else 0


def cmd_cache(args: argparse.Namespace) -> int:
    import polars as pl

    from synth_cpt.defs.resources import open_location
    from synth_cpt.generation.cache import GenerationCache

    config = load_config(args.config) if args.config else load_config()
    cache = GenerationCache(open_location(args.root or config.storage_uri()), args.prefix)
    if args.action == "compact":
        figures = cache.compact(args.scope)
        print(
            f"segments {figures['segments_before']} -> {figures['segments_after']}, rows {figures['rows_before']} -> {figures['rows_after']}"
        )
        return 0
    rows = cache.load(["request_id", "error", "rejected", "completion_tokens", "model_fingerprint"])
    ok = rows.filter(pl.col("error").is_null())
    table = Table(title=f"generation cache {cache.storage.uri(cache.prefix)}")
    table.add_column("figure")
    table.add_column("value", justify="right")
    for name, value in (
        ("scopes", len(cache.scopes())),
        ("segments", len(cache.segment_keys())),
        ("rows", rows.height),
        ("requests with a result", ok["request_id"].n_unique()),
        ("requests only failed", rows.filter(~pl.col("request_id").is_in(ok["request_id"].implode()))["request_id"].n_unique()),
        ("rejected outputs", ok.filter(pl.col("rejected").is_not_null()).height),
        ("output tokens", int(ok["completion_tokens"].sum() or 0)),
        ("model fingerprints", rows["model_fingerprint"].n_unique()),
    ):
        table.add_row(name, f"{value:,}")
    Console().print(table)
    return 0


def _wide_console(width: int = 160) -> Console:
    """Stdout tables: the terminal's width, or `width` when piped (Rich would fold them at 80)."""
    return Console(width=None if sys.stdout.isatty() else width)


def _materialize_group(args: argparse.Namespace, group: str, label: str) -> tuple[list[dict], list[str], list[str], str]:
    """Materialize a group's assets (or those asked) for every partition (or those asked), one Dagster run
    per partition in this process: (metadata rows, failed runs, partitions, storage root)."""
    if args.config:
        os.environ["SYNTH_CPT_CONFIG"] = str(Path(args.config).resolve())
    config = load_config(args.config) if args.config else load_config()

    from dagster import AssetKey

    from synth_cpt.defs.definitions import build_definitions

    console = Console(stderr=True)
    instance = _instance()
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


def _report_failures(failures: list[str]) -> int:
    if not failures:
        return 0
    console = Console(stderr=True)
    console.print("[red]failed runs (see them in the Dagster UI):[/red]")
    for f in failures:
        console.print(f"  - {f}")
    return 1


def cmd_synthesize(args: argparse.Namespace) -> int:
    """Materialize the generation assets for every partition (or those asked) in this process: one
    Dagster run per partition, all sharing one loaded engine."""
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    from synth_cpt.defs.synthesis import GROUP

    rows, failures, partitions, root = _materialize_group(args, GROUP, "synthesize")
    _print_synthesis(_wide_console(), rows, root, partitions)
    return _report_failures(failures)


def cmd_mix(args: argparse.Namespace) -> int:
    """Materialize the training mixes for every partition (or those asked)."""
    from synth_cpt.defs.mix import GROUP

    rows, failures, partitions, root = _materialize_group(args, GROUP, "mix")
    console = _wide_console()
    table = Table(title=f"training mixes: tokens by origin, under {root}")
    for col in ("mix", "partition", "rows", "tokens", "by origin (documents / tokens)", "shards", "shrunk", "where"):
        table.add_column(col, overflow="fold")
    for r in sorted(rows, key=lambda r: (r["asset"], r["partition"])):
        table.add_row(
            r["asset"], r["partition"], f"{r.get('dagster/row_count', 0):,}", f"{r.get('tokens', 0):,}",
            _origins(r.get("tokens_by_origin", "")), str(r.get("shards", 0)), "yes" if r.get("shrunk") else "",
            str(r.get("dagster/uri", "")),
        )  # fmt: skip
    console.print(table)
    return _report_failures(failures)


def cmd_evals(args: argparse.Namespace) -> int:
    """Materialize eval_scores for every partition (or those asked) and print the scores of each set."""
    from synth_cpt.defs.evals import GROUP

    rows, failures, partitions, root = _materialize_group(args, GROUP, "evals")
    console = _wide_console()
    from synth_cpt.core.layout import EVAL_SCORES
    from synth_cpt.core.storage import open_storage
    from synth_cpt.synthesis.outputs import published_table

    storage = open_storage(root)
    for r in sorted(rows, key=lambda r: r["partition"]):
        scores = published_table(storage, EVAL_SCORES, *r["partition"].split("|"), "scores.parquet")
        table = Table(title=f"eval_scores {r['partition']} ({r['dagster/uri']})")
        cols = ["set", "rows", "tokens", "distinct_2", "compression_ratio", "near_duplicate_rate", "copy_overlap_mean", "heuristic_score_mean"]
        for col in cols:
            table.add_column(col, justify="left" if col == "set" else "right")
        for row in scores.select(cols).to_dicts():
            table.add_row(*(f"{v:.3f}" if isinstance(v, float) else ("-" if v is None else f"{v:,}" if isinstance(v, int) else str(v)) for v in row.values()))
        console.print(table)
        console.print(f"contaminated texts: {r.get('contaminated_texts', 0)}" + (f"; NPM: {r['npm']}" if r.get("npm") else ""))
    return _report_failures(failures)


def _origins(markdown: str) -> str:
    """The tokens_by_origin markdown table of a mix as one line."""
    cells = [line.strip("| ").split(" | ") for line in str(markdown).splitlines()[2:]]
    return "; ".join(f"{c[0]} {int(c[1]):,} / {int(c[2]):,}" for c in cells if len(c) == 3)


def _print_synthesis(console: Console, rows: list[dict], root: str, partitions: list[str]) -> None:
    """Tokens made per asset and partition, where they are, and what loading the engine cost."""
    from synth_cpt.generation.settings import engine_loads

    cells = {(r["asset"], r["partition"]): r for r in rows}
    table = Table(title=f"synthetic data made: rows / tokens / pass rate, under {root}")
    table.add_column("asset", no_wrap=True)
    for partition in partitions:
        table.add_column(partition, justify="right", no_wrap=True)
    table.add_column("tokens", justify="right", no_wrap=True)
    for asset in sorted({r["asset"] for r in rows}):
        line = []
        for partition in partitions:
            r = cells.get((asset, partition))
            if r is None:
                line.append("[red]failed[/red]")
            elif "not_routed" in r:
                line.append("[dim]not routed[/dim]")
            else:
                line.append(f"{r.get('dagster/row_count', 0):,} / {r.get('tokens', 0):,} / {r.get('pass_rate', 1.0):.0%}")
        made = sum(r.get("tokens", 0) for (a, _), r in cells.items() if a == asset)
        table.add_row(asset, *line, f"{made:,}")
    console.print(table)
    sent = sum(r.get("sent", 0) for r in rows)
    cached = sum(r.get("cache_hits", 0) for r in rows)
    console.print(f"requests sent {sent:,}, served from the cache {cached:,}")
    console.print(
        f"each output: {root}/<asset>/<language>/<quality>/current.json -> v/<version>/rows.parquet and rejects.parquet "
        "(entity_graphs: summaries.parquet, entities.parquet); query them with DuckDB (README: \"Reading lineage\")"
    )
    loads, seconds = engine_loads()
    console.print(f"engine loads in this process: {loads} ({seconds:.1f} s loading) for {len(partitions)} partition run(s)")


def _find_document(storage, config, doc_id: str):
    """A document of the quality subsets and its bucket, by doc_id or a unique prefix of it."""
    import polars as pl

    from synth_cpt.core.layout import QUALITY_SUBSETS, partition_file
    from synth_cpt.synthesis.rows import SourceDocument
    from synth_cpt.synthesis.steps import SOURCE_COLUMNS

    found = []
    for lang in config.languages:
        for q in config.quality.buckets:
            key = partition_file(QUALITY_SUBSETS, lang, q)
            if storage.exists(key):
                frame = storage.read_parquet(key, columns=SOURCE_COLUMNS).filter(pl.col("doc_id").str.starts_with(doc_id))
                found += [(d, q) for d in SourceDocument.from_frame(frame)]
    if len(found) != 1:
        raise SystemExit(f"synth-cpt prompts render: {len(found)} documents of the quality subsets match --doc {doc_id!r}")
    return found[0]


def cmd_prompts(args: argparse.Namespace) -> int:
    import json

    from synth_cpt.synthesis.prompts import KINDS, PromptError, list_prompts, load_kind, load_prompt

    try:
        if args.action == "list":
            table = Table(title="prompt library (prompts/<kind>/<name>.yaml)")
            for col in ("kind", "name", "buckets", "chunking", "max_tokens", "prompt_sha", "description"):
                table.add_column(col, overflow="fold")
            for kind in KINDS:
                for name, p in load_kind(kind).items():
                    c = p.spec.chunking
                    chunking = f"{c.max_input_tokens} tok by {c.split}" + (", autoregressive" if c.autoregressive else "")
                    table.add_row(
                        kind, name, ",".join(p.spec.buckets) or "-", chunking, str(p.spec.output.max_tokens), p.sha[:12], p.spec.description
                    )
            Console().print(table)
            return 0
        if not args.name:
            raise SystemExit(f"synth-cpt prompts {args.action}: name a prompt")
        kind = args.kind or next((k for k in KINDS if args.name in list_prompts(k)), "rewrite")
        prompt = load_prompt(kind, args.name)
        if args.action == "show":
            print(f"# {prompt.path}\n# prompt_sha {prompt.sha}")
            print(Path(prompt.path).read_text(encoding="utf-8"))
            return 0
        # render: exactly the messages and sampling sent for a real document, chunk by chunk
        if not args.doc:
            raise SystemExit("synth-cpt prompts render: --doc <doc_id> names the document")
        from synth_cpt.core.storage import open_storage
        from synth_cpt.corpus.tokenizer import TokenCounter
        from synth_cpt.defs.resources import LLM
        from synth_cpt.synthesis.entigraph import Budget
        from synth_cpt.synthesis.preview import preview

        config = load_config(args.config) if args.config else load_config()
        storage = open_storage(config.storage_uri())
        doc, quality = _find_document(storage, config, args.doc)
        e = config.synthesis.entigraph
        needs_cache = kind == "rewrite" and prompt.spec.chunking.autoregressive
        items = preview(
            prompt, doc, quality, storage=storage, count=TokenCounter.from_storage(storage).count, seed=config.seeds.synthesis,
            budget=Budget(e.relations_per_document, e.tokens_per_document, e.triples),
            relation_prompts={n: load_prompt("entigraph", n) for n in ("pair", "triple")},
            engine=LLM().engine(storage, config.storage_uri()) if needs_cache else None,
        )  # fmt: skip
        for item in items:
            header = dict(item.header)
            if item.request is not None:
                header |= {"sampling": item.request.sampling.as_dict(), "json_schema": item.request.schema}
            print("=== " + json.dumps(header, ensure_ascii=False))
            if item.request is None:
                print(f"(not known yet: {item.note})")
            for m in item.request.message_dicts() if item.request else []:
                print(f"--- {m['role']} ---\n{m['content']}")
            print()
        return 0
    except PromptError as exc:
        print(exc, file=sys.stderr)
        return 2


def cmd_npm(args: argparse.Namespace) -> int:
    """NPM of lm-eval result files on PoETa V2: per task, then All / Native / Translated, then every
    task that was not counted and why."""
    import json

    from synth_cpt.evals.npm import load_tasks, npm_of_files

    try:
        report = npm_of_files(args.results)
    except (OSError, ValueError) as exc:
        print(f"synth-cpt npm: {exc}", file=sys.stderr)
        return 2
    summary = report.summary(len(load_tasks()))
    if args.json:
        print(json.dumps({"tasks": [s.__dict__ for s in report.scores], **summary}, indent=2))
        return 0
    console = _wide_console(140)
    table = Table(title=f"PoETa V2 NPM of {', '.join(args.results)} (alias table v{report.alias_version})")
    for col in ("task", "as named in the file", "metric", "raw", "on the table's scale", "NPM", "native"):
        table.add_column(col, justify="right" if col in ("raw", "NPM") else "left")
    for s in sorted(report.scores, key=lambda s: s.task):
        table.add_row(s.task, s.source_name, s.metric, f"{s.raw:g}", f"{s.value:g} {s.scaled}".strip(), f"{s.npm:.2f}", "yes" if s.native else "")
    console.print(table)
    for part in ("all", "native", "translated"):
        value = summary[part]["npm"]
        console.print(f"NPM {part}: {'n/a' if value is None else f'{value:.2f}'} over {summary[part]['tasks']} tasks")
    console.print(f"tasks counted: {len(report.scores)} of {summary['tasks_in_table']}")
    for label, items in (("missing from the results", report.missing), ("no usable value (NaN or absent metric)", report.nan),
                         ("unmatched names (not in the alias table)", report.unmatched), ("duplicates", report.duplicates)):  # fmt: skip
        if items:
            console.print(f"{label} ({len(items)}): " + ", ".join(items))
    return 0


def _catalog(args: argparse.Namespace):
    from synth_cpt.core.storage import open_storage
    from synth_cpt.lineage.catalog import Catalog

    config = load_config(args.config) if args.config else load_config()
    return Catalog(open_storage(config.storage_uri()))


def _print_value(console: Console, title: str, value) -> None:
    """A lineage answer: lists of rows as tables, the rest as `key: value` lines."""
    if isinstance(value, list) and value and isinstance(value[0], dict):
        table = Table(title=title)
        for col in value[0]:
            table.add_column(str(col), overflow="fold")
        for row in value:
            table.add_row(*(f"{v:,}" if isinstance(v, int) else str(v) for v in row.values()))
        console.print(table)
    elif isinstance(value, dict):
        for k, v in value.items():
            if isinstance(v, list) and v and isinstance(v[0], dict):
                _print_value(console, f"{title} {k}".strip(), v)
            else:
                console.print(f"{k}: {v}")
    else:
        console.print(f"{title}: {value}")


def cmd_lineage(args: argparse.Namespace) -> int:
    """Lineage answers from the DuckDB catalog of every output."""
    import json

    from synth_cpt.lineage import queries

    if args.key is None and not args.example:
        raise SystemExit(f"synth-cpt lineage {args.what}: name the {args.what}, or ask for --example")
    catalog = _catalog(args)
    key = args.key
    if key is None:  # --example: a document in a shard, with the most synthetic descendants (or rejections)
        found = catalog.sql(
            "SELECT s.doc_id FROM shards s LEFT JOIN synthetic y USING (doc_id) LEFT JOIN rejects r USING (doc_id) GROUP BY 1 "
            "ORDER BY count(DISTINCT y.synth_id) DESC, count(DISTINCT r.asset) DESC, count(DISTINCT s.mix) DESC, 1 LIMIT 1"
            if args.what == "doc" else "SELECT DISTINCT filename FROM shards ORDER BY 1 LIMIT 1"
            if args.what == "shard" else "SELECT drop_id FROM synthetic GROUP BY 1 ORDER BY count(*) DESC, 1 LIMIT 1"
        )[1]  # fmt: skip
        if not found:
            print(f"synth-cpt lineage {args.what}: nothing published to take an example from", file=sys.stderr)
            return 2
        key = found[0][0]
        print(f"synth-cpt lineage {args.what} {key}")
    try:
        answer = {"shard": queries.shard, "doc": queries.doc, "drop": queries.drop}[args.what](catalog, key)
    except LookupError as exc:
        print(f"synth-cpt lineage: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(answer, indent=2, default=str))
    else:
        _print_value(_wide_console(), "", answer)
    return 0


def cmd_sql(args: argparse.Namespace) -> int:
    """One SQL query over the catalog's views (drops, quarantine, documents, subsets, generations,
    synthetic, rejects, shards, manifests)."""
    import duckdb

    catalog = _catalog(args)
    try:
        columns, rows = catalog.sql(args.query)
    except duckdb.Error as exc:
        print(f"synth-cpt sql: {exc}", file=sys.stderr)
        return 2
    table = Table()
    for col in columns:
        table.add_column(col, overflow="fold")
    for row in rows[: args.limit]:
        table.add_row(*(str(v) for v in row))
    console = _wide_console()
    console.print(table)
    if len(rows) > args.limit:
        console.print(f"({len(rows):,} rows, {args.limit:,} shown; --limit N)")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    config = load_config(args.config) if args.config else load_config()
    print(config.model_dump_json(indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="synth-cpt", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="pipeline YAML (default: $SYNTH_CPT_CONFIG or the shipped defaults)")
    sub = parser.add_subparsers(dest="command", required=True)
    ingest = sub.add_parser("ingest", help="register new drops, then materialize crawl_drops, raw_corpus, tokenizer, quality_subsets")
    ingest.add_argument("--drops", help="drops location: a folder, s3://bucket/prefix (default: the config's drops.location)")
    ingest.set_defaults(func=cmd_ingest)
    gen = sub.add_parser("generate", help="run chat requests from a JSONL file through the generation engine and its cache")
    gen.add_argument(
        "input", help='JSONL, one {"messages": [...], "max_tokens": .., "temperature": .., "seed": .., "json_schema": {..}} per line'
    )
    gen.add_argument("--output", help="results as JSONL, in input order (default: stdout)")
    gen.add_argument("--backend", choices=["vllm", "openai"], default="vllm")
    gen.add_argument("--model", help="'embedded' (default), a local model folder or a model name")
    gen.add_argument("--endpoint", action="append", help="OpenAI-compatible base URL (repeat for a fleet)")
    gen.add_argument("--served-model-name", help="model name the servers expose (openai backend)")
    gen.add_argument("--model-revision", help="which weights stand behind the served name (openai backend; part of the fingerprint)")
    gen.add_argument("--speculative", choices=["auto", "on", "off"], help="n-gram speculative decoding (vllm backend; default auto)")
    gen.add_argument("--scope", default="adhoc", help="where in the cache the results are stored and looked up first (default: adhoc)")
    gen.set_defaults(func=cmd_generate)
    cache = sub.add_parser("cache", help="the generation cache: figures, or compact each scope's segments into one")
    cache.add_argument("action", choices=["stats", "compact"])
    cache.add_argument("--scope", help="compact only this scope, e.g. rewrites_easy/pt/high (default: every scope)")
    cache.add_argument("--root", help="storage root of the cache (default: the pipeline's)")
    cache.add_argument("--prefix", default=GENERATIONS)
    cache.set_defaults(func=cmd_cache)
    syn = sub.add_parser("synthesize", help="materialize the generation assets (rewrites_*, entity_graphs, entigraph_corpus) per partition")
    syn.add_argument("--partition", action="append", help="'pt|high' (repeat; default: every partition)")
    syn.add_argument("--asset", action="append", help="e.g. rewrites_medium (repeat; default: every generation asset)")
    syn.set_defaults(func=cmd_synthesize)
    mix = sub.add_parser("mix", help="materialize the training mixes (training_mix_<recipe>) per partition")
    mix.add_argument("--partition", action="append", help="'pt|high' (repeat; default: every partition)")
    mix.add_argument("--asset", action="append", help="e.g. training_mix_wrap_1to1 (repeat; default: every recipe)")
    mix.set_defaults(func=cmd_mix)
    ev = sub.add_parser("evals", help="materialize eval_scores per partition: diversity, copying, fidelity, quality, contamination, NPM")
    ev.add_argument("--partition", action="append", help="'pt|high' (repeat; default: every partition)")
    ev.add_argument("--asset", action="append", help=argparse.SUPPRESS)
    ev.set_defaults(func=cmd_evals)
    prm = sub.add_parser("prompts", help="the prompt library: list, show a file, or render what is sent for a real document")
    prm.add_argument("action", choices=["list", "show", "render"])
    prm.add_argument("name", nargs="?", help="prompt name, e.g. medium")
    prm.add_argument("--kind", choices=["rewrite", "entigraph", "judge"], help="default: the first kind that has the name")
    prm.add_argument("--doc", help="render: doc_id (or a unique prefix) of a quality_subsets document")
    prm.set_defaults(func=cmd_prompts)
    npm_cmd = sub.add_parser("npm", help="NPM on PoETa V2 of lm-evaluation-harness result files (per task, All, Native, Translated)")
    npm_cmd.add_argument("results", nargs="+", help="lm-eval results JSON (several files of one run are merged)")
    npm_cmd.add_argument("--json", action="store_true", help="print the scores and what was not counted as JSON")
    npm_cmd.set_defaults(func=cmd_npm)
    lin = sub.add_parser("lineage", help="lineage answers: a shard's sources, a document's descendants, what a drop made")
    lin.add_argument("what", choices=["shard", "doc", "drop"])
    lin.add_argument("key", nargs="?", help="shard: a shard file's path; doc: a doc_id (or unique prefix); drop: a drop_id")
    lin.add_argument("--example", action="store_true", help="answer for an example taken from what is published")
    lin.add_argument("--json", action="store_true", help="the answer as JSON")
    lin.set_defaults(func=cmd_lineage)
    sql = sub.add_parser("sql", help="one SQL query over the lineage catalog (DuckDB views over every output)")
    sql.add_argument("query", help='e.g. "SELECT origin, sum(n_tokens) FROM shards GROUP BY 1"')
    sql.add_argument("--limit", type=int, default=50, help="rows shown (default 50)")
    sql.set_defaults(func=cmd_sql)
    cfg = sub.add_parser("config", help="validate the pipeline config and print it with every default filled in")
    cfg.set_defaults(func=cmd_config)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
