"""Test doubles for unit tests only. Never used by the package or selectable from configuration."""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterable

from synth_cpt.core.storage import LocalStorage
from synth_cpt.generation.backends import Backend, OnResult, Prepared
from synth_cpt.generation.requests import ChatRequest, Generation, Sampling


class DeterministicTestBackend(Backend):
    """Answers from a hash of (request_id, seed): the same request always gets the same text."""

    name = "test-double"

    def __init__(
        self,
        delay_s: float = 0.0,
        fail_ids: set[str] | None = None,
        sent_log: str | None = None,
        reply: Callable[[Prepared], str | None] | None = None,
    ) -> None:
        """`reply`: the text to answer a request with (None: the default answer), for tests of what
        synthesis does with given outputs."""
        self.delay_s = delay_s
        self.fail_ids = fail_ids or set()
        self.sent_log = sent_log
        self.reply = reply
        self.sent: list[str] = []
        self.batches: list[list[str]] = []
        self.prepared: list[Prepared] = []  # every request handed to `prepare`, as the engine hands them
        self.loads = 0  # "model loads": the first batch after creation or `close` loads, as VLLMBackend does
        self.loaded = False

    def version(self) -> str:
        return "1"

    def prepare(self, batch: list[Prepared] | None = None) -> None:
        self.prepared += batch or []
        if not self.loaded:
            self.loaded = True
            self.loads += 1

    def close(self) -> None:
        self.loaded = False

    def generate(self, batch: Iterable[Prepared], on_result: OnResult) -> None:
        """One at a time, in feed order (requests pushed by `on_result` are taken after the others)."""
        ids: list[str] = []
        self.batches.append(ids)  # the request ids of each generate call, in the order sent
        for p in batch:
            ids.append(p.request_id)
            self.send(p)
            on_result(p, self.answer(p))

    def send(self, p: Prepared) -> None:
        self.sent.append(p.request_id)
        if self.sent_log:
            with open(self.sent_log, "a") as f:
                f.write(p.request_id + "\n")
                f.flush()
                os.fsync(f.fileno())
        if self.delay_s:
            time.sleep(self.delay_s)

    def answer(self, p: Prepared) -> Generation:
        if p.request_id in self.fail_ids:
            return Generation.failure(p.request_id, "double: injected failure", attempts=3)
        digest = hashlib.sha256(f"{p.request_id}:{p.seed}".encode()).hexdigest()[:12]
        custom = self.reply(p) if self.reply else None
        if custom is not None:
            text = custom
        elif p.request.json_schema:
            text = json.dumps(instance_of(p.request.schema, digest))
        else:
            text = f"answer {digest} to {p.request.messages[-1][1][:30]}"
        return Generation(p.request_id, text, "stop", len(p.request.rendered()) // 4, 7, 1, 0.001)


class FlakyJsonTestBackend(DeterministicTestBackend):
    """Answers a structured request with text that is not JSON the first `bad_times` times its conversation
    is asked (whatever the request id: a retry asks the same conversation), then as the deterministic double."""

    def __init__(self, bad_times: int = 1, **kw) -> None:
        super().__init__(**kw)
        self.bad_times = bad_times
        self.asked: dict[str, int] = {}

    def answer(self, p: Prepared) -> Generation:
        if p.request.json_schema:
            seen = self.asked[p.request.rendered()] = self.asked.get(p.request.rendered(), 0) + 1
            if seen <= self.bad_times:
                return Generation(p.request_id, "Here are the entities: Cabral, Lisboa", "stop", 10, 7, 1, 0.001)
        return super().answer(p)


class SteppingTestBackend(DeterministicTestBackend):
    """Like vLLM's step loop: up to `max_in_flight` requests in the engine, the oldest finishing at each
    step, the engine topped up after every step. `in_flight` records how full it was at each step."""

    def __init__(self, max_in_flight: int, **kw) -> None:
        super().__init__(**kw)
        self.max_in_flight = max_in_flight
        self.in_flight: list[int] = []
        self.events: list[tuple[str, str]] = []  # ("add" | "done", request_id)

    def generate(self, batch: Iterable[Prepared], on_result: OnResult) -> None:
        ids: list[str] = []
        self.batches.append(ids)
        queue = iter(batch)
        running: list[Prepared] = []

        def fill() -> None:
            while len(running) < self.max_in_flight and (p := next(queue, None)) is not None:
                self.send(p)
                ids.append(p.request_id)
                self.events.append(("add", p.request_id))
                running.append(p)

        fill()
        while running:
            self.in_flight.append(len(running))
            p = running.pop(0)
            self.events.append(("done", p.request_id))
            on_result(p, self.answer(p))
            fill()


def instance_of(schema: dict, digest: str) -> object:
    """A small value that follows a (bounded) JSON schema, for structured requests."""
    kind = schema.get("type")
    if "enum" in schema:
        return schema["enum"][0]
    if kind == "object":
        if set(schema.get("properties", {})) == {"summary", "entities"}:  # EntiGraph step 1
            return {"summary": f"summary {digest}", "entities": ["a", digest]}
        return {k: instance_of(v, digest) for k, v in schema.get("properties", {}).items()}
    if kind == "array":
        return [instance_of(schema.get("items", {}), digest)]
    if kind == "boolean":
        return True
    if kind in ("integer", "number"):
        return 1
    return digest[: schema.get("maxLength", 12)]


def make_requests(n: int, duplicates: int = 0) -> list[ChatRequest]:
    reqs = [
        ChatRequest.chat(
            [
                {"role": "system", "content": "Rewrite faithfully."},
                {"role": "user", "content": f"Document number {i}: " + "palavra " * (i % 7)},
            ],
            Sampling(temperature=0.7, max_tokens=32),
            prompt_name="test",
            prompt_sha="abc",
        )
        for i in range(n)
    ]
    return reqs + reqs[:duplicates]


class RefusingDeleteTestStorage(LocalStorage):
    """Test double: local storage that records every removal in order and refuses to remove the folders named."""

    def __init__(self, root, refuse=()):
        super().__init__(root)
        self.refuse, self.removals = set(refuse), []

    def delete_prefix(self, prefix):
        self.removals.append(("folder", prefix))
        if prefix in self.refuse:
            raise PermissionError("read-only bucket")
        super().delete_prefix(prefix)

    def delete(self, key):
        self.removals.append(("file", key))
        super().delete(key)
