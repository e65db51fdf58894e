"""Commands over what synthesis feeds: `mix` (training mixes), `evals` (eval_scores) and `npm`."""

from __future__ import annotations

import argparse
import sys

from rich.table import Table

from synth_cpt.cli.common import materialize_group, report_failures, wide_console


def cmd_mix(args: argparse.Namespace) -> int:
    """Materialize the training mixes for every partition (or those asked)."""
    from synth_cpt.defs.mix import GROUP

    rows, failures, partitions, root = materialize_group(args, GROUP, "mix")
    console = wide_console()
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
    return report_failures(failures)


def _origins(markdown: str) -> str:
    """The tokens_by_origin markdown table of a mix as one line."""
    cells = [line.strip("| ").split(" | ") for line in str(markdown).splitlines()[2:]]
    return "; ".join(f"{c[0]} {int(c[1]):,} / {int(c[2]):,}" for c in cells if len(c) == 3)


def cmd_evals(args: argparse.Namespace) -> int:
    """Materialize eval_scores for every partition (or those asked) and print the scores of each set."""
    from synth_cpt.defs.evals import GROUP

    rows, failures, partitions, root = materialize_group(args, GROUP, "evals")
    console = wide_console()
    from synth_cpt.core.layout import EVAL_SCORES
    from synth_cpt.core.storage import open_storage
    from synth_cpt.synthesis.outputs import published_table

    storage = open_storage(root)
    for r in sorted(rows, key=lambda r: r["partition"]):
        scores = published_table(storage, EVAL_SCORES, *r["partition"].split("|"), "scores.parquet")
        table = Table(title=f"eval_scores {r['partition']} ({r['dagster/uri']})")
        cols = [
            "set",
            "rows",
            "tokens",
            "distinct_2",
            "compression_ratio",
            "near_duplicate_rate",
            "copy_overlap_mean",
            "heuristic_score_mean",
        ]
        for col in cols:
            table.add_column(col, justify="left" if col == "set" else "right")
        for row in scores.select(cols).to_dicts():
            table.add_row(
                *(
                    f"{v:.3f}" if isinstance(v, float) else ("-" if v is None else f"{v:,}" if isinstance(v, int) else str(v))
                    for v in row.values()
                )
            )
        console.print(table)
        console.print(f"contaminated texts: {r.get('contaminated_texts', 0)}" + (f"; NPM: {r['npm']}" if r.get("npm") else ""))
    return report_failures(failures)


def cmd_npm(args: argparse.Namespace) -> int:
    """NPM of lm-eval result files on PoETa V2: per task, then All / Native / Translated (each with the tasks it
    misses), then every task that was not counted and why, and every value that contradicts its declared scale."""
    import json

    from synth_cpt.evals.npm import npm_of_files, parse_pairs, parse_scales, read_alias_file

    try:
        aliases = {}
        for path in args.aliases or []:
            aliases.update(read_alias_file(path))
        aliases.update(parse_pairs(args.alias or [], "--alias"))
        report = npm_of_files(args.results, extra_aliases=aliases, scales=parse_scales(args.scale or []))
    except (OSError, ValueError) as exc:
        print(f"synth-cpt npm: {exc}", file=sys.stderr)
        return 2
    summary = report.summary()
    if args.json:
        print(json.dumps({"tasks": [s.__dict__ for s in report.scores], **summary}, indent=2))
        return 0
    console = wide_console(140)
    table = Table(title=f"PoETa V2 NPM of {', '.join(args.results)} (alias table v{report.alias_version})")
    for col in ("task", "as named in the file", "metric", "raw", "written on", "on the table's scale", "NPM", "native"):
        table.add_column(col, justify="right" if col in ("raw", "NPM") else "left")
    for s in sorted(report.scores, key=lambda s: s.task):
        table.add_row(
            s.task, s.source_name, s.metric, f"{s.raw:g}", f"{s.raw_scale} ({s.scale_from})", f"{s.value:g} {s.scaled}".strip(),
            f"{s.npm:.2f}", "yes" if s.native else "",
        )  # fmt: skip
    console.print(table)
    for part in ("all", "native", "translated"):
        p = summary[part]
        value = "n/a" if p["npm"] is None else f"{p['npm']:.2f}"
        console.print(f"NPM {part}: {value} over {p['tasks']} of {p['of']} tasks ({p['missing']} missing)")
    unmatched = [f"{n} (did you mean {report.suggestions[n]}? --alias {n}={report.suggestions[n]})" if n in report.suggestions else n
                 for n in report.unmatched]  # fmt: skip
    for label, items in (("missing from the results", report.missing), ("no usable value", report.nan),
                         ("unmatched names (not in the alias table)", unmatched), ("duplicates", report.duplicates),
                         ("aliases given", [f"{k}={v}" for k, v in report.aliases_given.items()]),
                         ("scales given", [f"{k}={v}" for k, v in report.scales_given.items()])):  # fmt: skip
        if items:
            console.print(f"{label} ({len(items)}): " + ", ".join(items), soft_wrap=True)  # one line: copy a suggested --alias whole
    for line in report.warnings:
        console.print(f"warning: {line}", soft_wrap=True)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    mix = sub.add_parser("mix", help="materialize the training mixes (training_mix_<recipe>) per partition")
    mix.add_argument("--partition", action="append", help="'pt|high' (repeat; default: every partition)")
    mix.add_argument("--asset", action="append", help="e.g. training_mix_wrap_1to1 (repeat; default: every recipe)")
    mix.set_defaults(func=cmd_mix)
    ev = sub.add_parser("evals", help="materialize eval_scores per partition: diversity, copying, fidelity, quality, contamination, NPM")
    ev.add_argument("--partition", action="append", help="'pt|high' (repeat; default: every partition)")
    ev.add_argument("--asset", action="append", help=argparse.SUPPRESS)
    ev.set_defaults(func=cmd_evals)
    npm_cmd = sub.add_parser("npm", help="NPM on PoETa V2 of lm-evaluation-harness result files (per task, All, Native, Translated)")
    npm_cmd.add_argument("results", nargs="+", help="lm-eval results JSON (several files of one run are merged)")
    npm_cmd.add_argument("--json", action="store_true", help="print the scores and what was not counted as JSON")
    npm_cmd.add_argument("--scale", action="append", metavar="[TASK=]0-1|0-100",
                         help="the scale the file's values are written on, for one task or (without TASK=) every task; overrides the "
                         "alias table (repeat); a file holding a 0-1 metric above 1 is in percent: its 0-1 values are left out until given"
                         )  # fmt: skip
    npm_cmd.add_argument("--alias", action="append", metavar="OLD=NEW", help="count result name OLD as table task NEW (repeat)")
    npm_cmd.add_argument("--aliases", action="append", metavar="FILE", help="a YAML mapping of result name to table task (repeat)")
    npm_cmd.set_defaults(func=cmd_npm)
