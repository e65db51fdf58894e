"""One engine run for many runs at once (generation/joint.py) and the step scheduler that feeds it
(synthesis/schedule.py), with the stepping test double (no model)."""

import threading
import time

import pytest

from synth_cpt.core.storage import LocalStorage
from synth_cpt.generation.cache import GenerationCache
from synth_cpt.generation.engine import GenerationEngine
from synth_cpt.generation.joint import JointBackend, served_first
from synth_cpt.generation.requests import ChatRequest, Sampling
from synth_cpt.synthesis.schedule import Task, run_tasks

from .doubles import SteppingTestBackend

LINKS = 3


class HeldSteppingTestBackend(SteppingTestBackend):
    """Test double: its first `generate` waits until `release` is set, so the test decides which runs have
    joined before the engine starts (threads would otherwise race to it)."""

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.release = threading.Event()

    def generate(self, batch, on_result) -> None:
        assert self.release.wait(30)
        super().generate(batch, on_result)


def link(run: int, k: int) -> ChatRequest:
    return ChatRequest.chat(
        [{"role": "user", "content": f"run {run} link {k}"}], Sampling(temperature=0.0, max_tokens=8), prompt_name=f"p{run}", prompt_sha="s"
    )


def engine_for(tmp_path, backend, name: str) -> GenerationEngine:
    cache = GenerationCache(LocalStorage(tmp_path / name))
    return GenerationEngine(backend, cache, model="double", model_fingerprint="fp", flush_every=4, flush_seconds=3600)


def chain_run(engine: GenerationEngine, run: int):
    """One chain of LINKS links: each link is asked once the one before is back."""
    ids = {engine.request_ids([link(run, k)])[0]: k for k in range(LINKS)}

    def follow(rid, gen):
        k = ids[rid]
        return [link(run, k + 1)] if k + 1 < LINKS else []

    return engine.run([link(run, 0)], scope=f"run{run}", follow=follow)


def in_threads(fns):
    out, errors = {}, {}

    def call(i, fn):
        try:
            out[i] = fn()
        except BaseException as exc:
            errors[i] = exc

    threads = [threading.Thread(target=call, args=(i, fn)) for i, fn in enumerate(fns)]
    for t in threads:
        t.start()
    return threads, out, errors


def joined(joint: JointBackend, runs: int) -> None:
    deadline = time.monotonic() + 30
    while joint.runs < runs:
        assert time.monotonic() < deadline, f"{joint.runs} of {runs} runs joined"
        time.sleep(0.01)


def test_the_chains_of_concurrent_runs_share_one_engine_run(tmp_path):
    runs = 4
    inner = HeldSteppingTestBackend(max_in_flight=runs)
    joint = JointBackend(inner)
    engine = engine_for(tmp_path, joint, "joint")
    threads, reports, errors = in_threads([lambda r=r: chain_run(engine, r) for r in range(runs)])
    joined(joint, runs)
    inner.release.set()
    for t in threads:
        t.join(30)
    joint.close()
    assert not errors, errors
    assert len(inner.batches) == 1 and joint.drives == 1, "one engine run for every run"
    assert {r: (rep.sent, rep.succeeded, rep.failed) for r, rep in reports.items()} == {r: (LINKS, LINKS, 0) for r in range(runs)}
    # each chain has one link in the engine at a time, so alone a run keeps one slot busy; together they fill all four
    assert inner.in_flight == [runs] * (runs * LINKS - runs) + list(range(runs, 0, -1)), inner.in_flight
    assert joint.figures() == {
        "joint_runs": runs, "joint_runs_at_once_max": runs, "joint_engine_starts": 1, "joint_sent": runs * LINKS, "joint_shared_requests": 0,
    }  # fmt: skip

    # the same runs one after the other, on their own engine and cache: the same answers to the same requests
    alone = SteppingTestBackend(max_in_flight=runs)
    solo = engine_for(tmp_path, alone, "solo")
    for r in range(runs):
        chain_run(solo, r)
    assert max(alone.in_flight) == 1
    every = [link(r, k) for r in range(runs) for k in range(LINKS)]
    by_id = {row["request_id"]: row["text"] for row in engine.results(every).to_dicts()}
    assert by_id == {row["request_id"]: row["text"] for row in solo.results(every).to_dicts()} and len(by_id) == runs * LINKS


