"""The openai backend against fault-injecting HTTP servers on 127.0.0.1."""

import json
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from synth_cpt.core.storage import LocalStorage
from synth_cpt.generation.backends import Feed, OpenAIBackend, Prepared
from synth_cpt.generation.cache import GenerationCache
from synth_cpt.generation.engine import GenerationEngine
from synth_cpt.generation.requests import ChatRequest, Sampling

from .fault_server import send


class FaultServer:
    """Misbehaves according to the user message: ok, 500x2, 429, slow, drop, malformed.

    Servers built with the same `attempts` counter behave as one fleet: a request's second attempt
    is its second wherever it lands.
    """

    def __init__(self, attempts: Counter | None = None, lock=None) -> None:
        self.attempts: Counter[str] = Counter() if attempts is None else attempts
        self.seen: list[str] = []
        self.auth: set[str] = set()
        self.healthy = False
        lock = lock or threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                kind = body["messages"][-1]["content"].split(":")[0]
                with lock:
                    server.attempts[body["messages"][-1]["content"]] += 1
                    n = server.attempts[body["messages"][-1]["content"]]
                    server.seen.append(body["messages"][-1]["content"])
                    server.auth.add(self.headers.get("Authorization", ""))
                if not server.healthy:
                    if kind == "500x2" and n <= 2:
                        return self._send(500, b'{"error": "boom"}')
                    if kind == "429" and n == 1:
                        return self._send(429, b'{"error": "slow down"}', {"Retry-After": "1"})
                    if kind == "slow":
                        time.sleep(1.0)
                    if kind == "drop" and n == 1:
                        self.close_connection = True
                        self.connection.shutdown(2)
                        return None
                    if kind == "malformed":
                        return self._send(200, b"<html>proxy error</html>")
                reply = {
                    "choices": [
                        {
                            "message": {"role": "assistant", "content": f"reply to {body['messages'][-1]['content']}"},
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": {"prompt_tokens": 11, "completion_tokens": 3},
                }
                return self._send(200, json.dumps(reply).encode())

            def _send(self, code, data, headers=None):
                send(self, code, data, headers)

        class QuietServer(ThreadingHTTPServer):
            def handle_error(self, request, client_address):  # clients that timed out close early
                pass

        self.httpd = QuietServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def stop(self):
        self.httpd.shutdown()


@pytest.fixture
def servers():
    attempts, lock = Counter(), threading.Lock()
    pair = [FaultServer(attempts, lock), FaultServer(attempts, lock)]
    yield pair
    for s in pair:
        s.stop()


KINDS = ["ok:1", "ok:2", "ok:3", "ok:4", "500x2:a", "429:a", "slow:a", "drop:a", "malformed:a"]


def _engine(tmp_path, servers):
    backend = OpenAIBackend(
        [s.url for s in servers], "served-model", concurrency=4, timeout_s=0.5, max_attempts=3, backoff_s=0.05, backoff_max_s=0.2
    )
    cache = GenerationCache(LocalStorage(tmp_path / "home"))
    return GenerationEngine(backend, cache, model="served-model", model_fingerprint="fp-openai", flush_every=3, flush_seconds=3600)


def test_every_request_ends_succeeded_or_failed_and_rerun_retries_only_failures(tmp_path, servers, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-secret-123")
    reqs = [ChatRequest.chat([{"role": "user", "content": k}], Sampling(max_tokens=8)) for k in KINDS]
    engine = _engine(tmp_path, servers)
    report = engine.run(reqs)
    assert (report.sent, report.succeeded, report.failed) == (len(KINDS), 7, 2), "all but slow and malformed succeed"
    rows = engine.cache.load()
    assert rows.height == len(KINDS) and rows["request_id"].n_unique() == len(KINDS), "none twice"
    by_kind = {json.loads(m)[-1]["content"]: r for m, r in zip(rows["messages"], rows.iter_rows(named=True), strict=True)}
    for kind in ("ok:1", "ok:2", "ok:3", "ok:4", "500x2:a", "429:a", "drop:a"):
        assert by_kind[kind]["error"] is None and by_kind[kind]["text"] == f"reply to {kind}", kind
        assert by_kind[kind]["prompt_tokens"] == 11 and by_kind[kind]["completion_tokens"] == 3
    assert by_kind["500x2:a"]["attempts"] == 3
    assert by_kind["429:a"]["attempts"] == 2 and by_kind["429:a"]["latency_s"] >= 1.0, "Retry-After is honoured"
    assert by_kind["drop:a"]["attempts"] == 2
    assert "timeout" in by_kind["slow:a"]["error"] and by_kind["slow:a"]["attempts"] == 3
    assert "malformed response body" in by_kind["malformed:a"]["error"]
    assert all(s.seen for s in servers), "load is spread over every base URL"
    assert {a for s in servers for a in s.auth} == {"Bearer sk-test-secret-123"}
    stored = b"".join(p.read_bytes() for p in (tmp_path / "home").rglob("*.parquet"))
    assert b"sk-test-secret" not in stored, "the key is never stored"

    for s in servers:
        s.healthy = True
        s.seen.clear()
    second = _engine(tmp_path, servers).run(reqs)
    assert sorted(x for s in servers for x in s.seen) == ["malformed:a", "slow:a"], "only the failed ones are retried"
    assert (second.sent, second.succeeded, second.cache_hits) == (2, 2, 7)
    assert len(engine.results(reqs)) == len(KINDS)


def test_structured_requests_send_the_schema(tmp_path, servers):
    schema = {"type": "object", "properties": {"a": {"type": "string", "maxLength": 20}}, "required": ["a"], "additionalProperties": False}
    backend = OpenAIBackend([servers[0].url], "m")
    body = backend.payload(
        __import__("synth_cpt.generation.backends", fromlist=["Prepared"]).Prepared(
            ChatRequest.chat([{"role": "user", "content": "ok:x"}], json_schema=schema), "rid", 42
        )
    )
    assert body["response_format"]["json_schema"]["schema"] == schema and body["seed"] == 42
    # the server's reply is not JSON: the engine keeps the call but rejects the output with a reason
    engine = _engine(tmp_path, servers)
    report = engine.run([ChatRequest.chat([{"role": "user", "content": "ok:x"}], json_schema=schema)])
    assert report.succeeded == 1 and report.rejected == 1
    row = engine.cache.load().row(0, named=True)
    assert row["rejected"] == "invalid JSON: Expecting value at char 0", "the reply is `reply to ok:x`"


def test_cli_generate_against_a_server(tmp_path, servers):
    import os
    import subprocess
    import sys
    from pathlib import Path

    servers[0].healthy = True
    inp = tmp_path / "in.jsonl"
    inp.write_text(
        json.dumps({"messages": [{"role": "user", "content": "ok:cli-1"}], "max_tokens": 4}) + "\n"
        + json.dumps({"messages": [{"role": "user", "content": "ok:cli-2"}]}) + "\n"
        + json.dumps({"messages": [{"role": "user", "content": "ok:cli-1"}], "max_tokens": 4}) + "\n"
    )  # fmt: skip
    env = {**os.environ, "SYNTH_CPT_HOME": str(tmp_path / "home")}
    exe = str(Path(sys.executable).with_name("synth-cpt"))
    cmd = [
        exe,
        "generate",
        str(inp),
        "--backend",
        "openai",
        "--endpoint",
        servers[0].url,
        "--served-model-name",
        "m",
        "--output",
        str(tmp_path / "out.jsonl"),
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [o["text"] for o in out] == ["reply to ok:cli-1", "reply to ok:cli-2", "reply to ok:cli-1"]
    assert "3 requests, 2 unique" in done.stderr.replace("\n", " ")

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": "hello"}\n{not json\n')
    failed = subprocess.run([exe, "generate", str(bad), "--backend", "openai", "--endpoint", servers[0].url, "--served-model-name", "m"],
                            env=env, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert failed.returncode == 1, "SystemExit with a message"
    assert "bad.jsonl:1" in failed.stderr and "bad.jsonl:2" in failed.stderr and "nothing was sent" in failed.stderr


def test_llm_resource_inside_a_dagster_asset_logs_progress_and_reports_totals(tmp_path, servers):
    from dagster import AssetExecutionContext, DagsterInstance, MaterializeResult, asset, materialize

    from synth_cpt.defs.resources import LLM

    servers[0].healthy = True

    @asset
    def tiny_generation(context: AssetExecutionContext, llm: LLM) -> MaterializeResult:
        engine = llm.engine(LocalStorage(tmp_path / "home"), str(tmp_path / "home"), log=context.log.info)
        report = engine.run([ChatRequest.chat([{"role": "user", "content": f"ok:asset-{i}"}]) for i in range(5)])
        return MaterializeResult(metadata=report.metadata())

    resource = LLM(backend="openai", endpoints=[servers[0].url], served_model_name="m", flush_every=2)
    with DagsterInstance.ephemeral() as instance:
        result = materialize([tiny_generation], resources={"llm": resource}, instance=instance)
        assert result.success
        meta = result.asset_materializations_for_node("tiny_generation")[0].metadata
        assert meta["sent"].value == 5 and meta["succeeded"].value == 5 and meta["completion_tokens"].value == 15
        logs = [e.message for e in instance.all_logs(result.run_id) if e.message]
        assert any("generation: 5/5 sent" in m and "output tok/s" in m and "ETA" in m for m in logs)
        again = materialize([tiny_generation], resources={"llm": resource}, instance=instance)
        meta = again.asset_materializations_for_node("tiny_generation")[0].metadata
        assert meta["sent"].value == 0 and meta["cache_hits"].value == 5


def test_chains_through_the_server_fleet_send_each_link_after_the_one_before(tmp_path, servers):
    """Requests pushed while others are in flight (the next link of a chain) are sent by the same run;
    workers that found the feed empty wait for them instead of ending the run early."""
    links = 3

    def link(chain: int, k: int, before: str = "") -> ChatRequest:
        return ChatRequest.chat([{"role": "user", "content": f"ok:{chain}/{k} after [{before}]"}], Sampling(max_tokens=8))

    def follow(rid, gen):
        if not gen.ok or "ok:" not in gen.text:
            return []  # the slow request (it times out, and holds a worker meanwhile)
        chain, k = (int(x) for x in gen.text.split("ok:", 1)[1].split(" ", 1)[0].split("/"))
        return [link(chain, k + 1, gen.text)] if k + 1 < links else []

    slow = ChatRequest.chat([{"role": "user", "content": "slow:x"}])
    report = _engine(tmp_path, servers).run([link(c, 0) for c in range(2)] + [slow], follow=follow)
    seen = [m for s in servers for m in s.seen]
    assert report.sent == 2 * links + 1 and report.unique == 2 * links + 1
    for chain in range(2):
        assert sum(m.startswith(f"ok:{chain}/") for m in seen) == links
        assert all(f"reply to ok:{chain}/{k - 1}" in next(m for m in seen if m.startswith(f"ok:{chain}/{k} ")) for k in range(1, links))


def test_retry_after_is_read_as_seconds_or_an_http_date():
    from email.utils import formatdate

    from synth_cpt.generation.backends import retry_after_seconds

    now = 1_800_000_000.0
    assert retry_after_seconds("7") == 7.0 and retry_after_seconds("0.5") == 0.5 and retry_after_seconds("-3") == 0.0
    assert retry_after_seconds(formatdate(now + 120, usegmt=True), now=now) == 120.0
    assert retry_after_seconds(formatdate(now - 120, usegmt=True), now=now) == 0.0, "a date in the past: retry now"
    assert retry_after_seconds(None) is None and retry_after_seconds("") is None and retry_after_seconds("soon") is None


def test_request_deadline_is_attempts_times_timeout_plus_the_wait_ceilings():
    """The bound every request keeps: no wait drawn exceeds its ceiling, whatever Retry-After says."""
    b = OpenAIBackend(
        ["http://127.0.0.1:9/v1"], "m", timeout_s=1.0, max_attempts=3, backoff_s=0.1, backoff_max_s=0.4, retry_after_max_s=1.5
    )
    assert [b.wait_ceiling_s(k) for k in (1, 2)] == [1.5, 1.5] and b.request_deadline_s() == 6.0
    b.retry_after_max_s = 0.0
    assert [round(b.wait_ceiling_s(k), 9) for k in (1, 2, 3, 4)] == [0.2, 0.3, 0.5, 0.5] and round(b.request_deadline_s(), 9) == 3.5
    b.max_attempts = 5
    assert round(b.request_deadline_s(), 9) == 5 + 0.2 + 0.3 + 0.5 + 0.5
    b.retry_after_max_s = 1.5
    assert max(b._backoff(k, ask) for k in (1, 2, 3, 9) for ask in (None, 0.2, 1.5, 86400.0) for _ in range(50)) <= 1.5


def test_an_unreachable_endpoint_is_avoided_while_it_cools_down():
    b = OpenAIBackend(["http://a/v1", "http://b/v1"], "m", endpoint_cooldown_s=10.0)
    b.in_flight["http://b/v1"] = 3
    assert b._pick() == "http://a/v1", "fewest in flight"
    assert b._pick(avoid="http://a/v1") == "http://b/v1", "a retry goes elsewhere when it can"
    b.cooling_until["http://b/v1"] = time.monotonic() + 10
    assert b._pick(avoid="http://a/v1") == "http://a/v1", "a cooling endpoint only when every other one is worse"
    b.cooling_until["http://a/v1"] = time.monotonic() + 5
    assert b._pick() == b._pick(avoid="http://a/v1") == "http://a/v1", "every one cooling: the one that recovers first"


def test_a_redirect_is_not_followed_so_a_post_is_never_answered_by_a_get():
    """A server that redirects the chat completion to a page answering GETs with a valid completion: following the
    redirect would turn the POST into a GET and take that page for the model's answer. The request fails instead."""
    got_get = []

    class Redirecting(BaseHTTPRequestHandler):
        def log_message(self, *args):  # quiet
            pass

        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            send(self, 301, b"", {"Location": "/v1/elsewhere"})

        def do_GET(self):
            got_get.append(self.path)
            reply = {"choices": [{"message": {"role": "assistant", "content": "from a GET"}, "finish_reason": "stop"}], "usage": {}}
            send(self, 200, json.dumps(reply).encode())

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Redirecting)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        backend = OpenAIBackend([f"http://127.0.0.1:{httpd.server_address[1]}/v1"], "m", max_attempts=2, backoff_s=0.01, timeout_s=5)
        results = []
        request = ChatRequest.chat([{"role": "user", "content": "hi"}], Sampling(max_tokens=4))
        backend.generate(Feed([Prepared(request, "r1", 1)]), lambda p, gen: results.append(gen))
    finally:
        httpd.shutdown()
        httpd.server_close()
    print("redirected request:", results[0].error)
    assert got_get == [] and results[0].text is None and results[0].error.startswith("failed after 2 attempts: malformed response body")
