"""repetition_penalty, min_p, presence_penalty, frequency_penalty: from prompt files and generate input to both backends.

They change what the model writes, so they are part of the request id, but only when set: ids of requests
that leave them at their defaults must stay what they were, or every cache on users' disks would be lost.
"""

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import yaml

from synth_cpt.generation.backends import Feed, OpenAIBackend, Prepared, VLLMBackend
from synth_cpt.generation.requests import ChatRequest, Sampling

from .fault_server import send

SET = {"repetition_penalty": 1.15, "min_p": 0.05, "presence_penalty": 0.5, "frequency_penalty": -0.25}
DEFAULTS = {"repetition_penalty": 1.0, "min_p": 0.0, "presence_penalty": 0.0, "frequency_penalty": 0.0}
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Olá, mundo"}]


def write_prompt(root, sampling):
    path = root / "rewrite" / "p.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({"name": "p", "description": "a test prompt", "user": "{{ text }}", "sampling": sampling}))
    return path


def test_prompt_file_fields_reach_the_requests(tmp_path):
    from synth_cpt.synthesis.prompts import load_prompt

    write_prompt(tmp_path, {"temperature": 0.6, **SET})
    request = load_prompt("rewrite", "p", root=tmp_path).request("en", seed=3, text="hello")
    assert {k: getattr(request.sampling, k) for k in SET} == SET
    assert request.sampling.temperature == 0.6 and request.sampling.seed == 3
    assert {k: request.sampling.as_dict()[k] for k in SET} == SET, "stored with the row and hashed into the id"


@pytest.mark.parametrize(
    ("field", "value", "complaint"),
    [
        ("repetition_penalty", 0, "above 0"),
        ("repetition_penalty", -1.2, "above 0"),
        ("repetition_penalty", float("inf"), "above 0"),
        ("min_p", 1.5, r"\[0, 1\]"),
        ("min_p", -0.1, r"\[0, 1\]"),
        ("presence_penalty", 2.5, r"\[-2, 2\]"),
        ("presence_penalty", float("nan"), r"\[-2, 2\]"),
        ("frequency_penalty", -3, r"\[-2, 2\]"),
        ("repetition_penalty", "high", "a number"),
        ("min_p", True, "a number"),
        ("presence_penalty", None, "a number"),
        ("frequency_penalty", [0.5], "a number"),
    ],
)
def test_bad_values_refused_at_load_with_file_and_field(tmp_path, field, value, complaint):
    from synth_cpt.synthesis.prompts import load_prompt

    path = write_prompt(tmp_path, {field: value})
    with pytest.raises(ValueError, match=f"'{field}' must be .*{complaint}") as err:
        load_prompt("rewrite", "p", root=tmp_path)
    assert str(path) in str(err.value)
    with pytest.raises(ValueError, match=f"^x.yaml: '{field}' must be"):
        Sampling.from_dict({field: value}, where="x.yaml")


def test_edges_of_the_ranges_are_accepted():
    low = Sampling.from_dict({"repetition_penalty": 0.01, "min_p": 0, "presence_penalty": -2, "frequency_penalty": -2})
    high = Sampling.from_dict({"repetition_penalty": 3, "min_p": 1, "presence_penalty": 2, "frequency_penalty": 2.0})
    assert (low.min_p, low.presence_penalty, high.min_p, high.frequency_penalty) == (0.0, -2.0, 1.0, 2.0)
    assert (low.repetition_penalty, low.frequency_penalty, high.repetition_penalty, high.presence_penalty) == (0.01, -2.0, 3.0, 2.0)
    assert isinstance(high.repetition_penalty, float)


def test_generate_input_lines_carry_the_fields(tmp_path):
    from synth_cpt.cli.generation import _read_chat_requests

    path = tmp_path / "in.jsonl"
    path.write_text(json.dumps({"messages": MESSAGES, **SET}) + "\n" + json.dumps({"messages": MESSAGES}) + "\n")
    set_, plain = _read_chat_requests(str(path))
    assert {k: getattr(set_.sampling, k) for k in SET} == SET
    assert plain.sampling == Sampling()


# -- request ids ------------------------------------------------------------------------------------
# Computed on the code before these fields existed: the id of this request must never change.
OLD_ID = "41caa0d466820a16f98f8e54957fec59cdda057023ab55a16dd68a1c0384f338"


