"""What the engine guarantees whatever a model writes: every request accounted for, truncated JSON
named as such, unbounded schemas refused, a cache that survives compaction mid-read and mid-run,
scoped lookups that read little, and writes off the engine's thread."""

import re
import threading

import polars as pl
import pyarrow as pa
import pytest

from synth_cpt.core.storage import LocalStorage, S3Storage
from synth_cpt.generation.backends import Backend, Prepared, VLLMBackend
from synth_cpt.generation.cache import GenerationCache, id_key, safe_scope
from synth_cpt.generation.engine import GenerationAccountingError, GenerationEngine
from synth_cpt.generation.requests import ChatRequest, Generation, Sampling

from .doubles import DeterministicTestBackend, make_requests

BOUNDED = {
    "type": "object",
    "properties": {
        "summary": {"type": "string", "maxLength": 300},
        "entities": {"type": "array", "maxItems": 8, "items": {"type": "string", "maxLength": 60}},
    },
    "required": ["summary", "entities"],
    "additionalProperties": False,
}


def _engine(root, backend=None, flush_every=4, storage=None):
    backend = backend or DeterministicTestBackend()
    cache = GenerationCache(storage or LocalStorage(root))
    return GenerationEngine(backend, cache, model="double", model_fingerprint="fp", flush_every=flush_every, flush_seconds=3600)


# -- defect 1: JSON under a length limit, and schemas that let decoding run forever ------------------
class TruncatingBackend(DeterministicTestBackend):
    """Test double: every structured answer is cut off at max_tokens, as a looping model's would be."""

    def generate(self, batch, on_result):
        for p in batch:
            on_result(p, Generation(p.request_id, '{"summary": "1901-1953", "entities": ["1901-1953", "19', "length", 30, 96, 1, 0.0))


def test_structured_output_cut_at_max_tokens_is_rejected_as_truncated(tmp_path):
    engine = _engine(tmp_path, TruncatingBackend())
    req = ChatRequest.chat([{"role": "user", "content": "entities please"}], Sampling(max_tokens=96), json_schema=BOUNDED)
    report = engine.run([req])
    assert (report.succeeded, report.rejected) == (1, 1)
    row = engine.cache.load().row(0, named=True)
    assert row["rejected"] == "truncated: stopped at max_tokens=96 before the JSON was complete"
    assert report.rejections[row["request_id"]] == row["rejected"]


@pytest.mark.parametrize(
    "schema, where",
    [
        ({"type": "object", "properties": {"s": {"type": "string"}}, "additionalProperties": False}, "$.s (string) has no maxLength"),
        (
            {
                "type": "object",
                "properties": {"e": {"type": "array", "items": {"type": "string", "maxLength": 5}}},
                "additionalProperties": False,
            },
            "$.e (array) has no maxItems",
        ),
        ({"type": "object", "properties": {"s": {"type": "string", "maxLength": 5}}}, "$ (object) allows additionalProperties"),
    ],
)
def test_unbounded_schemas_are_refused_before_anything_is_sent(tmp_path, schema, where):
    engine = _engine(tmp_path)
    with pytest.raises(ValueError, match=re.escape(where)):
        engine.run([ChatRequest.chat([{"role": "user", "content": "x"}], json_schema=schema)])
    assert engine.backend.sent == [] and engine.cache.segment_keys() == []


# -- defect 2: no request silently lost ------------------------------------------------------------
class _Out:
    def __init__(self, rid, finished=True):
        self.request_id, self.finished, self.prompt_token_ids = rid, finished, [1, 2, 3]
        self.outputs = [type("O", (), {"text": f"out {rid[:6]}", "finish_reason": "stop", "token_ids": [7, 8]})()]


class VLLMEngineDouble:
    """Test double of vLLM's LLMEngine: refuses prompts marked TOO LONG, finishes one request per step."""

    def __init__(self):
        self.waiting = []

    def add_request(self, rid, prompt, params):
        if params["too_long"]:
            raise ValueError("prompt length 9000 exceeds max_model_len 2048")
        self.waiting.append(rid)

    def step(self):
        return [_Out(self.waiting.pop(0))] if self.waiting else []


