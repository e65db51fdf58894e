"""How full the engine stays over a whole synthesis: every routed rewrite style and EntiGraph, on all four
partitions, through Dagster with the real embedded engine, against the same requests replayed as one raw
`LLM.chat` batch (no chains, no Python around them: what the engine alone does with that work).

Three sides, one loaded engine, each from an empty generation cache of its own and an empty prefix cache:

- **ours**: one Dagster run of every generation asset over the four partitions (a single-run backfill, what
  `synth-cpt synthesize` runs): every asset of every partition in its own thread, all their requests in one
  engine run, chains joining as their links return;
- **old order**: the previous schedule, partition by partition and asset by asset (one materialization of
  one asset of one partition at a time), so the engine drains at the end of each and waits at each link;
- **replay**: every request ours sent (read back from its cache with its seed) in one `LLM.chat` call.

The 135M model writes until `max_tokens` on most rewrites, so every prompt file's `max_tokens` is capped
(`--max-tokens`, default 96) in a copy of the library: the shape of the work (chains, retries, EntiGraph's
three steps) is the real one, each request is shorter. Last line:
`RESULT graph ratio=<replay_s/ours_s> old_ratio=<replay_s/old_s> requests=<n>`; target ratio >= 0.7.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

import yaml


def capped_library(dest: Path, max_tokens: int) -> Path:
    from synth_cpt.synthesis.prompts import prompts_dir

    shutil.copytree(prompts_dir(), dest)
    for path in dest.rglob("*.yaml"):
        text = path.read_text()
        path.write_text(re.sub(r"^(\s+max_tokens:) (\d+)$", lambda m: f"{m.group(1)} {min(int(m.group(2)), max_tokens)}", text, flags=re.M))
    return dest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--documents", type=int, default=16, help="documents per partition (default 16)")
    parser.add_argument("--max-tokens", type=int, default=96, help="cap on every prompt's max_tokens (default 96)")
    parser.add_argument("--entities", type=int, default=4, help="synthesis.entigraph.max_entities (default 4: 6 pairs)")
    parser.add_argument("--skip-old", action="store_true", help="do not run the old order (quicker)")
    parser.add_argument("--kv", type=float, default=0.2, help="generation.gpu_memory_utilization: host memory share of the KV cache")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-graph-"))
    os.environ.update(
        DAGSTER_HOME=str(work / "dagster_home"), SYNTH_CPT_HOME=str(work / "home"), VLLM_LOGGING_LEVEL="WARNING",
        SYNTH_CPT_MODELS=os.environ.get("SYNTH_CPT_MODELS", str(Path.home() / ".cache" / "synth-cpt" / "models")),
        SYNTH_CPT_PROMPTS=str(capped_library(work / "prompts", args.max_tokens)),
    )  # fmt: skip
    (work / "dagster_home").mkdir()
    config = work / "pipeline.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "synthesis": {
                    "max_documents": args.documents, "min_pass_rate": 0.0,
                    "entigraph": {"max_entities": args.entities, "triples_per_document": 2},
                },
                "generation": {"gpu_memory_utilization": args.kv},
            }
        )
    )  # fmt: skip
    os.environ["SYNTH_CPT_CONFIG"] = str(config)

    from dagster import DagsterInstance, materialize

    from synth_cpt.cli import main as cli
    from synth_cpt.core.config import load_config
    from synth_cpt.core.storage import LocalStorage
    from synth_cpt.defs.definitions import build_definitions
    from synth_cpt.defs.resources import LLM, PipelineResource
    from synth_cpt.generation.backends import Prepared
    from synth_cpt.generation.cache import GenerationCache
    from synth_cpt.generation.requests import ChatRequest, Sampling
    from synth_cpt.generation.settings import keep_engines

    assert cli(["ingest"]) == 0, "ingesting the sample corpus failed"
    keep_engines()  # one engine for the three sides; loading is outside every timing
    cfg = load_config()
    partitions = [f"{lang}|{q}" for lang in cfg.languages for q in cfg.quality.buckets]
    settings = cfg.generation_settings().model_dump()
    llm = LLM(**settings)
    model_path, _ = llm.resolve_model(str(work / "home"))
    backend = llm.shared_backend(model_path)
    backend.prepare([])

    defs = build_definitions()
    synthesis = next(a for a in defs.assets if getattr(a, "node_def", None) is not None and a.node_def.name == "synthesis")
    assets = list(synthesis.keys)
    order = sorted(
        assets, key=lambda k: (k.to_user_string().startswith("ent"), k.to_user_string() == "entigraph_corpus", k.to_user_string())
    )

    def run(cache: str, selection, partition: str | None = None, tags: dict | None = None):
        with DagsterInstance.get() as instance:
            result = materialize(
                [synthesis], instance=instance, partition_key=partition, selection=selection, tags=tags,
                resources={"pipeline": PipelineResource(), "llm": LLM(**{**settings, "cache_root": str(work / cache)})},
            )  # fmt: skip
        return result

    def sent(result) -> tuple[int, int]:
        metas = [
            {k: v.value for k, v in e.event_specific_data.materialization.metadata.items()}
            for e in result.get_asset_materialization_events()
        ]
        return sum(m.get("sent", 0) for m in metas), sum(m.get("completion_tokens", 0) for m in metas)

    backend.llm.reset_prefix_cache()
    started = time.monotonic()
    ours = run(
        "cache-ours",
        assets,
        tags={"dagster/asset_partition_range_start": partitions[0], "dagster/asset_partition_range_end": partitions[-1]},
    )
    ours_s = time.monotonic() - started
    ours_sent, ours_tokens = sent(ours)
    print(
        f"ours: one run, {len(assets)} assets x {len(partitions)} partitions: {ours_s:.1f} s, {ours_sent:,} requests, {ours_tokens:,} output tokens"
    )

    old_s = None
    if not args.skip_old:
        backend.llm.reset_prefix_cache()
        started = time.monotonic()
        old_sent = 0
        for partition in partitions:
            for key in order:
                old_sent += sent(run("cache-old", [key], partition=partition))[0]
        old_s = time.monotonic() - started
        print(f"old order: {len(assets) * len(partitions)} materializations one after the other: {old_s:.1f} s, {old_sent:,} requests")

    rows = GenerationCache(LocalStorage(work / "cache-ours")).load(["request_id", "messages", "sampling", "json_schema", "seed", "error"])
    rows = rows.filter(rows["error"].is_null())
    prepared = [
        Prepared(
            ChatRequest.chat(json.loads(r["messages"]), Sampling.from_dict(json.loads(r["sampling"])), json_schema=r["json_schema"]),
            r["request_id"],
            r["seed"],
        )  # fmt: skip
        for r in rows.to_dicts()
    ]
    backend.llm.reset_prefix_cache()
    started = time.monotonic()
    outputs = backend.llm.chat(
        [p.request.message_dicts() for p in prepared], sampling_params=[backend.sampling_params(p) for p in prepared], use_tqdm=False
    )
    replay_s = time.monotonic() - started
    replay_tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    print(f"replay: {len(prepared):,} requests in one LLM.chat: {replay_s:.1f} s, {replay_tokens:,} output tokens")
    old = f" old_ratio={replay_s / old_s:.2f}" if old_s else ""
    print(f"RESULT graph ratio={replay_s / ours_s:.2f}{old} requests={len(prepared)} ours_s={ours_s:.1f} replay_s={replay_s:.1f}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
