"""What the asset layer costs: `rewrites_medium` for one partition materialized through Dagster, against
the engine alone on the very same requests, in one run with one loaded engine.

Both sides start from an empty generation cache (each its own) and an empty prefix cache, so both
generate everything from scratch. The
asset side adds what a user gets on top of the engine: reading the subset, chunking by real tokens,
post-processing and fidelity rules, the GX checks, publishing and Dagster's own bookkeeping.
Last line: `RESULT synthesis ratio=<engine_s/asset_s> tok_s=<asset output tokens/s>`; target >= 0.9.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import yaml


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--documents", type=int, default=16, help="documents of the partition rewritten (default 16)")
    parser.add_argument("--partition", default="pt|high")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-synthesis-"))
    os.environ.update(
        DAGSTER_HOME=str(work / "dagster_home"), SYNTH_CPT_HOME=str(work / "home"), VLLM_LOGGING_LEVEL="WARNING",
        SYNTH_CPT_MODELS=os.environ.get("SYNTH_CPT_MODELS", str(Path.home() / ".cache" / "synth-cpt" / "models")),
    )  # fmt: skip
    (work / "dagster_home").mkdir()
    config = work / "pipeline.yaml"
    config.write_text(yaml.safe_dump({"synthesis": {"max_documents": args.documents, "min_pass_rate": 0.0}}))
    os.environ["SYNTH_CPT_CONFIG"] = str(config)

    from dagster import AssetKey, DagsterInstance, materialize

    from synth_cpt.cli import main as cli
    from synth_cpt.core.config import load_config
    from synth_cpt.core.storage import LocalStorage
    from synth_cpt.corpus.tokenizer import TokenCounter
    from synth_cpt.defs.definitions import build_definitions
    from synth_cpt.defs.resources import LLM, PipelineResource
    from synth_cpt.defs.synthesis import chunking_counter
    from synth_cpt.generation.cache import GenerationCache
    from synth_cpt.generation.engine import GenerationEngine
    from synth_cpt.synthesis.prompts import load_prompt
    from synth_cpt.synthesis.rewrite import document_chunks
    from synth_cpt.synthesis.steps import partition_inputs

    assert cli(["ingest"]) == 0, "ingesting the sample corpus failed"
    language, quality = args.partition.split("|")
    cfg = load_config()
    storage = LocalStorage(work / "home")
    counter = TokenCounter.from_storage(storage)
    llm = LLM()
    chunker, _ = chunking_counter(llm, str(work / "home"), counter, print)  # the asset's: the generator's tokenizer
    inputs = partition_inputs(storage, cfg, language, quality, counter.count, chunker.count)
    prompt = load_prompt("rewrite", "medium")
    requests = [  # what rewrites_medium asks: every chunk of every document (the style is not autoregressive)
        prompt.request(d.language, seed=cfg.seeds.synthesis, text=c.text, context="", title=d.title or "")
        for d in inputs.documents
        for c in document_chunks(prompt, d, chunker.count)
    ]

    model_path, identity = llm.resolve_model(str(work / "home"))
    backend = llm.shared_backend(model_path)
    backend.prepare([])  # load once, outside both timings

    alone = GenerationEngine(
        backend, GenerationCache(LocalStorage(work / "cache-engine")), model=identity, model_fingerprint=llm.model_fingerprint(identity)
    )
    backend.llm.reset_prefix_cache()  # neither side may reuse the other's prompt prefixes
    started = time.monotonic()
    report = alone.run(requests, scope="bench")
    engine_s = time.monotonic() - started
    backend.llm.reset_prefix_cache()

    defs = build_definitions()
    synthesis = next(a for a in defs.assets if getattr(a, "node_def", None) is not None and a.node_def.name == "synthesis")
    with DagsterInstance.get() as instance:
        started = time.monotonic()
        result = materialize(
            [synthesis], instance=instance, partition_key=args.partition, selection=[AssetKey("rewrites_medium")],
            resources={"pipeline": PipelineResource(), "llm": LLM(cache_root=str(work / "cache-asset"))},
        )  # fmt: skip
        asset_s = time.monotonic() - started
    meta = {
        k: v.value for e in result.get_asset_materialization_events() for k, v in e.event_specific_data.materialization.metadata.items()
    }
    assert meta["sent"] == report.sent, (meta["sent"], report.sent)
    print(
        f"{len(inputs.documents)} documents, {len(requests)} requests; engine alone {engine_s:.1f} s "
        f"({report.completion_tokens:,} output tokens); asset {asset_s:.1f} s ({meta['completion_tokens']:,} output tokens, "
        f"{meta['dagster/row_count']} rows, pass rate {meta['pass_rate']})"
    )
    print(f"RESULT synthesis ratio={engine_s / asset_s:.2f} tok_s={meta['completion_tokens'] / asset_s:.1f}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