class VLLMDouble:
    def __init__(self):
        self.llm_engine = VLLMEngineDouble()

    def get_tokenizer(self):
        return type("T", (), {"apply_chat_template": staticmethod(lambda *a, **k: {"input_ids": [1, 2, 3]})})()


def test_vllm_backend_accounts_for_requests_the_engine_refuses(tmp_path):
    reqs = [
        ChatRequest.chat([{"role": "user", "content": f"{i} {'TOO LONG' if i in (1, 2, 5) else 'fine'}"}], Sampling(max_tokens=4))
        for i in range(7)
    ]
    backend = VLLMBackend("double", {}, llm=VLLMDouble(), max_in_flight=1)
    backend.sampling_params = lambda p: {"too_long": "TOO LONG" in p.request.messages[-1][1]}
    engine = _engine(tmp_path, backend)
    report = engine.run(reqs)
    assert (report.sent, report.succeeded, report.failed) == (7, 4, 3), "every request ends succeeded or failed"
    refused = {reqs[i].request_id("fp") for i in (1, 2, 5)}
    assert set(report.failures) == refused, "exactly the refused requests failed"
    assert all("exceeds max_model_len" in report.failures[rid] for rid in refused)
    rows = engine.cache.load()
    assert rows.height == 7 and rows["request_id"].n_unique() == 7


class ForgetfulBackend(DeterministicTestBackend):
    """Test double: returns without reporting the last two requests."""

    def generate(self, batch, on_result):
        super().generate(list(batch)[:-2], on_result)


def test_a_backend_that_drops_requests_fails_the_run_and_they_are_retried(tmp_path):
    reqs = make_requests(9)
    engine = _engine(tmp_path, ForgetfulBackend())
    with pytest.raises(GenerationAccountingError, match="2 of 9 requests ended without a result"):
        engine.run(reqs)
    rows = engine.cache.load()
    lost = rows.filter(pl.col("error").is_not_null())
    assert sorted(lost["request_id"]) == sorted(r.request_id("fp") for r in reqs[-2:]), "the two the backend never reported"
    assert lost.height == 2 and all(e.startswith("lost:") for e in lost["error"])
    retry = _engine(tmp_path)
    report = retry.run(reqs)
    assert report.sent == 2 and report.failed == 0 and retry.results(reqs).height == 9


# -- defect 5 and the cache at scale: compaction during reads and runs, scoped lookups -------------
class CompactsOnFirstOpen(LocalStorage):
    """Test double of a storage whose segments are compacted away by another process right after a
    reader has listed them and before it opens the first one."""

    def __init__(self, root):
        super().__init__(root)
        self.fired = False

    def parquet_file(self, key):
        if "/segments/" in key and not self.fired:
            self.fired = True
            GenerationCache(LocalStorage(self.root)).compact()
        return super().parquet_file(key)


def test_a_reader_survives_segments_compacted_away_under_it(tmp_path):
    reqs = make_requests(30)
    engine = _engine(tmp_path, flush_every=4)
    engine.run(reqs, scope="rewrites_easy/pt|high")
    ids = engine.request_ids(reqs)
    assert len(engine.cache.segment_keys()) == 15, "30 rows handed to the writer in batches of flush_every // 2"
    reader = GenerationCache(CompactsOnFirstOpen(tmp_path))
    rows = reader.finished(ids, scope="rewrites_easy/pt|high")
    assert reader.storage.fired
    assert sorted(rows["request_id"].to_list()) == sorted(ids)
    assert len(engine.cache.segment_keys()) == 1


class CompactingTestBackend(DeterministicTestBackend):
    """Test double: another process compacts the cache every 10 requests sent, while the run's writer
    thread is still writing segments of the same scope."""

    def __init__(self, root, **kw) -> None:
        super().__init__(**kw)
        self.other = GenerationCache(LocalStorage(root))
        self.compactions: list[dict[str, int]] = []

    def send(self, p: Prepared) -> None:
        super().send(p)
        if len(self.sent) % 10 == 0:
            self.compactions.append(self.other.compact())