def test_a_crash_loses_at_most_one_checkpoint_of_the_joint_run(tmp_path, monkeypatch):
    """Each run's writer holds up to flush_every // 2 results before handing them over; four runs at once
    would hold four times that. The joint run flushes them all each time it has handed that many."""
    from synth_cpt.generation.cache import SegmentWriter

    writers: list[SegmentWriter] = []
    buffered: list[int] = []
    init, add = SegmentWriter.__init__, SegmentWriter.add

    def tracked_init(self, *a, **kw):
        init(self, *a, **kw)
        writers.append(self)

    def measured_add(self, *a, **kw):
        add(self, *a, **kw)
        buffered.append(sum(len(w.rows) for w in writers))  # results handed to writers and not yet handed on

    monkeypatch.setattr(SegmentWriter, "__init__", tracked_init)
    monkeypatch.setattr(SegmentWriter, "add", measured_add)
    runs = 4
    inner = HeldSteppingTestBackend(max_in_flight=runs)
    joint = JointBackend(inner)
    engine = engine_for(tmp_path, joint, "joint")  # flush_every 4: a writer hands over every 2 results
    batches = [[link(r, k) for k in range(5)] for r in range(runs)]
    threads, reports, errors = in_threads([lambda b=b, r=r: engine.run(b, scope=f"run{r}") for r, b in enumerate(batches)])
    joined(joint, runs)
    inner.release.set()
    for t in threads:
        t.join(30)
    joint.close()
    assert not errors and [rep.sent for rep in reports.values()] == [5] * runs
    assert len(buffered) == 5 * runs and max(buffered) == 2, buffered


def test_runs_others_wait_on_are_served_first(tmp_path):
    inner = HeldSteppingTestBackend(max_in_flight=1)
    joint = JointBackend(inner)
    engine = engine_for(tmp_path, joint, "joint")
    plain, gating = [link(1, k) for k in range(3)], [link(2, k) for k in range(3)]

    def first():
        with served_first():
            return engine.run(gating, scope="entity_graphs")

    threads, _, errors = in_threads([lambda: engine.run(plain, scope="rewrites"), first])
    joined(joint, 2)
    inner.release.set()
    for t in threads:
        t.join(30)
    joint.close()
    assert not errors
    assert sorted(inner.sent[:3]) == sorted(engine.request_ids(gating)), "the gating run's requests go first"
    assert sorted(inner.sent[3:]) == sorted(engine.request_ids(plain))


def test_a_request_two_runs_ask_at_once_is_sent_once_and_answers_both(tmp_path):
    inner = HeldSteppingTestBackend(max_in_flight=4)
    joint = JointBackend(inner)
    engine = engine_for(tmp_path, joint, "joint")
    same = [link(9, 0)]
    threads, reports, errors = in_threads([lambda: engine.run(same, scope="a"), lambda: engine.run(same, scope="b")])
    joined(joint, 2)
    inner.release.set()
    for t in threads:
        t.join(30)
    joint.close()
    assert not errors, errors
    assert inner.sent == engine.request_ids(same) and joint.shared == 1
    assert [(rep.sent, rep.succeeded) for rep in reports.values()] == [(1, 1), (1, 1)]


def test_a_run_that_fails_fails_alone(tmp_path):
    inner = HeldSteppingTestBackend(max_in_flight=4)
    joint = JointBackend(inner)
    engine = engine_for(tmp_path, joint, "joint")

    def broken(rid, gen):
        raise ValueError("a follow that breaks")

    threads, reports, errors = in_threads([lambda: engine.run([link(1, 0)], follow=broken), lambda: chain_run(engine, 2)])
    joined(joint, 2)
    inner.release.set()
    for t in threads:
        t.join(30)
    joint.close()
    assert list(errors) == [0] and str(errors[0]) == "a follow that breaks"
    assert (reports[1].sent, reports[1].succeeded) == (LINKS, LINKS)


