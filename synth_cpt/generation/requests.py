"""What is asked of the model, and the content address of each ask.

`request_id` = SHA-256 of (model fingerprint, messages, sampling parameters, base seed). The seed
the engine sends is derived from `request_id`, so a request is reproducible on its own and two
identical asks are the same request wherever they come from. Sampling fields added later
(EXTRA_DEFAULTS) and a retry's `attempt` enter it only when set, so ids already cached stay valid.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from synth_cpt.core.secrets import redact

Message = dict[str, str]
MAX_STOP = 16
# Sampling fields added after ids were first stored, with vLLM's defaults: a request carries them in its
# id and payload only when it sets them, so the ids already cached on disk stay valid.
EXTRA_DEFAULTS: dict[str, float] = {"repetition_penalty": 1.0, "min_p": 0.0, "presence_penalty": 0.0, "frequency_penalty": 0.0}
# When a request asks for n-gram speculative decoding (with `generation.speculative: auto`): only when decoded
# greedily (temperature 0), whatever the temperature, or never. true and false are the old spellings.
SPECULATIVE = ("greedy-only", "always", "never")
SPECULATIVE_OLD = {True: "greedy-only", False: "never"}


def speculative_mode(value: Any) -> str:
    """`speculative` as one of SPECULATIVE (true -> greedy-only, false -> never)."""
    if isinstance(value, bool):
        return SPECULATIVE_OLD[value]
    if value in SPECULATIVE:
        return value
    raise ValueError(
        f"'speculative' must be greedy-only, always or never (true and false, the old spellings, mean greedy-only and never), got {_short(value)}"
    )


def stop_sequences(value: Any) -> tuple[str, ...]:
    """`stop` as a tuple: one string is one sequence (never its characters), a list holds up to MAX_STOP non-empty strings."""
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(s, str) and s for s in items):
        raise ValueError(f"'stop' must be a non-empty string or a list of non-empty strings, got {_short(value)}")
    if len(items) > MAX_STOP:
        raise ValueError(f"'stop' has {len(items)} sequences, at most {MAX_STOP} are allowed")
    return tuple(items)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.7
    top_p: float = 1.0
    max_tokens: int = 256
    stop: tuple[str, ...] = ()
    seed: int = 0  # base seed; the engine sends one derived from request_id
    # Copy-heavy prompts (rewrites) ask for n-gram speculative decoding: greedy-only | always | never (see
    # SPECULATIVE). Not part of request_id: speculation changes how fast tokens come, not the distribution.
    speculative: str = "never"
    repetition_penalty: float = EXTRA_DEFAULTS["repetition_penalty"]  # > 1 discourages any token already in prompt or output
    min_p: float = EXTRA_DEFAULTS["min_p"]  # drop tokens less likely than min_p times the most likely one
    presence_penalty: float = EXTRA_DEFAULTS["presence_penalty"]  # OpenAI semantics, on tokens already generated
    frequency_penalty: float = EXTRA_DEFAULTS["frequency_penalty"]

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop", stop_sequences(self.stop))
        object.__setattr__(self, "speculative", speculative_mode(self.speculative))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None, where: str = "") -> Sampling:
        """The one parser of sampling fields (prompt files, `synth-cpt generate` input); errors name `where` and the field.

        Other keys of `d` are left alone (a generate input line also holds its messages).
        """
        prefix = f"{where}: " if where else ""
        if d is None:
            d = {}
        if not isinstance(d, Mapping):
            raise ValueError(f"{prefix}sampling fields must be a mapping, got {_short(d)}")

        def number(key: str, kind: type) -> Any:
            value = d.get(key, getattr(cls, key))
            try:
                if isinstance(value, bool) or (kind is int and isinstance(value, float) and not value.is_integer()):
                    raise ValueError
                return kind(value)
            except (TypeError, ValueError):
                raise ValueError(f"{prefix}'{key}' must be {'an integer' if kind is int else 'a number'}, got {_short(value)}") from None

        try:
            stop = stop_sequences(d.get("stop"))
            speculative = speculative_mode(d.get("speculative", cls.speculative))
        except ValueError as exc:
            raise ValueError(f"{prefix}{exc}") from None
        temperature, top_p, max_tokens = number("temperature", float), number("top_p", float), number("max_tokens", int)
        if not 0 <= temperature <= 2:
            raise ValueError(f"{prefix}'temperature' must be in [0, 2], got {temperature:g}")
        if not 0 < top_p <= 1:
            raise ValueError(f"{prefix}'top_p' must be in (0, 1], got {top_p:g}")
        if max_tokens < 1:
            raise ValueError(f"{prefix}'max_tokens' must be at least 1, got {max_tokens}")
        # vLLM's own ranges, checked here so a bad value fails at load rather than on every request of a run
        extras = {key: number(key, float) for key in EXTRA_DEFAULTS}
        if not (math.isfinite(extras["repetition_penalty"]) and extras["repetition_penalty"] > 0):
            raise ValueError(f"{prefix}'repetition_penalty' must be a finite number above 0, got {extras['repetition_penalty']:g}")
        if not 0 <= extras["min_p"] <= 1:
            raise ValueError(f"{prefix}'min_p' must be in [0, 1], got {extras['min_p']:g}")
        for key in ("presence_penalty", "frequency_penalty"):
            if not -2 <= extras[key] <= 2:
                raise ValueError(f"{prefix}'{key}' must be in [-2, 2], got {extras[key]:g}")
        return cls(
            temperature=temperature, top_p=top_p, max_tokens=max_tokens, stop=stop, seed=number("seed", int),
            speculative=speculative, **extras,
        )  # fmt: skip

    def extras(self) -> dict[str, float]:
        """The fields of EXTRA_DEFAULTS this sampling sets to something else: only these go into the id and the
        OpenAI payload (a server that does not know `repetition_penalty` or `min_p` is not sent them needlessly)."""
        return {key: getattr(self, key) for key, default in EXTRA_DEFAULTS.items() if getattr(self, key) != default}

    def as_dict(self) -> dict[str, Any]:
        return {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "max_tokens": self.max_tokens,
            "stop": list(self.stop),
            "seed": self.seed,
            **self.extras(),
        }


@dataclass(frozen=True)
class ChatRequest:
    messages: tuple[tuple[str, str], ...]  # (role, content) pairs: hashable and ordered
    sampling: Sampling = field(default_factory=Sampling)
    prompt_name: str = ""
    prompt_sha: str = ""
    json_schema: str | None = None  # JSON text of a schema the output must follow
    # A retry of an answer that could not be used (EntiGraph step 1 until its JSON parses): a new request id,
    # so a new seed and a new cache row. Part of the id only when > 0, so first attempts keep their ids.
    attempt: int = 0

    @classmethod
    def chat(cls, messages: list[Message], sampling: Sampling | None = None, **kw: Any) -> "ChatRequest":
        schema = kw.pop("json_schema", None)
        return cls(
            messages=tuple((m["role"], m["content"]) for m in messages),
            sampling=sampling or Sampling(),
            json_schema=json.dumps(schema, sort_keys=True) if isinstance(schema, dict) else schema,
            **kw,
        )

    def message_dicts(self) -> list[Message]:
        return [{"role": r, "content": c} for r, c in self.messages]

    @property
    def schema(self) -> dict | None:
        return json.loads(self.json_schema) if self.json_schema else None

    def rendered(self) -> str:
        """A stable text form of the conversation (for ordering, prefix grouping and storage)."""
        return json.dumps(self.message_dicts(), ensure_ascii=False)

    def request_id(self, model_fingerprint: str) -> str:
        payload = {
            "model_fingerprint": model_fingerprint,
            "messages": self.message_dicts(),
            "sampling": self.sampling.as_dict(),
            "json_schema": self.json_schema,
        }
        if self.attempt:
            payload["attempt"] = self.attempt
        return hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()


def derived_seed(request_id: str) -> int:
    """The per-request seed sent to the engine: reproducible, different for every request."""
    return int(request_id[:8], 16) & 0x7FFFFFFF


@dataclass
class Generation:
    """One finished call: what came back, or why nothing usable did."""

    request_id: str
    text: str | None
    finish_reason: str | None
    prompt_tokens: int | None
    completion_tokens: int | None
    attempts: int
    latency_s: float
    error: str | None = None  # set: the call failed (retried on the next run)
    rejected: str | None = None  # set: the call worked but the output broke its contract (kept, not retried)

    @classmethod
    def failure(cls, request_id: str, error: str, attempts: int = 1, latency_s: float = 0.0) -> "Generation":
        # a reason may quote a server's body or an exception's URL: no key goes into the cache or the run's events
        return cls(request_id, None, None, None, None, attempts, latency_s, error=redact(error)[:500])

    @property
    def ok(self) -> bool:
        return self.error is None