def _old_request(**sampling):
    s = Sampling(temperature=0.3, top_p=0.9, max_tokens=64, stop=("###",), seed=5, **sampling)
    return ChatRequest.chat(MESSAGES, s, json_schema={"type": "object"})


def _old_recipe(request: ChatRequest, fingerprint: str) -> str:
    """The id as it was computed before the new fields: the five original sampling keys only."""
    s = request.sampling
    payload = {
        "model_fingerprint": fingerprint,
        "messages": request.message_dicts(),
        "sampling": {"temperature": s.temperature, "top_p": s.top_p, "max_tokens": s.max_tokens, "stop": list(s.stop), "seed": s.seed},
        "json_schema": request.json_schema,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()


def test_default_requests_keep_their_ids(tmp_path):
    from synth_cpt.synthesis.prompts import load_prompt

    assert _old_request().request_id("fp-1") == OLD_ID
    assert _old_request(**DEFAULTS).request_id("fp-1") == OLD_ID, "set to the default is the same as not set"
    assert Sampling.from_dict(DEFAULTS) == Sampling()
    write_prompt(tmp_path, {"temperature": 0.2, "stop": "###", "repetition_penalty": 1.0})
    request = load_prompt("rewrite", "p", root=tmp_path).request("en", seed=9, text="hello")
    assert request.request_id("fp") == _old_recipe(request, "fp")
    assert request.sampling.as_dict().keys() == {"temperature", "top_p", "max_tokens", "stop", "seed"}


@pytest.mark.parametrize("field", list(SET))
def test_each_field_changes_the_id(field):
    ids = {_old_request(**{field: value}).request_id("fp-1") for value in (DEFAULTS[field], SET[field], SET[field] / 2)}
    assert len(ids) == 3 and OLD_ID in ids


# -- backends ---------------------------------------------------------------------------------------
class RecordingServerDouble:
    """An OpenAI-compatible chat server on 127.0.0.1 that keeps every request body and answers "ok"."""

    def __init__(self) -> None:
        self.bodies: dict[str, dict] = {}
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.bodies[body["messages"][-1]["content"]] = body
                data = json.dumps(
                    {
                        "choices": [{"message": {"content": "ok"}, "finish_reason": "stop"}],
                        "usage": {"prompt_tokens": 1, "completion_tokens": 1},
                    }
                ).encode()
                send(self, 200, data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def test_openai_payload_holds_exactly_the_set_fields():
    asks = {
        "plain": {},
        "at defaults": DEFAULTS,
        "all": SET,
        "some": {"min_p": 0.1, "frequency_penalty": 0.5},
    }
    prepared = []
    for content, fields in asks.items():
        req = ChatRequest.chat([{"role": "user", "content": content}], Sampling.from_dict({"max_tokens": 8, **fields}))
        prepared.append(Prepared(req, req.request_id("fp"), 1))
    server = RecordingServerDouble()
    try:
        results = {}
        OpenAIBackend([server.url], "served-model", concurrency=2).generate(Feed(prepared), lambda p, g: results.update({p.request_id: g}))
    finally:
        server.stop()
    assert all(g.ok for g in results.values()) and len(results) == len(asks)
    for content, fields in asks.items():
        sent = {k: v for k, v in server.bodies[content].items() if k in SET}
        expected = {k: v for k, v in fields.items() if v != DEFAULTS[k]}
        assert sent == expected, content
    assert server.bodies["all"]["temperature"] == 0.7 and server.bodies["all"]["max_tokens"] == 8


def test_vllm_sampling_params_carry_the_fields():
    from vllm import SamplingParams

    backend = VLLMBackend("model-folder", {})
    req = ChatRequest.chat([{"role": "user", "content": "x"}], Sampling.from_dict({"temperature": 0.8, **SET}))
    params = backend.sampling_params(Prepared(req, req.request_id("fp"), 42))
    assert isinstance(params, SamplingParams)
    assert {k: getattr(params, k) for k in SET} == SET
    assert (params.temperature, params.seed) == (0.8, 42)
    plain = ChatRequest.chat([{"role": "user", "content": "x"}], Sampling())
    defaults = backend.sampling_params(Prepared(plain, plain.request_id("fp"), 1))
    assert {k: getattr(defaults, k) for k in SET} == DEFAULTS
    assert not backend.loaded, "building sampling params never loads a model"