def test_compaction_during_a_run_loses_nothing(tmp_path):
    reqs = make_requests(160)
    backend = CompactingTestBackend(tmp_path)
    report = _engine(tmp_path, backend, flush_every=4).run(reqs, scope="s")
    assert (report.sent, report.failed) == (160, 0)
    # when the 10th request is sent, 9 results are in: at least 3 batches of 2 are written (at most one is
    # ever pending), so every compaction merges segments
    assert len(backend.compactions) == 16
    # (`segments_after` also lists what the writer added meanwhile: it is not a figure of the merge)
    assert [c["segments_before"] >= 2 and c["rows_after"] == c["rows_before"] for c in backend.compactions] == [True] * 16
    other = GenerationCache(LocalStorage(tmp_path))
    other.compact()
    rows = other.load()
    assert rows.height == 160 and rows["request_id"].n_unique() == 160, "no row lost or duplicated"
    again_backend = DeterministicTestBackend()
    again = _engine(tmp_path, again_backend)
    assert again.run(reqs, scope="s").sent == 0 and again_backend.sent == []
    assert again.results(reqs, scope="s").height == 160


class CountingStorage(LocalStorage):
    def __init__(self, root):
        super().__init__(root)
        self.opened = []

    def parquet_file(self, key):
        self.opened.append(key)
        return super().parquet_file(key)


def test_lookups_read_their_own_scope_first_and_still_find_other_scopes(tmp_path):
    a, b, c = make_requests(40)[:20], make_requests(40)[20:], make_requests(50)[40:]
    _engine(tmp_path).run(a, scope="rewrites_easy/pt/high")
    _engine(tmp_path).run(b, scope="rewrites_qa/en/low")
    storage = CountingStorage(tmp_path)
    engine = _engine(tmp_path, storage=storage)
    assert engine.run(a, scope="rewrites_easy/pt/high").sent == 0
    assert storage.opened and all("rewrites_easy/pt/high" in k for k in storage.opened), "a rerun never reads other scopes"
    storage.opened.clear()
    report = engine.run(a[:5] + b[:5] + c, scope="rewrites_easy/pt/high")
    assert (report.cache_hits, report.sent) == (10, 10), "a hit in another scope counts"
    assert any("rewrites_qa/en/low" in k for k in storage.opened)
    keys = engine.cache.segment_keys()
    assert {k.split("/segments/")[1].rsplit("/", 1)[0] for k in keys} == {"rewrites_easy/pt/high", "rewrites_qa/en/low"}
    rows = engine.results(a[:5] + b[:5] + c, scope="rewrites_easy/pt/high")
    assert rows.height == 20
    assert set(rows["scope"]) == {"rewrites_easy/pt/high", "rewrites_qa/en/low"}


def test_scope_names_are_safe_folders():
    assert safe_scope("rewrites_easy/pt|high") == "rewrites_easy/pt/high"
    assert safe_scope("../../etc") == "etc"
    assert safe_scope(None) == "adhoc" and safe_scope("") == "adhoc"
    assert id_key("f" * 64) == 2**64 - 1


def test_a_crash_between_segment_and_index_is_repaired_by_the_next_lookup(tmp_path):
    reqs = make_requests(6)
    engine = _engine(tmp_path)
    engine.run(reqs, scope="x")
    indexed = engine.cache.index_keys("x")
    assert indexed
    for key in indexed:
        engine.cache.storage.delete(key)
    assert engine.cache.index_keys("x") == []
    backend = DeterministicTestBackend()
    again = _engine(tmp_path, backend)
    assert again.run(reqs, scope="x").sent == 0 and backend.sent == []
    assert again.cache.index_keys("x") == indexed, "the index was rewritten"


# -- writes off the hot path -------------------------------------------------------------------------
class RecordingStorage(LocalStorage):
    def __init__(self, root, fail_after=None):
        super().__init__(root)
        self.threads, self.fail_after, self.writes = set(), fail_after, 0

    def write_parquet(self, key, frame):
        self.threads.add(threading.current_thread().name)
        self.writes += 1
        if self.fail_after is not None and self.writes > self.fail_after:
            raise OSError("disk full")
        return super().write_parquet(key, frame)


