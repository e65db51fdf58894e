"""One pipeline step through the synth-cpt CLI, killed with SIGKILL at a chosen boundary (tests only):
`python -m synth_cpt_tests.crash_worker STEP CONFIG KILL_AT BOUNDARY ENGINE SENT_LOG`.

STEP: ingest | synthesize | mix | evals (the CLI command, with DAGSTER_HOME from the environment).
BOUNDARY: what is counted: `write` (every atomic storage write, twice: when it starts and when its
temporary file is complete, before the rename) or `result` (every generation result handed to the cache
writer). At the KILL_AT-th (1-based; 0: never) the process sends itself SIGKILL: no cleanup, no flush.
ENGINE: `double` (the test double answers, as in test_synthesis_dagster) or `real` (the configured
engine). SENT_LOG: every request id handed to the backend, one a line, prefixed with this process's pid.
On a normal exit the worker prints `TICKS <n>`: how many boundaries the step crossed.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

TICKS = [0]


def tick(kill_at: int) -> None:
    TICKS[0] += 1
    if TICKS[0] == kill_at:
        print(f"KILLING {kill_at}", flush=True)  # tells this kill from any other SIGKILL (the kernel's OOM killer)
        os.kill(os.getpid(), signal.SIGKILL)


def log_sent(sent_log: str, request_id: str) -> None:
    with open(sent_log, "a") as f:
        f.write(f"{os.getpid()} {request_id}\n")
        f.flush()
        os.fsync(f.fileno())


def install(kill_at: int, boundary: str, engine: str, sent_log: str) -> None:
    from synth_cpt.core.storage import LocalStorage
    from synth_cpt.generation.cache import SegmentWriter

    if boundary == "write":
        original = LocalStorage.writing

        @contextlib.contextmanager
        def writing(self: LocalStorage, key: str) -> Iterator[Path]:
            tick(kill_at)  # before anything is written
            with original(self, key) as tmp:
                yield tmp
                tick(kill_at)  # the temporary file is complete, not yet renamed into place

        LocalStorage.writing = writing  # type: ignore[method-assign]
    elif boundary == "result":
        add = SegmentWriter.add

        def counted_add(self: SegmentWriter, request, seed, gen) -> None:  # type: ignore[no-untyped-def]
            add(self, request, seed, gen)
            tick(kill_at)  # the result is in the writer's buffer, maybe not yet in a segment

        SegmentWriter.add = counted_add  # type: ignore[method-assign]

    from synth_cpt.generation.backends import Feed
    from synth_cpt.generation.engine import GenerationEngine

    take = Feed.__next__

    def logged_next(self: Feed):  # type: ignore[no-untyped-def]
        p = take(self)
        log_sent(sent_log, p.request_id)  # when the backend (or the joint run feeding it) takes it
        return p

    Feed.__next__ = logged_next  # type: ignore[method-assign]

    if engine == "double":
        from synth_cpt.defs.resources import LLM
        from synth_cpt.generation.cache import GenerationCache

        from .doubles import DeterministicTestBackend
        from .test_synthesis_dagster import swapped_words

        # rewrites in the document's own words pass the fidelity rules: the mix has synthetic rows to take
        backend = DeterministicTestBackend(reply=lambda p: None if p.request.json_schema else swapped_words(p))

        def double_engine(self: LLM, storage, storage_root, log=None, progress=None) -> GenerationEngine:  # type: ignore[no-untyped-def]
            return GenerationEngine(
                backend, GenerationCache(storage), model="test-double", model_fingerprint="fp-double",
                flush_every=self.flush_every, flush_seconds=self.flush_seconds, log=log, progress=progress,
            )  # fmt: skip

        def no_tokenizer(self: LLM, storage_root, log=None):  # type: ignore[no-untyped-def]
            return None  # the double serves no model folder: the target tokenizer chunks

        LLM.engine = double_engine  # type: ignore[method-assign]
        LLM.generator_tokenizer_file = no_tokenizer  # type: ignore[method-assign]


def held_slots() -> int:
    """How many runs hold a `gpu` slot as this worker starts: the runs of killed workers, which the CLI (on
    opening the instance) fails and frees before it runs anything; without that the step would wait for ever."""
    from dagster import DagsterInstance

    return len(DagsterInstance.get().event_log_storage.get_concurrency_run_ids())


def main(argv: list[str]) -> int:
    step, config, kill_at, boundary, engine, sent_log = argv[:6]
    extra = argv[6:]
    print(f"HELD {held_slots()}", flush=True)
    install(int(kill_at), boundary, engine, sent_log)
    from synth_cpt.cli import main as cli

    code = cli(["--config", config, step, *extra])
    print(f"TICKS {TICKS[0]}", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
