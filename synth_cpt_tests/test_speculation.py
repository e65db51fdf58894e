"""N-gram speculative decoding: what a prompt's `speculative` says happens, and the run metadata says what did.

The engine is `vllm.LLM` replaced by a constructor double: nothing is loaded, only the arguments recorded.
"""

from __future__ import annotations

import pytest

from synth_cpt.core.storage import LocalStorage
from synth_cpt.generation.backends import Prepared
from synth_cpt.generation.cache import GenerationCache
from synth_cpt.generation.engine import GenerationEngine
from synth_cpt.generation.requests import ChatRequest, Sampling


class LLMConstructorTestDouble:
    """Test double of `vllm.LLM`: records the engine arguments it was built with."""

    built: list = []

    def __init__(self, model, **kwargs):
        LLMConstructorTestDouble.built.append(kwargs)


@pytest.fixture
def constructor(monkeypatch):
    import vllm

    monkeypatch.setattr(vllm, "LLM", LLMConstructorTestDouble)
    LLMConstructorTestDouble.built.clear()
    return LLMConstructorTestDouble.built


def asking(mode, temperature: float, name: str = "rewrite/x") -> Prepared:
    req = ChatRequest.chat([{"role": "user", "content": "x"}], Sampling(temperature=temperature, speculative=mode), prompt_name=name)
    return Prepared(req, req.request_id("fp"), 1)


@pytest.mark.parametrize(
    "value, mode",
    [(True, "greedy-only"), (False, "never"), ("greedy-only", "greedy-only"), ("always", "always"), ("never", "never"), (None, "never")],
)
def test_speculative_spellings(value, mode):
    fields = {} if value is None else {"speculative": value}
    assert Sampling.from_dict(fields).speculative == mode


def test_speculative_rejects_anything_else():
    with pytest.raises(ValueError, match=r"prompt x.yaml: sampling: 'speculative' must be greedy-only, always or never .*got 'yes'"):
        Sampling.from_dict({"speculative": "yes"}, where="prompt x.yaml: sampling")


@pytest.mark.parametrize(
    "mode, temperature, on",
    [("always", 0.7, True), ("always", 0.0, True), ("greedy-only", 0.0, True), ("greedy-only", 0.7, False), ("never", 0.0, False)],
)
def test_auto_follows_what_the_prompt_says(constructor, mode, temperature, on):
    """Before, `auto` ignored a prompt's wish for every sampled style: there was no way to say `always`."""
    from synth_cpt.defs.resources import LLM

    backend = LLM(speculative="auto").build_backend("model-folder")
    backend.prepare([asking(mode, temperature)])
    assert ("speculative_config" in constructor[-1]) == on
    if on:
        assert backend.speculation() == "on (auto: 1 of 1 requests that loaded the engine ask for it: rewrite/x)"
    elif mode == "greedy-only":
        assert backend.speculation() == (
            "off (auto: none of the 1 requests that loaded the engine asks for it; greedy-only but sampled at temperature > 0: rewrite/x)"
        )
    else:
        assert backend.speculation() == "off (auto: none of the 1 requests that loaded the engine asks for it)"


@pytest.mark.parametrize(
    "setting, on, why", [("on", True, "on (generation.speculative: on)"), ("off", False, "off (generation.speculative: off)")]
)
def test_the_engine_setting_overrides_the_prompts(constructor, setting, on, why):
    from synth_cpt.defs.resources import LLM

    backend = LLM(speculative=setting).build_backend("model-folder")
    assert backend.speculation() == "off (no engine loaded)"
    backend.prepare([asking("always" if not on else "never", 0.7)])
    assert ("speculative_config" in constructor[-1]) == on and backend.speculation() == why
    backend.close()
    assert backend.speculation() == "off (no engine loaded)"


def test_the_run_report_and_the_engine_say_whether_it_speculated(constructor, tmp_path):
    """The decision is in the engine's run figures (and so in every generation asset's metadata)."""
    from synth_cpt.defs.resources import LLM

    backend = LLM(speculative="auto").build_backend("model-folder")
    engine = GenerationEngine(backend, GenerationCache(LocalStorage(tmp_path)), model="m", model_fingerprint="fp")
    report = engine.run([asking("always", 0.7).request])  # the constructor double has no engine: the request fails, accounted
    assert report.failed == 1
    assert (
        report.metadata()["speculation"]
        == engine.speculation()
        == "on (auto: 1 of 1 requests that loaded the engine ask for it: rewrite/x)"
    )
    assert backend.config()["speculative_config"]["method"] == "ngram", "recorded in every row's engine_config"


def test_a_served_backend_does_not_claim_to_know():
    from synth_cpt.generation.backends import OpenAIBackend

    assert OpenAIBackend(["http://127.0.0.1:9/v1"], "m").speculation() == "set by the server (not known here)"
