"""`synth-cpt prompts`: the prompt library, and exactly what is sent for a real document."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console
from rich.table import Table

from synth_cpt.cli.common import say, terminal
from synth_cpt.core.config import load_config


def _find_document(storage, config, doc_id: str):
    """A document of the quality subsets and its bucket, by doc_id or a unique prefix of it."""
    import polars as pl

    from synth_cpt.core.layout import QUALITY_SUBSETS, partition_file
    from synth_cpt.synthesis.rows import SourceDocument
    from synth_cpt.synthesis.steps import read_sources

    found = []
    for lang in config.languages:
        for q in config.quality.buckets:
            key = partition_file(QUALITY_SUBSETS, lang, q)
            if storage.exists(key):
                frame = read_sources(storage, key).filter(pl.col("doc_id").str.starts_with(doc_id))
                found += [(d, q) for d in SourceDocument.from_frame(frame)]
    if len(found) != 1:
        raise SystemExit(f"synth-cpt prompts render: {len(found)} documents of the quality subsets match --doc {doc_id!r}")
    return found[0]


def _check(config) -> int:
    """`prompts check`: the largest request of every routed prompt against the engine's context, as a table;
    exit 2 naming the prompts that cannot fit."""
    from synth_cpt.synthesis.fit import CHAT_TEMPLATE_TOKENS, engine_context, request_sizes, template_counter
    from synth_cpt.synthesis.prompts import judge_for, load_kind, load_prompt
    from synth_cpt.synthesis.routing import check_library, check_routing, routed

    styles = load_kind("rewrite")
    check_routing(config.synthesis, styles)
    entigraph = list(load_kind("entigraph").values())
    judge = load_prompt("judge", "fidelity") if config.synthesis.judge else None
    count, counted_by = template_counter(config.generation_settings(), config.storage_uri())  # as the Definitions load counts
    context_size, source = engine_context(config.generation_settings(), config.storage_uri())
    running = [s for s in styles.values() if routed(config.synthesis, s)]
    judges = {s.name: j for s in running if (j := judge_for(s, judge)) is not None}
    table = Table(title=f"largest request per routed prompt (templates counted by {counted_by}); engine context: {context_size} ({source})")
    for col in ("prompt", "template", "chat template", "input", "context", "output", "total", "fits"):
        table.add_column(col, overflow="fold")
    for size in request_sizes(running, entigraph, judges, config.languages, count):
        name = size.prompt.id + (f" (judging {size.judged.name})" if size.judged else "")
        fits = "-" if context_size is None else "yes" if size.total <= context_size else "NO"
        table.add_row(
            name, str(size.template), str(CHAT_TEMPLATE_TOKENS), str(size.input), str(size.context), str(size.output), str(size.total), fits
        )
    Console().print(table)
    for note in check_library(config, [*styles.values(), *entigraph, *([judge] if judge else [])], count):
        say(note)
    return 0


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
        if args.action == "check":
            return _check(load_config(args.config) if args.config else load_config())
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
        from synth_cpt.defs.synthesis import chunking_counter
        from synth_cpt.synthesis.entigraph import Budget
        from synth_cpt.synthesis.preview import preview

        config = load_config(args.config) if args.config else load_config()
        storage = open_storage(config.storage_uri())
        doc, quality = _find_document(storage, config, args.doc)
        e = config.synthesis.entigraph
        needs_cache = kind == "rewrite" and prompt.spec.chunking.autoregressive
        llm = LLM.from_config(config)
        console = terminal()
        # the assets' own choice of counter: a chunk shown is a chunk sent
        prompt_counter, _ = chunking_counter(
            llm, config.storage_uri(), TokenCounter.from_storage(storage), log=lambda m: console.print(m, markup=False, highlight=False)
        )
        items = preview(
            prompt, doc, quality, storage=storage, prompt_count=prompt_counter.count, seed=config.seeds.synthesis,
            budget=Budget(e.triples_per_document, e.tokens_per_document),
            relation_prompts={n: load_prompt("entigraph", n) for n in ("pair", "triple")},
            engine=llm.engine(storage, config.storage_uri()) if needs_cache else None,
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
        say(str(exc))
        return 2


def register(sub: argparse._SubParsersAction) -> None:
    prm = sub.add_parser(
        "prompts",
        help="the prompt library: list, show a file, render what is sent for a real document, or check that every request fits the engine",
    )
    prm.add_argument("action", choices=["list", "show", "render", "check"])
    prm.add_argument("name", nargs="?", help="prompt name, e.g. medium")
    prm.add_argument("--kind", choices=["rewrite", "entigraph", "judge"], help="default: the first kind that has the name")
    prm.add_argument("--doc", help="render: doc_id (or a unique prefix) of a quality_subsets document")
    prm.set_defaults(func=cmd_prompts)