def test_an_engine_that_fails_fails_every_run_it_serves(tmp_path):
    class BrokenTestBackend(HeldSteppingTestBackend):
        def generate(self, batch, on_result):
            assert self.release.wait(30)
            raise RuntimeError("engine core died")

    inner = BrokenTestBackend(max_in_flight=4)
    joint = JointBackend(inner)
    engine = engine_for(tmp_path, joint, "joint")
    threads, _, errors = in_threads([lambda r=r: chain_run(engine, r) for r in range(3)])
    joined(joint, 3)
    inner.release.set()
    for t in threads:
        t.join(30)
    joint.close()
    assert sorted(errors) == [0, 1, 2] and {str(e) for e in errors.values()} == {"engine core died"}


def test_closing_sends_nothing_new_and_caches_what_was_in_the_engine(tmp_path):
    """A step stopped early (an error, an interrupt) closes the joint run: what is already in the engine is still
    answered and written to the cache, nothing more is sent, and the runs still waiting fail with the reason."""

    class ClosingTestBackend(SteppingTestBackend):
        def generate(self, batch, on_result):
            queue, running = iter(batch), []
            while len(running) < self.max_in_flight and (p := next(queue, None)) is not None:
                self.send(p)
                running.append(p)
            closing = threading.Thread(target=joint.close)
            closing.start()  # from another thread, as the step's thread does while the driver is busy
            while not joint._closed:
                time.sleep(0.01)
            for p in running:
                on_result(p, self.answer(p))
            assert next(queue, None) is None, "nothing is taken once closed"

    inner = ClosingTestBackend(max_in_flight=2)
    joint = JointBackend(inner)
    engine = engine_for(tmp_path, joint, "joint")
    batch = [link(3, k) for k in range(5)]
    with pytest.raises(RuntimeError, match="closed before this run ended"):
        engine.run(batch, scope="run3")
    assert len(inner.sent) == 2
    assert sorted(engine.cache.finished_ids(engine.request_ids(batch))) == sorted(inner.sent), "the two answered are cached"


def test_a_closed_joint_run_refuses_new_runs(tmp_path):
    joint = JointBackend(SteppingTestBackend(max_in_flight=2))
    joint.close()
    with pytest.raises(RuntimeError, match="closed"):
        engine_for(tmp_path, joint, "joint").run([link(1, 0)])


def test_steps_run_at_once_and_a_follower_waits_for_its_leader_to_be_published():
    leader_done = threading.Event()
    started: list[str] = []

    def make(name, wait_for=None):
        def step():
            started.append(name)
            if wait_for is not None:
                assert wait_for.wait(10)
            return name

        return step

    tasks = [
        Task(("graphs", "en|high"), make("graphs")),
        Task(("corpus", "en|high"), make("corpus"), after=("graphs", "en|high")),
        Task(("medium", "en|high"), make("medium", wait_for=leader_done)),  # only ends if it runs beside graphs
    ]
    order = []
    for done in run_tasks(tasks):
        order.append(done.task.key[0])
        assert done.error is None and done.skipped is None
        if done.task.key[0] == "graphs":
            assert "corpus" not in started, "the follower starts only once its leader is handed back"
            leader_done.set()
        done.published = True
    assert sorted(order) == ["corpus", "graphs", "medium"] and order.index("graphs") < order.index("corpus")