def test_segments_are_written_by_a_background_thread(tmp_path):
    storage = RecordingStorage(tmp_path)
    engine = _engine(tmp_path, storage=storage, flush_every=4)
    report = engine.run(make_requests(20))
    assert report.sent == 20 and storage.threads == {"synth-cpt-cache-writer"}, storage.threads


def test_a_failed_write_fails_the_run_instead_of_losing_rows_quietly(tmp_path):
    storage = RecordingStorage(tmp_path, fail_after=2)
    engine = _engine(tmp_path, storage=storage, flush_every=4)
    with pytest.raises(RuntimeError, match="generation cache write failed: OSError: disk full"):
        engine.run(make_requests(40))


def test_the_cache_reads_s3_with_ranged_reads_not_downloads(s3_bucket, monkeypatch):
    _, bucket = s3_bucket
    storage = S3Storage(f"s3://{bucket}/home")
    reqs = make_requests(12)
    engine = _engine(None, storage=storage, flush_every=4)
    assert engine.run(reqs, scope="p").sent == 12

    def no_downloads(self, key):
        raise AssertionError(f"downloaded {key} whole")

    monkeypatch.setattr(S3Storage, "local_path", no_downloads)
    again = _engine(None, storage=S3Storage(f"s3://{bucket}/home"))
    assert again.run(reqs, scope="p").sent == 0
    rows = again.results(reqs, scope="p")
    assert rows.height == 12 and rows["text"].str.starts_with("answer").all()
    assert again.cache.compact()["segments_after"] == 1
    assert again.results(reqs, scope="p").height == 12


def test_every_pending_request_is_prepared_once(tmp_path):
    seen = []

    class Recording(Backend):
        name = "recording-double"

        def generate(self, batch, on_result):
            items = list(batch)
            seen.extend(p.request_id for p in items)
            for p in items:
                on_result(p, Generation(p.request_id, "x", "stop", 1, 1, 1, 0.0))

    reqs = make_requests(10, duplicates=5)
    _engine(tmp_path, Recording()).run(reqs)
    assert len(seen) == len(set(seen)) == 10


# -- speculative decoding: asked for by prompt files, decided when the engine loads ------------------
class LLMConstructorDouble:
    """Test double of `vllm.LLM`: records the engine arguments it was built with."""

    built: list = []

    def __init__(self, model, **kwargs):
        LLMConstructorDouble.built.append(kwargs)


@pytest.mark.parametrize(
    "mode, asks, temperature, expected",
    [
        ("auto", True, 0.0, True),  # a copy-heavy prompt decoded greedily: where it pays
        ("auto", True, 0.7, False),  # sampled: rejection sampling costs more than it saves on CPU
        ("auto", False, 0.0, False),
        ("on", False, 0.7, True),
        ("off", True, 0.0, False),
    ],
)
def test_speculation_is_loaded_where_it_pays(monkeypatch, mode, asks, temperature, expected):
    import vllm

    from synth_cpt.defs.resources import LLM

    monkeypatch.setattr(vllm, "LLM", LLMConstructorDouble)
    LLMConstructorDouble.built.clear()
    backend = LLM(speculative=mode).build_backend("model-folder")
    req = ChatRequest.chat([{"role": "user", "content": "x"}], Sampling(temperature=temperature, speculative=asks))
    backend.prepare([Prepared(req, req.request_id("fp"), 1)])
    args = LLMConstructorDouble.built[-1]
    assert ("speculative_config" in args) == expected
    if expected:
        assert args["speculative_config"] == {
            "method": "ngram",
            "num_speculative_tokens": 4,
            "prompt_lookup_max": 4,
            "prompt_lookup_min": 2,
        }
        assert backend.config()["speculative_config"]["method"] == "ngram", "recorded in engine_config"


