"""The engine and its cache, with the deterministic test double (no model)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest

from synth_cpt.core.storage import LocalStorage
from synth_cpt.generation.backends import Prepared
from synth_cpt.generation.cache import GenerationCache
from synth_cpt.generation.engine import GenerationEngine, throughput_order
from synth_cpt.generation.requests import ChatRequest, Sampling, derived_seed
from synth_cpt.generation.structured import parse_json_output

from .conftest import REPO
from .doubles import DeterministicTestBackend, make_requests
from .gen_worker import FLUSH_EVERY


def _engine(tmp_path, backend=None, flush_every=4):
    backend = backend or DeterministicTestBackend()
    cache = GenerationCache(LocalStorage(tmp_path / "home"))
    return GenerationEngine(backend, cache, model="double", model_fingerprint="fp", flush_every=flush_every, flush_seconds=3600), backend


def test_cache_miss_then_hit_and_dedup(tmp_path):
    engine, backend = _engine(tmp_path)
    reqs = make_requests(10, duplicates=3)
    first = engine.run(reqs)
    assert (first.requests, first.unique, first.sent, first.cache_hits) == (13, 10, 10, 0)
    assert len(backend.sent) == 10, "identical requests are sent once"
    again, backend2 = _engine(tmp_path)
    second = again.run(reqs)
    assert (second.sent, second.cache_hits) == (0, 10) and backend2.sent == [], "finished work sends nothing"
    more = again.run(reqs + make_requests(12)[10:])
    assert more.sent == 2 and more.cache_hits == 10
    rows = again.results(reqs)
    assert rows.height == 10 and rows["request_id"].n_unique() == 10
    assert set(rows.columns) >= {
        "request_id",
        "model",
        "model_fingerprint",
        "engine",
        "engine_version",
        "prompt_name",
        "prompt_sha",
        "sampling",
        "seed",
        "text",
        "finish_reason",
        "prompt_tokens",
        "completion_tokens",
        "attempts",
        "error",
        "created_at",
    }
    assert rows["seed"].to_list() == [derived_seed(r) for r in rows["request_id"]]


def test_request_id_covers_model_messages_sampling_and_seed():
    base = ChatRequest.chat([{"role": "user", "content": "hi"}], Sampling(seed=1))
    assert base.request_id("fp") == ChatRequest.chat([{"role": "user", "content": "hi"}], Sampling(seed=1)).request_id("fp")
    variants = [
        base.request_id("other-fp"),
        ChatRequest.chat([{"role": "user", "content": "hi!"}], Sampling(seed=1)).request_id("fp"),
        ChatRequest.chat([{"role": "user", "content": "hi"}], Sampling(seed=2)).request_id("fp"),
        ChatRequest.chat([{"role": "user", "content": "hi"}], Sampling(seed=1, temperature=0.1)).request_id("fp"),
        ChatRequest.chat([{"role": "user", "content": "hi"}], Sampling(seed=1), json_schema={"type": "object"}).request_id("fp"),
    ]
    assert len({base.request_id("fp"), *variants}) == 6


def test_failures_are_stored_as_failures_and_retried(tmp_path):
    reqs = make_requests(8)
    ids = [r.request_id("fp") for r in reqs]
    engine, _ = _engine(tmp_path, DeterministicTestBackend(fail_ids={ids[2], ids[5]}))
    report = engine.run(reqs)
    assert (report.succeeded, report.failed) == (6, 2)
    assert report.failures[ids[2]] == "double: injected failure"
    cache = engine.cache
    assert cache.finished_ids() == set(ids) - {ids[2], ids[5]}
    assert cache.load().filter(pl.col("error").is_not_null()).height == 2
    retry, backend = _engine(tmp_path)
    second = retry.run(reqs)
    assert sorted(backend.sent) == sorted([ids[2], ids[5]]) and second.failed == 0
    assert retry.results(reqs).height == 8


def test_throughput_order_groups_prefixes_and_is_deterministic():
    reqs = make_requests(20)
    prepared = [Prepared(r, r.request_id("fp"), 0) for r in reqs]
    once = throughput_order(prepared)
    assert [p.request_id for p in once] == [p.request_id for p in throughput_order(list(reversed(prepared)))]
    keys = [p.request.rendered()[:256] for p in once]
    assert keys == sorted(keys)


def _segments(root):
    return sorted((root / "generations" / "segments").rglob("*.parquet"))


def _run_worker(root, n, delay, sent_log):
    return subprocess.Popen(
        [sys.executable, "-m", "synth_cpt_tests.gen_worker", str(root), str(n), str(delay), str(sent_log)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def _finished(root):
    return GenerationCache(LocalStorage(root)).finished().select("request_id", "text").sort("request_id")


def test_sigkill_mid_run_then_restart_gives_the_same_results(tmp_path):
    n = 60
    clean_root, crash_root = tmp_path / "clean", tmp_path / "crash"
    clean = _run_worker(clean_root, n, 0.0, tmp_path / "clean.log")
    assert clean.wait(timeout=120) == 0, clean.stderr.read()

    victim = _run_worker(crash_root, n, 0.02, tmp_path / "crash.log")
    deadline = time.time() + 60
    while len(_segments(crash_root)) < 2 and time.time() < deadline:
        time.sleep(0.02)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait(timeout=30)
    saved = GenerationCache(LocalStorage(crash_root)).load()
    assert 0 < saved.height < n, "killed mid-run"

    restart = _run_worker(crash_root, n, 0.0, tmp_path / "crash.log")
    assert restart.wait(timeout=120) == 0, restart.stderr.read()
    assert _finished(crash_root).equals(_finished(clean_root)), "exactly the same result set"
    rows = GenerationCache(LocalStorage(crash_root)).load()
    assert rows.height == n and rows["request_id"].n_unique() == n, "no duplicates"
    sent = (tmp_path / "crash.log").read_text().split()
    redone = len(sent) - n
    assert 0 <= redone <= FLUSH_EVERY, f"redid {redone} requests, more than one segment"


def _sent(log):
    """Requests a worker sent: none (and no log) if the other worker had finished them all first."""
    return len(log.read_text().split()) if log.exists() else 0


def test_two_processes_share_one_cache(tmp_path):
    root = tmp_path / "shared"
    a = _run_worker(root, 40, 0.005, tmp_path / "a.log")
    b = _run_worker(root, 40, 0.005, tmp_path / "b.log")
    assert a.wait(timeout=120) == 0 and b.wait(timeout=120) == 0, a.stderr.read() + b.stderr.read()
    rows = GenerationCache(LocalStorage(root)).load()
    sent = _sent(tmp_path / "a.log") + _sent(tmp_path / "b.log")
    assert rows.height == sent, "every row either process wrote is there: no lost writes"
    assert rows["segment"].n_unique() == len(_segments(root))
    finished = GenerationCache(LocalStorage(root)).finished()
    assert finished.height == 40 and finished["request_id"].n_unique() == 40
    # a third process finds everything done
    c = _run_worker(root, 40, 0.0, tmp_path / "c.log")
    assert c.wait(timeout=120) == 0
    assert c.stdout.read().split() == ["0", "40"]


@pytest.mark.parametrize(
    "text, ok",
    [
        ('{"summary": "s", "entities": ["a"]}', True),
        ('```json\n{"summary": "s", "entities": ["a"]}\n```', True),
        ('Here is the JSON: {"summary": "s", "entities": ["a", "b",],} Hope it helps', True),
        ('{"summary": "s"}', False),
        ('{"summary": "s", "entities": ["a"', False),
        ("no json at all", False),
    ],
)
def test_structured_output_repair_or_reject(text, ok):
    schema = {
        "type": "object",
        "properties": {"summary": {"type": "string"}, "entities": {"type": "array", "items": {"type": "string"}}},
        "required": ["summary", "entities"],
    }
    value, reason = parse_json_output(text, schema)
    assert (reason is None) == ok, reason
    if ok:
        assert value["summary"] == "s"
    else:
        assert reason and value is None


def test_structured_requests_reach_the_backend_with_their_schema_and_a_nonconforming_answer_is_rejected(tmp_path):
    """What the engine guarantees about guided decoding: the schema is handed to the backend with the
    request (vLLM's structured_outputs, the server's response_format are built from it), and an answer
    that does not follow it is recorded as rejected with the reason, never kept as usable."""
    schema = {
        "type": "object",
        "properties": {
            "summary": {"type": "string", "maxLength": 200},
            "entities": {"type": "array", "maxItems": 4, "items": {"type": "string", "maxLength": 40}},
        },
        "required": ["summary"],
        "additionalProperties": False,
    }
    good = ChatRequest.chat([{"role": "user", "content": "json please"}], json_schema=schema)
    extra = ChatRequest.chat([{"role": "user", "content": "json with an extra field"}], json_schema=schema)
    prose = ChatRequest.chat([{"role": "user", "content": "json, answered in prose"}], json_schema=schema)
    answers = {
        "json please": json.dumps({"summary": "s", "entities": ["a"]}),
        "json with an extra field": json.dumps({"summary": "s", "other": 1}),
        "json, answered in prose": "The summary is s.",
    }
    backend = DeterministicTestBackend(reply=lambda p: answers[p.request.messages[-1][1]])
    engine, _ = _engine(tmp_path, backend)
    report = engine.run([good, extra, prose])
    assert [p.request.schema for p in backend.prepared] == [schema] * 3
    assert (report.succeeded, report.rejected) == (3, 2)
    ids = engine.request_ids([good, extra, prose])
    rows = {r["request_id"]: r for r in engine.cache.finished(ids).iter_rows(named=True)}
    assert rows[ids[0]]["rejected"] is None
    assert rows[ids[1]]["rejected"] == "schema violation at (root): Additional properties are not allowed ('other' was unexpected)"
    assert rows[ids[2]]["rejected"] == "invalid JSON: Expecting value at char 0"
    assert report.rejections == {ids[1]: rows[ids[1]]["rejected"], ids[2]: rows[ids[2]]["rejected"]}


def test_a_retry_attempt_is_a_new_request_id_and_a_first_attempt_keeps_the_old_one():
    """`attempt` (EntiGraph step 1 asks again until its JSON parses) enters the id only when > 0, so the ids
    already in caches stay valid; each attempt gets its own id and so its own seed."""
    import hashlib
    from dataclasses import replace

    req = make_requests(1)[0]
    old_payload = {"model_fingerprint": "fp", "messages": req.message_dicts(), "sampling": req.sampling.as_dict(), "json_schema": None}
    old_id = hashlib.sha256(json.dumps(old_payload, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()
    assert req.attempt == 0 and req.request_id("fp") == old_id
    ids = [replace(req, attempt=k).request_id("fp") for k in range(3)]
    assert ids[0] == old_id and len(set(ids)) == 3
    assert len({derived_seed(rid) for rid in ids}) == 3


def test_resource_fingerprint_and_cache_root(tmp_path):
    from synth_cpt.defs.resources import LLM

    a, b = LLM(), LLM(dtype="float32")
    assert a.model_fingerprint("w@1") != b.model_fingerprint("w@1"), "dtype changes outputs"
    assert a.model_fingerprint("w@1") != a.model_fingerprint("w@2"), "weights change outputs"
    assert a.model_fingerprint("w@1") == LLM(enforce_eager=False, concurrency=3).model_fingerprint("w@1"), "these do not"
    served = LLM(backend="openai", endpoints=["http://127.0.0.1:1/v1"], served_model_name="m", cache_root=str(tmp_path / "shared"))
    engine = served.engine(LocalStorage(tmp_path / "home"), str(tmp_path / "home"))
    assert engine.cache.storage.root == str((tmp_path / "shared").resolve())
    with pytest.raises(ValueError, match="served_model_name"):
        LLM(backend="openai", endpoints=["http://127.0.0.1:1/v1"]).engine(LocalStorage(tmp_path), str(tmp_path))


def test_compaction_keeps_every_result_and_pending_failures(tmp_path):
    reqs = make_requests(12)
    ids = [r.request_id("fp") for r in reqs]
    first, _ = _engine(tmp_path, DeterministicTestBackend(fail_ids={ids[0], ids[1]}), flush_every=3)
    first.run(reqs)
    second, _ = _engine(tmp_path, DeterministicTestBackend(fail_ids={ids[0]}), flush_every=3)
    second.run(reqs)  # ids[1] now succeeds, ids[0] fails again
    cache = first.cache
    before = cache.finished().select("request_id", "text").sort("request_id")
    assert len(cache.segment_keys()) > 2
    figures = cache.compact()
    assert figures["segments_after"] == 1 and figures["rows_after"] == 12  # 11 results + the latest failure of ids[0]
    assert cache.finished().select("request_id", "text").sort("request_id").equals(before)
    assert cache.finished_ids() == set(ids) - {ids[0]}
    retry, backend = _engine(tmp_path)
    retry.run(reqs)
    assert backend.sent == [ids[0]], "only the request that never succeeded is sent again"
    exe = Path(sys.executable).with_name("synth-cpt")
    out = subprocess.run([str(exe), "cache", "stats", "--root", str(tmp_path / "home")], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "requests with a result" in out.stdout and "12" in out.stdout
