"""Lineage answers and SQL over the DuckDB catalog of every output."""

from __future__ import annotations

import argparse
import sys

from rich.console import Console
from rich.table import Table

from synth_cpt.cli.common import wide_console
from synth_cpt.core.config import load_config


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
            if args.what == "shard" else "SELECT prompt_sha FROM synthetic WHERE prompt_sha IS NOT NULL GROUP BY 1 ORDER BY count(*) DESC, 1 LIMIT 1"
            if args.what == "prompt" else "SELECT drop_id FROM synthetic GROUP BY 1 ORDER BY count(*) DESC, 1 LIMIT 1"
        )[1]  # fmt: skip
        if not found:
            print(f"synth-cpt lineage {args.what}: nothing published to take an example from", file=sys.stderr)
            return 2
        key = found[0][0]
        print(f"synth-cpt lineage {args.what} {key}")
    try:
        if args.what == "prompt":
            answer = queries.prompt(catalog, key)
        elif args.what in ("shard", "doc"):
            answer = {"shard": queries.shard, "doc": queries.doc}[args.what](catalog, key, prompts=args.prompt)
        else:
            answer = queries.drop(catalog, key)
    except LookupError as exc:
        print(f"synth-cpt lineage: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(answer, indent=2, default=str))
    else:
        _print_value(wide_console(), "", answer)
    return 0


def cmd_sql(args: argparse.Namespace) -> int:
    """One SQL query over the catalog's views (drops, quarantine, documents, subsets, generations,
    synthetic, rejects, shards, manifests; every retained version: mix_versions, all_shards, all_synthetic,
    pinned_subsets)."""
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
    console = wide_console()
    console.print(table)
    if len(rows) > args.limit:
        console.print(f"({len(rows):,} rows, {args.limit:,} shown; --limit N)")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    lin = sub.add_parser(
        "lineage",
        help="lineage answers: a shard's sources (any retained mix version), a document's descendants, what a drop made, a prompt's text",
    )
    lin.add_argument("what", choices=["shard", "doc", "drop", "prompt"])
    lin.add_argument(
        "key", nargs="?",
        help="shard: a shard file's path (of any retained version); doc: a doc_id (or unique prefix); drop: a drop_id; prompt: a prompt_sha (or unique prefix)",
    )  # fmt: skip
    lin.add_argument("--prompt", action="store_true", help="shard, doc: also print the exact text of every prompt file behind it")
    lin.add_argument("--example", action="store_true", help="answer for an example taken from what is published")
    lin.add_argument("--json", action="store_true", help="the answer as JSON")
    lin.set_defaults(func=cmd_lineage)
    sql = sub.add_parser("sql", help="one SQL query over the lineage catalog (DuckDB views over every output)")
    sql.add_argument("query", help='e.g. "SELECT origin, sum(n_tokens) FROM shards GROUP BY 1"')
    sql.add_argument("--limit", type=int, default=50, help="rows shown (default 50)")
    sql.set_defaults(func=cmd_sql)