def test_a_follower_of_an_unpublished_step_is_skipped_and_errors_are_handed_back():
    def fail():
        raise FileNotFoundError("no summaries")

    tasks = [
        Task(("graphs", "pt|high"), lambda: "graphs"),  # made, but its check fails: not published
        Task(("corpus", "pt|high"), lambda: "corpus", after=("graphs", "pt|high")),
        Task(("graphs", "en|high"), fail),
        Task(("corpus", "en|high"), lambda: "corpus", after=("graphs", "en|high")),
        Task(("graphs", "en|low"), lambda: "graphs"),
        Task(("corpus", "en|low"), lambda: "corpus", after=("graphs", "en|low")),
    ]
    seen = {}
    for done in run_tasks(tasks):
        seen[done.task.key] = done
        done.published = done.error is None and done.task.key != ("graphs", "pt|high")
    assert set(seen) == {t.key for t in tasks}, "every task is handed back once"
    assert isinstance(seen[("graphs", "en|high")].error, FileNotFoundError)
    assert seen[("corpus", "en|high")].skipped == "graphs/en|high was not published (its error)"
    assert seen[("corpus", "pt|high")].skipped == "graphs/pt|high was not published (a failed blocking check)"
    assert seen[("corpus", "en|low")].output == "corpus" and seen[("corpus", "en|low")].skipped is None


def test_tasks_must_have_distinct_keys_and_known_leaders():
    with pytest.raises(ValueError, match="share a key"):
        list(run_tasks([Task(("a", "p"), lambda: 1), Task(("a", "p"), lambda: 2)]))
    with pytest.raises(ValueError, match="not a task of this run"):
        list(run_tasks([Task(("a", "p"), lambda: 1, after=("b", "p"))]))


def test_the_partitions_asked_run_as_the_fewest_ranges():
    from synth_cpt.cli.common import partition_ranges

    langs, quals = ["pt", "en"], ["high", "low"]
    every = [f"{lang}|{q}" for lang in langs for q in quals]
    assert partition_ranges(every, langs, quals) == [("pt|high", "en|low")]
    assert partition_ranges(["pt|low", "pt|high"], langs, quals) == [("pt|high", "pt|low")]
    assert partition_ranges(["en|low"], langs, quals) == [("en|low", "en|low")]
    # not a rectangle: each language's consecutive qualities
    assert partition_ranges(["pt|high", "pt|low", "en|low"], langs, quals) == [("pt|high", "pt|low"), ("en|low", "en|low")]
    three = ["high", "medium", "low"]
    assert partition_ranges(["pt|high", "pt|low"], ["pt"], three) == [("pt|high", "pt|high"), ("pt|low", "pt|low")]
    assert partition_ranges(["pt|high", "en|high"], ["pt", "es", "en"], ["high"]) == [("pt|high", "pt|high"), ("en|high", "en|high")]


def test_an_unknown_partition_is_refused_by_name(tmp_path, monkeypatch, isolated_env):
    from synth_cpt.cli import main

    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    monkeypatch.setenv("SYNTH_CPT_HOME", str(tmp_path / "home"))
    with pytest.raises(SystemExit) as refused:
        main(["mix", "--partition", "pt|hgih", "--partition", "en|low"])
    assert str(refused.value) == (
        "synth-cpt mix: unknown partitions ['pt|hgih']; there are ['pt|high', 'pt|low', 'en|high', 'en|low'] (language|quality)"
    )


def test_mix_without_recipes_says_so(tmp_path, monkeypatch, isolated_env):
    from synth_cpt.cli import main

    (tmp_path / "config.yaml").write_text("mixes:\n  recipes: {}\n")
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    monkeypatch.setenv("SYNTH_CPT_HOME", str(tmp_path / "home"))
    with pytest.raises(SystemExit) as refused:
        main(["--config", str(tmp_path / "config.yaml"), "mix"])
    assert str(refused.value) == "synth-cpt mix: the config defines no mix assets (add recipes under mixes.recipes)"


def test_the_engine_load_decides_from_the_probes_not_the_first_run_to_arrive(tmp_path):
    from synth_cpt.generation.backends import Prepared

    from .doubles import DeterministicTestBackend

    probes = [Prepared(link(p, 0), f"probe:{p}", 0) for p in range(3)]
    inner = DeterministicTestBackend()
    joint = JointBackend(inner, probes=probes)
    engine_for(tmp_path, joint, "joint").run([link(7, 0)])
    joint.close()
    assert inner.prepared == probes and inner.loads == 1
