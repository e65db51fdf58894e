"""Every generation step of a run at once: each (asset, partition) is computed in its own thread, so all
their requests meet in one engine run (`generation.joint`), and each finished step is handed back, in the
order they finish, to the caller, which validates and publishes it (in Dagster, yielding its events from
the step's own thread). A step that reads another's published output (entigraph_corpus reads
entity_graphs) starts only once that one is published, and is skipped, with the reason, if it was not;
the engine serves the one it waits on first.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from synth_cpt.generation.joint import served_first

T = TypeVar("T")


@dataclass(frozen=True)
class Task(Generic[T]):
    key: tuple[str, ...]  # (asset, language, quality)
    make: Callable[[], T]
    after: tuple[str, ...] | None = None  # the task that must be published first


@dataclass
class Done(Generic[T]):
    """A finished task: its output, or the error it raised, or why it did not run. The caller sets
    `published` before asking for the next one; a task that waits on this one runs only if it is True."""

    task: Task[T]
    output: T | None = None
    error: BaseException | None = None
    skipped: str | None = None
    published: bool = field(default=False)


def run_tasks(tasks: list[Task[T]], name: str = "synth-cpt-step") -> Iterator[Done[T]]:
    """Run `tasks` in threads, yielding each as it finishes. Every task is yielded exactly once."""
    keys = [t.key for t in tasks]
    if len(set(keys)) != len(keys):
        raise ValueError(f"two tasks share a key: {sorted(k for k in keys if keys.count(k) > 1)}")
    known = set(keys)
    followers: dict[tuple[str, ...], list[Task[T]]] = {}
    for t in tasks:
        if t.after is not None:
            if t.after not in known:
                raise ValueError(f"task {t.key} waits on {t.after}, which is not a task of this run")
            followers.setdefault(t.after, []).append(t)
    finished: queue.Queue[Done[T]] = queue.Queue()
    threads: list[threading.Thread] = []

    def start(task: Task[T]) -> None:
        def work() -> None:
            try:
                with served_first() if task.key in followers else contextlib.nullcontext():  # others wait on it
                    finished.put(Done(task, output=task.make()))
            except BaseException as exc:  # handed to the caller with the task, as the step's failure
                finished.put(Done(task, error=exc))

        thread = threading.Thread(target=work, name=f"{name}-{'/'.join(task.key)}", daemon=True)
        threads.append(thread)
        thread.start()

    for t in tasks:
        if t.after is None:
            start(t)
    left = len(tasks)
    try:
        while left:
            done = finished.get()
            left -= 1
            yield done
            for follower in followers.get(done.task.key, []):
                if done.published:
                    start(follower)
                else:
                    why = "its error" if done.error else done.skipped or "a failed blocking check"
                    finished.put(Done(follower, skipped=f"{'/'.join(done.task.key)} was not published ({why})"))
    finally:
        for thread in threads:  # a caller that stops early still waits for the threads it started
            thread.join()
