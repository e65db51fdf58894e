"""Crash resume with the real engine (see test_crash_resume.py for the 18 kills with the test double): the
embedded vLLM engine in a CLI process of its own, SIGKILLed at two seeded results, then rerun. A module of its
own so that `make test`'s workers (`--dist loadscope`) can run it beside the other crash test."""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import pytest
import yaml

from synth_cpt.core.storage import LocalStorage
from synth_cpt.generation.cache import GenerationCache

from .conftest import REPO, short_prompt_library
from .test_crash_resume import PARTITION, SEED, _duplicates, _published, _resent_per_kill, _sent, _ticks, _worker


@pytest.mark.vllm
def test_real_engine_killed_at_two_points_then_rerun_gives_the_uninterrupted_rows(vllm_session, tmp_path, monkeypatch):
    """The embedded vLLM engine in its own process, killed twice at seeded results, then rerun. The
    uninterrupted reference is the session's engine on the same machine. Texts are not compared: greedy
    and seeded sampling may differ between processes (batch shapes); ids, rows, sets and counts are what
    the machinery guarantees."""
    from dagster import AssetKey, DagsterInstance, materialize

    from synth_cpt.defs.resources import LLM, PipelineResource

    from .test_synthesis_dagster import ingest_small_corpus

    monkeypatch.setenv("SYNTH_CPT_PROMPTS", str(short_prompt_library(tmp_path / "prompts")))  # the workers' too
    defs, home = ingest_small_corpus(tmp_path, monkeypatch, max_documents=2)
    crash = {"base": tmp_path / "crash", "home": tmp_path / "crash" / "home", "sent": tmp_path / "crash" / "sent.log"}
    shutil.copytree(home, crash["home"])  # the same ingested inputs, before any generation
    config = yaml.safe_load(Path(os.environ["SYNTH_CPT_CONFIG"]).read_text())
    # a small KV cache (not part of the fingerprint): the worker's engine shares the machine with the others
    config.update(storage_root=str(crash["home"]), generation={"flush_every": 2, "flush_seconds": 3600, "gpu_memory_utilization": 0.1})
    crash["config"] = tmp_path / "crash" / "pipeline.yaml"
    crash["config"].write_text(yaml.safe_dump(config))
    (crash["base"] / "dagster_home").mkdir()
    shutil.copy(REPO / "dagster.yaml", crash["base"] / "dagster_home" / "dagster.yaml")

    synthesis = next(a for a in defs.assets if getattr(a, "node_def", None) is not None and a.node_def.name == "synthesis")
    with DagsterInstance.ephemeral() as instance:
        assert materialize(
            [synthesis], instance=instance, partition_key=PARTITION, selection=[AssetKey("rewrites_medium")],
            resources={"pipeline": PipelineResource(), "llm": LLM(flush_every=2, flush_seconds=3600)},
        ).success  # fmt: skip
    requests = GenerationCache(LocalStorage(home)).finished().height
    assert requests >= 2
    vllm_session[0].close()  # the workers load their own engine: free the session's memory meanwhile

    rng = random.Random(SEED)
    # the session's converted model (no conversion here) and the same prompts as the uninterrupted run
    env = {k: os.environ[k] for k in ("SYNTH_CPT_MODELS", "SYNTH_CPT_PROMPTS")}
    extra = ["--partition", PARTITION, "--asset", "rewrites_medium"]
    killed, points, orphans = [], [], []
    for _ in range(2):
        points.append(rng.randint(1, requests))
        before = {pid for pid, _ in _sent(crash)}
        proc = _worker(crash, "synthesize", points[-1], "result", extra, engine="real", env=env)
        assert proc.returncode == -9 and f"KILLING {points[-1]}" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
        killed += sorted({pid for pid, _ in _sent(crash)} - before)
        orphans.append(proc.orphans)
    _ticks(_worker(crash, "synthesize", 0, "result", extra, engine="real", env=env))

    sent = _sent(crash)
    resent = _resent_per_kill(sent, killed)
    print(f"\nreal engine: {requests} requests; killed at results {points}; resent per kill {resent}, max vs flush_every 2")
    print(f"engine processes still running 60 s after each kill: {orphans}")
    want, got = _published(home), _published(crash["home"])

    def documents(seen: dict) -> list[str]:
        """(doc_id, request_ids) of every row and rejection: whether a text passes depends on what the model wrote."""
        tables = [seen[f"rewrites_medium/pt/high/{name}"] for name in ("rows.parquet", "rejects.parquet")]
        return sorted(str(r) for t in tables if t.height for r in t.select("doc_id", "request_ids").rows())

    print(f"documents: uninterrupted {documents(want)}; after the kills {documents(got)}")
    assert len(documents(want)) == 2 and documents(got) == documents(want), "each document once, with the same request ids"
    assert _duplicates(got) == {}
    cache = GenerationCache(LocalStorage(crash["home"])).load()
    assert cache["request_id"].n_unique() == cache.height, "no request cached twice"
    assert set(cache["request_id"]) == set(GenerationCache(LocalStorage(home)).load()["request_id"])
    assert len(killed) == 2 and max(resent) <= 2, f"resent per kill {resent}"
    assert orphans == [0, 0], "the engine's watchdog ended the engine processes of each killed worker"
