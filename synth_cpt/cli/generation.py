"""Generation commands: `generate` (chat requests through the engine), `cache`, `synthesize`."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from synth_cpt.cli.common import materialize_group, report_failures, terminal, wide_console
from synth_cpt.core.config import load_config
from synth_cpt.core.layout import GENERATIONS


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
    fields = {"backend": args.backend} if args.backend else {}
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
    llm = LLM(**{**config.generation_settings().model_dump(), **fields})
    console = terminal()
    about = llm.describe(config.storage_uri(), log=lambda m: console.print(f"[dim]{m}[/dim]"))
    console.print(f"model {about['model']}  fingerprint {about['fingerprint']}  engine: {about['engine']}")
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


def print_generator(args: argparse.Namespace) -> None:
    """Before anything is generated: which model, its fingerprint and which engine the runs will use."""
    from synth_cpt.generation.settings import LLMSettings

    config = load_config(args.config) if args.config else load_config()
    console = terminal()
    settings = LLMSettings(**config.generation_settings().model_dump())
    about = settings.describe(config.storage_uri(), log=lambda m: console.print(f"[dim]{m}[/dim]"))
    console.print(f"model {about['model']}  fingerprint {about['fingerprint']}  engine: {about['engine']}")


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve the configured model with `vllm serve` on 127.0.0.1 until stopped: every Dagster run of this
    machine then sends its requests there and loads no model."""
    from synth_cpt.generation.settings import LLMSettings, ServeError

    config = load_config(args.config) if args.config else load_config()
    console = terminal()
    settings = LLMSettings(**config.generation_settings().model_dump())

    def ready(record) -> None:
        if args.ready_file:
            Path(args.ready_file).write_text(record.url)
        console.print(
            f"serving {record.served_model_name} (revision {record.revision}) at {record.url}, loaded in {record.load_seconds:g} s; "
            f"vLLM's log: {record.log}. Runs of this machine now send their requests here. Ctrl-C stops it."
        )

    try:
        code = settings.serve(config.storage_uri(), port=args.port, timeout_s=args.timeout, log=console.print, on_ready=ready)
    except ServeError as exc:
        console.print(f"synth-cpt serve: {exc}")
        return 2
    console.print(f"synth-cpt serve: the server stopped ({code})")
    return 0 if code in (0, -15, 143) else 1


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


def cmd_synthesize(args: argparse.Namespace) -> int:
    """Materialize the generation assets for every partition (or those asked) in this process: one Dagster run
    (per range of partitions, see `partition_ranges`) whose steps all feed one engine run."""
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    from synth_cpt.defs.synthesis import GROUP
    from synth_cpt.generation.settings import keep_engines

    keep_engines()  # every partition's run in this process uses the one loaded engine
    print_generator(args)
    rows, failures, partitions, root = materialize_group(args, GROUP, "synthesize", one_run=True)
    _print_synthesis(wide_console(), rows, root, partitions)
    return report_failures(failures)


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
        '(entity_graphs: summaries.parquet, entities.parquet); query them with DuckDB (README: "Reading lineage")'
    )
    loads, seconds = engine_loads()
    runs = len({r["run"] for r in rows})
    console.print(f"engine loads in this process: {loads} ({seconds:.1f} s loading) for {len(partitions)} partition(s) in {runs} run(s)")


def register(sub: argparse._SubParsersAction) -> None:
    gen = sub.add_parser("generate", help="run chat requests from a JSONL file through the generation engine and its cache")
    gen.add_argument(
        "input", help='JSONL, one {"messages": [...], "max_tokens": .., "temperature": .., "seed": .., "json_schema": {..}} per line'
    )
    gen.add_argument("--output", help="results as JSONL, in input order (default: stdout)")
    gen.add_argument("--backend", choices=["vllm", "openai"], help="default: the config's generation.backend")
    gen.add_argument("--model", help="'embedded', a local model folder or a model name (default: the config's generation.model)")
    gen.add_argument("--endpoint", action="append", help="OpenAI-compatible base URL (repeat for a fleet)")
    gen.add_argument("--served-model-name", help="model name the servers expose (openai backend)")
    gen.add_argument("--model-revision", help="which weights stand behind the served name (openai backend; part of the fingerprint)")
    gen.add_argument("--speculative", choices=["auto", "on", "off"], help="n-gram speculative decoding (vllm backend; default auto)")
    gen.add_argument("--scope", default="adhoc", help="where in the cache the results are stored and looked up first (default: adhoc)")
    gen.set_defaults(func=cmd_generate)
    srv = sub.add_parser("serve", help="serve the configured model with `vllm serve` on 127.0.0.1: every run of this machine uses it")
    srv.add_argument("--port", type=int, default=8011, help="port on 127.0.0.1 (default 8011)")
    srv.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for the model to load (default 900)")
    srv.add_argument("--ready-file", help="written (with the server's URL) once the model answers: `make ui` waits for it")
    srv.set_defaults(func=cmd_serve)
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
