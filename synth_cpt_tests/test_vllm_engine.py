"""The real vLLM engine (CPU build) with the embedded SmolLM2-135M model: loaded once per session."""

import json

import jsonschema
import pytest

from synth_cpt.core.storage import LocalStorage
from synth_cpt.generation.backends import VLLMBackend
from synth_cpt.generation.cache import GenerationCache
from synth_cpt.generation.engine import GenerationEngine
from synth_cpt.generation.requests import ChatRequest, Sampling, derived_seed

pytestmark = pytest.mark.vllm

# Bounded, so constrained decoding ends whatever the model writes (greedy output differs between CPUs).
SCHEMA = {
    "type": "object",
    "properties": {
        "summary": {"type": "string", "maxLength": 160},
        "entities": {"type": "array", "maxItems": 4, "items": {"type": "string", "maxLength": 40}},
    },
    "required": ["summary", "entities"],
    "additionalProperties": False,
}


def _engine(backend, root, resource, identity):
    return GenerationEngine(
        backend, GenerationCache(LocalStorage(root)), model=identity,
        model_fingerprint=resource.model_fingerprint(identity), flush_every=16, flush_seconds=3600,
    )  # fmt: skip


def test_real_engine_chats_tokens_finish_reasons_and_json(vllm_session):
    backend, root, resource, identity, model_path = vllm_session
    topics = ["Lisboa", "o rio Tejo", "a fotossíntese", "GIMP layers", "a school network", "the moon", "o Brasil", "prime numbers"]
    chats = [
        ChatRequest.chat(
            [{"role": "user", "content": f"Write one short sentence about {t}."}],
            Sampling(temperature=0.7, max_tokens=48),
            prompt_name="it",
        )
        for t in topics
    ]
    short = ChatRequest.chat(
        [{"role": "user", "content": "Count from one to one hundred in words."}], Sampling(temperature=0.0, max_tokens=5)
    )
    structured = [
        ChatRequest.chat(
            [{"role": "user", "content": f"Return JSON with a one-sentence summary and the entities of: {text}"}],
            Sampling(temperature=0.0, max_tokens=256),
            json_schema=SCHEMA,
        )  # fmt: skip
        for text in ("Lisbon is the capital of Portugal.", "Marie Curie worked in Paris.")
    ]
    requests = chats + [short] + structured
    engine = _engine(backend, root, resource, identity)
    report = engine.run(requests)
    assert (report.sent, report.succeeded, report.failed) == (11, 11, 0), report.failures
    rows = {r["request_id"]: r for r in engine.results(requests).iter_rows(named=True)}
    assert len(rows) == 11

    # What the machinery guarantees, never what the model writes (that differs between CPUs).
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    for req in requests:
        row = rows[req.request_id(engine.fingerprint)]
        assert row["finish_reason"] in ("stop", "length")
        assert 0 < row["completion_tokens"] <= req.sampling.max_tokens
        assert (row["finish_reason"] == "length") <= (row["completion_tokens"] == req.sampling.max_tokens)
        expected = len(
            tok.apply_chat_template(req.message_dicts(), add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
        )
        assert row["prompt_tokens"] == expected, "prompt tokens come from the engine"
        assert row["model_fingerprint"] == engine.fingerprint and row["seed"] == derived_seed(row["request_id"])
    for req in structured:
        row = rows[req.request_id(engine.fingerprint)]
        if row["rejected"] is None:  # usable: valid JSON that follows the schema
            jsonschema.validate(json.loads(row["text"]), SCHEMA)
        else:  # or rejected with its reason, never silently kept
            assert row["rejected"].startswith(("truncated", "invalid JSON", "schema violation", "no JSON")), row["rejected"]
            assert (row["finish_reason"] == "length") == row["rejected"].startswith("truncated")
            assert report.rejections[row["request_id"]] == row["rejected"]

    # a second call is served from the cache and never loads an engine
    fresh = VLLMBackend(model_path, resource.engine_args())
    again = _engine(fresh, root, resource, identity).run(requests)
    assert (again.sent, again.cache_hits) == (0, 11)
    assert not fresh.loaded


def test_real_engine_accounts_for_a_prompt_longer_than_the_model_allows(vllm_session):
    """vLLM refuses it in add_request: it fails with its reason and the requests after it still run."""
    backend, root, resource, identity, model_path = vllm_session
    too_long = ChatRequest.chat([{"role": "user", "content": "palavra " * 3000}], Sampling(temperature=0.0, max_tokens=4))
    fine = [ChatRequest.chat([{"role": "user", "content": f"Say {i}."}], Sampling(temperature=0.0, max_tokens=4)) for i in range(3)]
    saved = backend.max_in_flight
    backend.max_in_flight = 1  # the refused request's slot must be refilled
    try:
        report = _engine(backend, root, resource, identity).run([too_long, *fine])
    finally:
        backend.max_in_flight = saved
    assert (report.sent, report.succeeded, report.failed) == (4, 3, 1)
    assert "vllm refused the request" in report.failures[too_long.request_id(resource.model_fingerprint(identity))]


def test_real_engine_takes_chain_links_pushed_while_it_runs(vllm_session, tmp_path):
    """The vLLM step loop sends a link pushed from a result (autoregressive chunking) in the same run,
    and each link's request carries the text its previous link generated."""
    backend, root, resource, identity, model_path = vllm_session
    links = 3

    def link(chain: int, k: int, before: str = "") -> ChatRequest:
        content = f"Chain {chain}, step {k}. Continue in one short sentence: {before[-80:]}"
        return ChatRequest.chat([{"role": "user", "content": content}], Sampling(temperature=0.0, max_tokens=12))

    made: dict[str, tuple[int, int, str]] = {}
    engine = _engine(backend, tmp_path, resource, identity)

    def follow(rid, gen):
        chain, k, _ = made[rid]
        if not gen.ok or k + 1 == links:
            return []
        nxt = link(chain, k + 1, gen.text)
        made[engine.request_ids([nxt])[0]] = (chain, k + 1, gen.text)
        return [nxt]

    first = [link(c, 0) for c in range(2)]
    made.update({rid: (c, 0, "") for c, rid in enumerate(engine.request_ids(first))})
    report = engine.run(first, follow=follow)
    assert (report.sent, report.succeeded, report.failed) == (2 * links, 2 * links, 0), report.failures
    rows = {r["request_id"]: r for r in engine.cache.load().to_dicts()}
    assert sorted(k for _, k, _ in made.values()) == [0, 0, 1, 1, 2, 2], "every link of both chains was made"
    for rid, (_, k, before) in made.items():
        assert rid in rows and (k == 0 or before[-80:] in json.loads(rows[rid]["messages"])[-1]["content"])
    again = engine.run(first, follow=follow)  # the chains resume wholly from the cache
    assert (again.sent, again.cache_hits) == (0, 2 * links)
