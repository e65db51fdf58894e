"""Flaky servers: the generation assets against a seeded fault-injecting server, and two real `vllm serve`
processes with one killed mid-run. Both servers are started here on 127.0.0.1 and stopped after."""

from __future__ import annotations

import math
import os
import random
import signal
import subprocess
import threading
import time
from pathlib import Path

import httpx
import polars as pl
import pytest
import yaml
from dagster import AssetKey, DagsterInstance, materialize

from synth_cpt.core.storage import LocalStorage
from synth_cpt.defs.resources import LLM, PipelineResource
from synth_cpt.generation.backends import Feed, OpenAIBackend, Prepared
from synth_cpt.generation.cache import GenerationCache
from synth_cpt.generation.requests import ChatRequest, Generation, Sampling

from .conftest import EN_TEXT, write_jsonl
from .fault_server import KINDS, FaultServer
from .test_synthesis_dagster import ingest_to_quality_subsets

PARTITION = "pt|high"
ASSET = "rewrites_medium"
DOCUMENTS = 14
SEED = 20261205
CLIENT = {"timeout_s": 1.0, "max_attempts": 3, "backoff_s": 0.1, "backoff_max_s": 0.4, "retry_after_max_s": 1.5, "concurrency": 8}
SCHEDULING_SLACK_S = 0.25  # the event loop's lateness in waking a timeout or a sleep, summed over a request's attempts

SUBJECTS = ["A escola", "O professor", "A biblioteca", "O servidor", "A prefeitura", "O laboratório", "A comunidade", "O estudante",
            "A rede municipal", "O técnico", "A diretora", "O grêmio"]  # fmt: skip
VERBS = ["instalou", "configurou", "atualizou", "organizou", "documentou", "avaliou", "ampliou", "revisou", "planejou", "testou"]
OBJECTS = ["os computadores da sala", "a rede sem fio", "o sistema de cópias de segurança", "as contas dos alunos",
           "o catálogo de livros", "a impressora do corredor", "o servidor de arquivos", "os cursos de férias",
           "o calendário escolar", "a página de ajuda", "os projetores das salas", "o quadro de avisos"]  # fmt: skip
TAILS = ["durante a semana de {m}", "com a ajuda de {n} voluntários", "antes das aulas de {m}", "para {n} turmas do bairro",
         "em {n} dias de trabalho", "depois da reunião de {m}", "com um orçamento de {n} mil reais"]  # fmt: skip
MONTHS = ["janeiro", "fevereiro", "março", "abril", "maio", "junho", "julho", "agosto", "setembro", "outubro", "novembro", "dezembro"]


def portuguese_document(i: int) -> str:
    """A short Portuguese document of its own (no two are near-duplicates): one chunk, one request per rewrite."""
    rng = random.Random(i)
    sentences = []
    for _ in range(7):
        tail = rng.choice(TAILS).format(m=rng.choice(MONTHS), n=rng.randint(2, 90))
        sentences.append(f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} {tail}.")
    return f"Relatório {i} da escola número {100 + i}. " + " ".join(sentences)


def ingested(tmp_path: Path, monkeypatch) -> tuple[object, Path]:
    """quality_subsets of pt|high holding DOCUMENTS short documents, through the real ingest jobs."""
    docs = [{"text": portuguese_document(i), "edu": 3.5} for i in range(DOCUMENTS)]
    write_jsonl(tmp_path / "drops" / "2026-11-01.jsonl", docs + [{"text": EN_TEXT, "stem": 1.0}])
    cfg = tmp_path / "pipeline.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "storage_root": str(tmp_path / "home"),
                "drops": {"location": str(tmp_path / "drops"), "settle_seconds": 0},
                "tokenizer": {"vocab_size": 600},
                "subsets": {"default_budget_tokens": 100000},
                "synthesis": {"max_documents": DOCUMENTS, "min_pass_rate": 0.0},
            }
        )
    )
    monkeypatch.setenv("SYNTH_CPT_CONFIG", str(cfg))
    monkeypatch.delenv("SYNTH_CPT_HOME", raising=False)
    monkeypatch.delenv("SYNTH_CPT_DROPS", raising=False)
    monkeypatch.delenv("SYNTH_CPT_ENDPOINTS", raising=False)
    from synth_cpt.defs.definitions import build_definitions

    defs = build_definitions()
    ingest_to_quality_subsets(defs)
    return defs, tmp_path / "home"


def synthesize(defs, instance, llm: LLM) -> tuple[dict, float]:
    """One materialization of the rewrite asset for the partition, as the UI launches it: (its metadata, wall seconds)."""
    synthesis = next(a for a in defs.assets if getattr(a, "node_def", None) is not None and a.node_def.name == "synthesis")
    started = time.monotonic()
    result = materialize(
        [synthesis], instance=instance, partition_key=PARTITION, selection=[AssetKey(ASSET)],
        resources={"pipeline": PipelineResource(), "llm": llm},
    )  # fmt: skip
    wall = time.monotonic() - started
    assert result.success
    (event,) = result.get_asset_materialization_events()
    return {k: v.value for k, v in event.event_specific_data.materialization.metadata.items()}, wall