def test_speculation_is_not_part_of_the_request_id():
    a = ChatRequest.chat([{"role": "user", "content": "x"}], Sampling(speculative=True))
    b = ChatRequest.chat([{"role": "user", "content": "x"}], Sampling(speculative=False))
    assert a.request_id("fp") == b.request_id("fp")
    with pytest.raises(ValueError, match="'speculative' must be greedy-only, always or never"):
        Sampling.from_dict({"speculative": "yes"}, where="prompt x.yaml: sampling")


# -- review findings: failures-only segments, checks that raise, nested scopes, S3 errors -------------
class CountingWrites(LocalStorage):
    def __init__(self, root):
        super().__init__(root)
        self.writes = []

    def write_bytes(self, key, data):
        self.writes.append(key)
        return super().write_bytes(key, data)

    def writing(self, key):
        self.writes.append(key)
        return super().writing(key)


def test_a_segment_of_failures_only_is_indexed_once(tmp_path):
    reqs = make_requests(4)
    ids = [r.request_id("fp") for r in reqs]
    failing = _engine(tmp_path, DeterministicTestBackend(fail_ids=set(ids)))
    assert failing.run(reqs, scope="s").failed == 4
    storage = CountingWrites(tmp_path)
    looker = GenerationCache(storage)
    assert looker.finished_ids(ids, "s") == set() and looker.finished_ids(ids, "s") == set()
    assert storage.writes == [], "a lookup never rewrites the index of a failures-only segment"


def test_a_check_that_raises_rejects_the_output_not_the_batch(tmp_path):
    engine = _engine(tmp_path)
    engine_check = __import__("synth_cpt.generation.engine", fromlist=["output_rejection"])
    original = engine_check.output_rejection

    def exploding(request, gen):
        raise RecursionError("maximum recursion depth exceeded")

    engine_check.output_rejection = exploding
    try:
        report = engine.run(make_requests(3))
    finally:
        engine_check.output_rejection = original
    assert report.succeeded == 3 and report.rejected == 3
    assert engine.cache.load()["rejected"].str.starts_with("check failed: RecursionError").all()


def test_compacting_a_parent_scope_leaves_nested_scopes_alone(tmp_path):
    _engine(tmp_path, flush_every=2).run(make_requests(6), scope="rewrites_easy")
    _engine(tmp_path, flush_every=2).run(make_requests(12)[6:], scope="rewrites_easy/pt/high")
    cache = GenerationCache(LocalStorage(tmp_path))
    nested_before = cache.segment_keys("rewrites_easy/pt/high")
    cache.compact("rewrites_easy")
    assert cache.segment_keys("rewrites_easy/pt/high") == nested_before
    assert len([k for k in cache.segment_keys("rewrites_easy") if k.count("/") == 3]) == 1


def test_on_s3_a_failed_read_is_not_taken_for_a_missing_file(s3_bucket, monkeypatch):
    _, bucket = s3_bucket
    storage = S3Storage(f"s3://{bucket}/home")
    key = "generations/segments/s/20261122T000000404000-seg-host-1-404.parquet"  # "404" in the name
    storage.write_parquet(key, pa.table({"a": [1]}))
    assert not storage.vanished(key, OSError("AWS Error SLOW_DOWN during HeadObject operation: 503"))
    assert storage.vanished("generations/segments/s/gone.parquet", OSError("any"))
    with pytest.raises(FileNotFoundError):
        storage.parquet_file("generations/segments/s/gone.parquet")


def test_a_check_that_raises_on_a_chain_link_rejects_that_output_not_the_run(tmp_path, monkeypatch):
    """The follow path judges each output as the cache writer does: a raising check is a rejection."""
    import synth_cpt.generation.engine as engine_module

    def boom(request, gen):
        raise RuntimeError("checker broke")

    monkeypatch.setattr(engine_module, "output_rejection", boom)
    seen = []
    reqs = make_requests(3)
    report = _engine(tmp_path).run(reqs, follow=lambda rid, gen: seen.append(gen.rejected) or [])
    assert report.sent == 3 and seen == ["check failed: RuntimeError: checker broke"] * 3
