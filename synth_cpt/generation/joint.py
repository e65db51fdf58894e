"""One engine run for many runs at once.

A Dagster run of the generation assets computes every selected asset of every partition in its own
thread (`synthesis.schedule`), and each of their `GenerationEngine.run` calls hands its feed here
instead of driving the backend itself. One driver thread feeds the requests of all of them into the one
backend: while one asset waits for the next link of its chains, or finishes its last long requests,
the others keep the engine full. Each result goes back to the run that asked for it (to both, when two
runs asked the same request at once: it is sent once).

Partition by partition and asset by asset, the engine drained at the end of every asset and waited at
every chain link; this is what `benchmarks/graph.py` measures.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from synth_cpt.generation.backends import Backend, Feed, OnResult, Prepared
from synth_cpt.generation.requests import Generation

_FIRST = contextvars.ContextVar("synth_cpt_joint_first", default=False)


@contextlib.contextmanager
def served_first() -> Iterator[None]:
    """The engine runs started inside are served before the others: their results unlock more work (EntiGraph's
    entities gate its relations), so asking them first keeps the engine's queue deep until the end."""
    token = _FIRST.set(True)
    try:
        yield
    finally:
        _FIRST.reset(token)


class _Member:
    """One `GenerationEngine.run` waiting on the joint run: its feed, where its results go, and how many of
    its requests are in the engine."""

    def __init__(self, feed: Feed, on_result: OnResult, first: bool = False) -> None:
        self.feed = feed
        self.on_result = on_result
        self.first = first
        self.outstanding = 0
        self.error: BaseException | None = None
        self.done = threading.Event()


class _Merged:
    """The feed the backend sees: the members' feeds taken in turn, one request at a time."""

    def __init__(self, joint: JointBackend) -> None:
        self.joint = joint

    def __iter__(self) -> _Merged:
        return self

    def __next__(self) -> Prepared:
        p = self.joint._take()
        if p is None:
            raise StopIteration
        return p

    def __len__(self) -> int:
        return self.joint.queued()