def test_generation_assets_against_a_flaky_server_account_for_every_request_within_the_bound(tmp_path, monkeypatch):
    """Every request is answered or listed with its reason in the asset's metadata; no request outlives
    `request_deadline_s()` and the run outlives ceil(n / concurrency) of them by bookkeeping only; a
    Retry-After within the ceiling is waited out, a day's is not; the rerun sends exactly the failed ones."""
    defs, home = ingested(tmp_path, monkeypatch)
    server = FaultServer(seed=SEED, timeout_s=CLIENT["timeout_s"], restart_down_s=0.15)
    try:
        llm = LLM(backend="openai", endpoints=[server.url], served_model_name="flaky-model", **CLIENT)
        client = OpenAIBackend([server.url], "flaky-model", **{k: v for k, v in CLIENT.items()})
        request_bound = client.request_deadline_s()
        with DagsterInstance.ephemeral() as instance:
            first, wall = synthesize(defs, instance, llm)
            failed: dict[str, str] = first["failed_requests"]
            run_bound = math.ceil(first["sent"] / CLIENT["concurrency"]) * request_bound
            rows = GenerationCache(LocalStorage(home)).load(["request_id", "error", "attempts", "latency_s"])
            answered = set(rows.filter(pl.col("error").is_null())["request_id"].to_list())
            ended = rows.filter(pl.col("error").is_not_null())
            figures = (
                f"faults injected by kind {server.figures()['faults_by_kind']} over {len(server.hits)} attempts, "
                f"{server.restarts} restarts; {first['sent']} requests: {len(answered)} answered, {len(failed)} ended with a reason "
                f"{first['failed_by_reason']}; slowest request {rows['latency_s'].max():.2f} s vs bound {request_bound:g} s; "
                f"generation {first['generation_seconds']} s vs bound {run_bound:g} s; materialization wall {wall:.1f} s"
            )
            print(figures)
            assert set(server.faults) == set(KINDS), figures  # the seeded deck: every kind injected at least once
            assert server.restarts >= 1, figures
            # 100%: every request sent is answered or listed with its reason, never both, never neither
            assert first["requests"] == first["sent"] == DOCUMENTS and first["cache_hits"] == 0, figures
            assert first["succeeded"] + first["failed"] == first["sent"], figures
            assert len(failed) == first["failed"] >= 1 and all(failed.values()), figures
            assert answered.isdisjoint(failed) and len(answered | set(failed)) == DOCUMENTS, figures
            assert set(server.hits) <= answered | set(failed), figures  # (a request refused while the server restarted never hit it)
            assert set(ended["request_id"].to_list()) == set(failed), figures
            assert len(answered) == first["succeeded"], figures
            # the bound: each request, and the run
            assert rows["latency_s"].max() <= request_bound + SCHEDULING_SLACK_S, figures
            assert first["generation_seconds"] <= run_bound + SCHEDULING_SLACK_S, figures
            # a day's Retry-After ends its request at once with that reason; a short one is waited out
            day = [rid for rid, why in failed.items() if "retry after 86400 s" in why]
            assert day and all("more than retry_after_max_s (1.5 s)" in failed[rid] for rid in day), figures
            assert all(kind != "http_429_day" for seen in server.arrivals.values() for _, kind in seen[:-1]), "nothing after a day's ask"
            honoured = [
                round(seen[i + 1][0] - t, 2)
                for seen in server.arrivals.values()
                for i, (t, kind) in enumerate(seen[:-1])
                if kind == "http_429"
            ]
            print(f"Retry-After: 1 honoured: the next attempts came {honoured} s later")
            assert min(honoured, default=1.0) >= 1.0, honoured
            # the deck deals its 429 (Retry-After: 1) to a first attempt: that request waited at least 1 s, whether its
            # next attempt reached the server or was refused while it restarted
            asked = [rid for rid, seen in server.arrivals.items() if seen[0][1] == "http_429"]
            waited = rows.filter(pl.col("request_id").is_in(asked))["latency_s"].to_list()
            assert len(asked) == len(waited) == 1 and waited[0] >= 1.0, (asked, waited, figures)
            assert any(r["error"] is None and r["attempts"] > 1 for r in rows.iter_rows(named=True)), "answered after a fault"

            # the rerun, against a healthy server: exactly the failed ones hit it, once each
            server.faulty = False
            server.hits.clear()
            second, _ = synthesize(defs, instance, llm)
            resent = sorted(server.hits)
            print(f"rerun: {len(resent)} requests resent, failed set {len(failed)}; {second['succeeded']} answered now")
            assert resent == sorted(failed), (resent, sorted(failed))
            assert (second["sent"], second["failed"], second["cache_hits"]) == (len(failed), 0, DOCUMENTS - len(failed))
            assert second["failed_requests"] == {}
    finally:
        server.stop()


def test_retry_after_beyond_the_ceiling_ends_the_request_at_once(monkeypatch):
    """A server asking for a day is not waited for: the request ends after one attempt, with the reason."""
    server = FaultServer(seed=1)
    server.deck = ["http_429_day"]
    server.fault_rate = 0.0
    try:
        backend = OpenAIBackend([server.url], "m", timeout_s=1.0, max_attempts=3, retry_after_max_s=60.0)
        got: list[Generation] = []
        started = time.monotonic()
        request = ChatRequest.chat([{"role": "user", "content": "Texto:\nolá mundo"}], Sampling(max_tokens=4))
        backend.generate(Feed([Prepared(request, "rid-day", 1)]), lambda p, g: got.append(g))
        took = time.monotonic() - started
        print(f"a 86400 s Retry-After ended its request in {took:.2f} s: {got[0].error}")
        assert got[0].error == "HTTP 429 rate limited: the server asked to retry after 86400 s, more than retry_after_max_s (60 s)"
        assert got[0].attempts == 1 and server.hits == ["rid-day"]
    finally:
        server.stop()


# --- two real `vllm serve` processes, one killed mid-run ---------------------------------------------


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


@pytest.mark.vllm
def test_two_vllm_servers_one_killed_mid_run_every_request_answered_by_the_other(tmp_path, embedded_model):
    from synth_cpt.generation.serve import serve_command
    from synth_cpt.generation.settings import LLMSettings

    # the KV cache is this share of the machine's memory minus the worker's own RSS (about 1.25 GiB): 0.05 of 24 GiB is too little
    settings = LLMSettings(gpu_memory_utilization=0.1, max_model_len=512)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CONFIGURE_LOGGING": "1"}
    procs: dict[str, subprocess.Popen] = {}
    logs = {}
    try:
        for name in ("a", "b"):  # both load at once
            port = _free_port()
            url = f"http://127.0.0.1:{port}/v1"
            logs[url] = tmp_path / f"serve-{name}.log"
            with open(logs[url], "wb") as out:
                procs[url] = subprocess.Popen(
                    serve_command(embedded_model, "embedded", settings.engine_args(), port), stdout=out, stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL, env=env, start_new_session=True,
                )  # fmt: skip
        started, deadline = time.monotonic(), time.monotonic() + 150
        waiting = set(procs)
        while waiting:
            for url in list(waiting):
                assert procs[url].poll() is None, logs[url].read_text()[-3000:]
                try:
                    if httpx.get(url.removesuffix("/v1") + "/health", timeout=2).status_code == 200:
                        waiting.discard(url)
                except httpx.HTTPError:
                    pass
            assert time.monotonic() < deadline, "vllm serve did not become healthy in 150 s"
            time.sleep(0.5)
        load_s = time.monotonic() - started

        backend = OpenAIBackend(list(procs), "embedded", concurrency=4, timeout_s=60.0, max_attempts=3, backoff_s=0.1, backoff_max_s=0.5)
        n = 12
        batch = [
            Prepared(
                ChatRequest.chat([{"role": "user", "content": f"Say the number {i}."}], Sampling(max_tokens=8, temperature=0.0)), f"r{i}", i
            )
            for i in range(n)
        ]
        results: dict[str, Generation] = {}
        first_answer = threading.Event()

        def on_result(p: Prepared, g: Generation) -> None:
            results[p.request_id] = g
            if g.ok:
                first_answer.set()

        worker = threading.Thread(target=backend.generate, args=(Feed(batch), on_result))
        worker.start()
        assert first_answer.wait(120), "no answer from either server"
        answered_before_kill = dict(backend.answered)
        victim = max(answered_before_kill, key=answered_before_kill.get)  # the one that answered first, mid-run
        survivor = next(url for url in procs if url != victim)
        os.killpg(procs[victim].pid, signal.SIGKILL)
        procs[victim].wait(30)
        worker.join(240)
        assert not worker.is_alive()
        figures = (
            f"both servers loaded in {load_s:.1f} s; answers before the kill {answered_before_kill}; "
            f"answered by the killed server {backend.answered[victim]}, by the survivor {backend.answered[survivor]}; "
            f"failed {sum(not g.ok for g in results.values())}"
        )
        print(figures)
        assert sorted(results) == sorted(p.request_id for p in batch), figures
        assert all(g.ok for g in results.values()), {k: g.error for k, g in results.items() if not g.ok}
        assert backend.answered[victim] + backend.answered[survivor] == n, figures
        # the victim may answer one more between the snapshot and the kill: what it did not answer, the survivor did
        assert backend.answered[victim] >= 1 and backend.answered[survivor] >= 1, figures
        assert sum(answered_before_kill.values()) < n and backend.answered[survivor] > answered_before_kill[survivor], figures
    finally:
        for proc in procs.values():
            _stop(proc)