class JointBackend(Backend):
    """Wraps the backend of one engine so that concurrent runs share a single stream into it."""

    def __init__(
        self, inner: Backend, log: Callable[[str], None] | None = None, log_every_s: float = 10.0, probes: list[Prepared] | None = None
    ) -> None:
        self.inner = inner
        self.probes = probes or []  # what the engine's load decides speculation from (every prompt of the run), if given
        self.name = inner.name
        self.log = log
        self.log_every_s = log_every_s
        self._cond = threading.Condition()
        self._members: list[_Member] = []
        self._turn = 0
        self._asked: dict[str, list[tuple[_Member, Prepared]]] = {}  # request_id in the engine -> the runs waiting for it
        self._driver: threading.Thread | None = None
        self._closed = False
        self._load = threading.Lock()
        self.runs = 0  # engine runs served
        self.drives = 0  # times the inner backend was started: 1 when the engine never ran dry while a run still had work
        self.sent = 0
        self.shared = 0  # requests two runs asked at once, sent once
        self.most_runs_at_once = 0
        self._started = 0.0
        self._last_log = 0.0

    # -- what the engine and the runs' metadata read: the inner backend's ----------------------------
    @property
    def loads(self) -> int:  # type: ignore[override]
        return self.inner.loads

    @property
    def load_seconds(self) -> float:  # type: ignore[override]
        return self.inner.load_seconds

    def version(self) -> str:
        return self.inner.version()

    def config(self) -> dict[str, Any]:
        return self.inner.config()

    def speculation(self) -> str:
        return self.inner.speculation()

    def prepare(self, batch: list[Prepared] | None = None) -> None:
        # the first run to get here loads the model; the others wait. Speculation is decided from the probes (every
        # prompt of the joint run) when given, so it does not depend on which run's thread came first
        with self._load:
            self.inner.prepare(self.probes or batch)

    def figures(self) -> dict[str, int]:
        return {
            "joint_runs": self.runs, "joint_runs_at_once_max": self.most_runs_at_once, "joint_engine_starts": self.drives,
            "joint_sent": self.sent, "joint_shared_requests": self.shared,
        }  # fmt: skip

    # -- the runs' side -------------------------------------------------------------------------------
    def generate(self, batch: Feed, on_result: OnResult) -> None:
        """Called by each run's thread: its requests join the joint stream; returns when every one of
        them (and every link pushed from its `on_result`) has been answered."""
        member = _Member(batch, on_result, first=_FIRST.get())
        with self._cond:
            if self._closed:
                raise RuntimeError("the joint engine run is closed")
            self._members.append(member)
            self.runs += 1
            self.most_runs_at_once = max(self.most_runs_at_once, len(self._members))
            if self._driver is None:
                self._started = self._last_log = time.monotonic()
                self._driver = threading.Thread(target=self._drive, name="synth-cpt-joint-engine", daemon=True)
                self._driver.start()
            self._cond.notify_all()
        member.done.wait()
        if member.error is not None:
            raise member.error

    def close(self) -> None:
        """Stop the driver (not the inner backend: `release_engines` owns it). Nothing new is sent; what is in
        the engine is still answered and handed to its run (so it is cached), then runs still waiting fail."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._driver is not None and self._driver is not threading.current_thread():
            self._driver.join()
        with self._cond:
            for m in self._members:
                m.error = m.error or RuntimeError("the joint engine run was closed before this run ended")
                m.done.set()
            self._members.clear()

    # -- the driver -----------------------------------------------------------------------------------
    def queued(self) -> int:
        with self._cond:
            return sum(len(m.feed) for m in self._members)

    def _take(self) -> Prepared | None:
        """The next request: from the runs served first, if one has a request, else from the next run in turn;
        None when no run has one now."""
        with self._cond:
            while self._members and not self._closed:
                n = len(self._members)
                order = sorted(range(n), key=lambda i: (not self._members[i].first, (i - self._turn) % n))
                for i in order:
                    m = self._members[i]
                    p = next(m.feed, None)
                    if p is not None:
                        self._turn = (i + 1) % n
                        break
                else:
                    return None
                m.outstanding += 1
                waiting = self._asked.setdefault(p.request_id, [])
                waiting.append((m, p))
                if len(waiting) == 1:
                    self.sent += 1
                    return p
                self.shared += 1  # already in the engine for another run: answered once, for both
            return None

    def _on_result(self, p: Prepared, gen: Generation) -> None:
        with self._cond:
            askers = self._asked.pop(p.request_id, [])
        for member, asked in askers:
            if member.error is None:
                try:
                    member.on_result(asked, gen)
                except BaseException as exc:  # this run fails (as it would alone); the others go on
                    member.error = exc
            with self._cond:
                member.outstanding -= 1
                last = member.error is None and member.outstanding == 0 and len(member.feed) == 0
            if last and member.feed.checkpoint is not None:  # its last result: written now, not when its thread closes it
                try:
                    member.feed.checkpoint()
                except BaseException as exc:
                    member.error = exc
            with self._cond:
                self._finish_if_done(member)
        self._checkpoint()
        self._progress()

    def _checkpoint(self) -> None:
        """Each run's writer flushes itself every `checkpoint_rows` of its own results, so N runs at once could hold
        N times that unwritten. Whenever together they hold that many, the fullest are flushed until at most half
        remains: a crash loses about one checkpoint of the joint run, and segments stay as large as they can."""
        with self._cond:
            members = [m for m in self._members if m.error is None and m.feed.checkpoint is not None and m.feed.buffered is not None]
        if not members:
            return
        rows = max(min(m.feed.checkpoint_rows for m in members), 1)
        sizes = sorted(((m.feed.buffered(), i) for i, m in enumerate(members)), reverse=True)  # type: ignore[misc]
        total = sum(size for size, _ in sizes)
        if total < rows:
            return
        for size, i in sizes:  # in the driver thread, as each writer's own add/flush: a run ends only after its last result
            if total <= rows // 2 or size == 0:
                break
            member = members[i]
            try:
                member.feed.checkpoint()  # type: ignore[misc]
            except BaseException as exc:  # that run's cache write failed: it fails, as it would alone
                with self._cond:
                    member.error = exc
                    self._finish_if_done(member)
            total -= size

    def _finish_if_done(self, member: _Member) -> None:
        if member in self._members and (member.error is not None or (member.outstanding == 0 and len(member.feed) == 0)):
            self._members.remove(member)
            member.done.set()

    def _drive(self) -> None:
        while True:
            with self._cond:
                for m in list(self._members):
                    self._finish_if_done(m)
                while not self._closed and not any(len(m.feed) for m in self._members):
                    self._cond.wait()
                if self._closed:
                    return
            self.drives += 1
            try:
                self.inner.generate(_Merged(self), self._on_result)  # type: ignore[arg-type]
            except BaseException as exc:  # the engine itself failed: every run it was serving fails with it
                with self._cond:
                    for m in list(self._members):
                        m.error = m.error or exc
                        self._finish_if_done(m)
                    self._asked.clear()
                continue
            with self._cond:  # the backend returned: what it still owes is lost, and those runs record it as such
                lost = {id(m): m for waiting in self._asked.values() for m, _ in waiting}
                self._asked.clear()
                for m in lost.values():
                    m.outstanding = 0
                    if m in self._members:
                        self._members.remove(m)
                        m.done.set()

    def _progress(self) -> None:
        if not self.log:
            return
        now = time.monotonic()
        if now - self._last_log < self.log_every_s:
            return
        self._last_log = now
        with self._cond:
            runs, queued, in_engine = len(self._members), sum(len(m.feed) for m in self._members), len(self._asked)
        rate = self.sent / max(now - self._started, 1e-9)
        self.log(f"joint engine run: {runs} run(s) generating, {in_engine:,} requests in the engine, {queued:,} queued, "
                 f"{self.sent:,} sent ({rate:,.1f}/s), {self.shared:,} shared")  # fmt: skip
