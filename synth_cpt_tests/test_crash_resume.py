"""SIGKILL at seeded points of every step (ingest, synthesis, mix, evals), then a rerun: what is published
equals an uninterrupted run's, no row is duplicated, no reader ever sees a partial file, and a kill costs
at most one cache segment's worth of requests (`generation.flush_every`) sent again.

Each killed process is `crash_worker` running the step through the synth-cpt CLI (a real Dagster instance),
killed by itself at the N-th boundary it crosses (an atomic storage write starting or about to be renamed
into place, or a generation result handed to the cache writer); N comes from a seeded random.Random, so
a failure names its kill point and reproduces. Synthesis uses the test double (doubles.py) here; the
real engine is killed at 2 points in test_crash_resume_engine.py.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq
import pytest
import yaml

from synth_cpt.core.storage import LocalStorage
from synth_cpt.generation.cache import GenerationCache

from .conftest import PT_TEXT, REPO, write_jsonl

SEED = 20261205
FLUSH_EVERY = 4
PARTITION = "pt|high"
DOUBLE_ASSETS = ["rewrites_medium", "rewrites_qa"]
# (step, boundary, kills, extra CLI arguments)
STEPS = [
    ("ingest", "write", 5, []),
    ("synthesize", "result", 5, ["--partition", PARTITION, *(a for asset in DOUBLE_ASSETS for a in ("--asset", asset))]),
    ("synthesize", "write", 2, ["--partition", PARTITION, *(a for asset in DOUBLE_ASSETS for a in ("--asset", asset))]),
    ("mix", "write", 3, ["--partition", PARTITION]),
    ("evals", "write", 3, ["--partition", PARTITION]),
]
VERSION = re.compile(r"\d{8}T\d{12}-[0-9a-f]{8}")
# what legitimately differs between two runs of the same inputs: when, which version folder, which run,
# how fast, and how much was answered from the cache instead of sent
VOLATILE_KEYS = re.compile(r"(version|prefix|seconds|_per_s|^sent$|cache_hits|engine_loads|run_id|_at$|^at$|time|stamp|elapsed|uri|log)")


def _drops(base: Path) -> None:
    for d in range(2):
        docs = [
            {"text": f"Documento {d}-{i}. {PT_TEXT} Foram {i + 3} escolas em 202{d}.", "edu": 3.0 + i / 10 if i < 8 else 1.0 + i / 10}
            for i in range(10)
        ]
        write_jsonl(base / "drops" / f"2026-11-0{d + 1}.jsonl", docs)


def _setup(base: Path, drops: Path, **generation) -> dict:
    """A storage root, a Dagster instance and a config over the shared drops."""
    (base / "dagster_home").mkdir(parents=True)
    shutil.copy(REPO / "dagster.yaml", base / "dagster_home" / "dagster.yaml")
    config = {
        "storage_root": str(base / "home"),
        "drops": {"location": str(drops), "settle_seconds": 0},
        "languages": ["pt"],
        "tokenizer": {"vocab_size": 600},
        "subsets": {"default_budget_tokens": 100000},
        "limits": {"workers": 1},
        "synthesis": {"max_documents": 16, "min_pass_rate": 0.0, "routing": {"high": ["medium", "qa"], "low": ["medium"]}},
        "generation": {"flush_every": FLUSH_EVERY, "flush_seconds": 3600, **generation},
        "mixes": {
            "recipes": {
                "wrap": {"components": [{"source": "originals"}, {"source": "rewrite", "ratio": 1, "styles": {"medium": 1, "qa": 1}}]}
            }
        },
    }
    (base / "pipeline.yaml").write_text(yaml.safe_dump(config))
    return {"base": base, "home": base / "home", "config": base / "pipeline.yaml", "sent": base / "sent.log"}


def _group(pgid: int) -> list[int]:
    """The live processes of a process group (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split() if entry.name.isdigit() else []
            if fields and int(fields[2]) == pgid and fields[0] != "Z":  # a zombie holds no memory: init collects it
                found.append(int(entry.name))
        except (OSError, ValueError, IndexError):
            continue
    return found


def _worker(run: dict, step: str, kill_at: int, boundary: str, extra: list[str], engine: str = "double", env: dict | None = None):
    """The worker in a session of its own: after it ends (or is killed), whatever it started and still runs 60 s
    later is counted in `orphans` and stopped (vLLM's engine processes outlive a SIGKILLed parent unless its
    watchdog ends them)."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("SYNTH_CPT_", "DAGSTER_"))}
    environ.update(DAGSTER_HOME=str(run["base"] / "dagster_home"), COLUMNS="200", **(env or {}))
    cmd = [sys.executable, "-m", "synth_cpt_tests.crash_worker", step, str(run["config"]), str(kill_at), boundary, engine, str(run["sent"])]
    proc = subprocess.Popen([*cmd, *extra], cwd=REPO, env=environ, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # fmt: skip
    try:
        out, err = proc.communicate(timeout=300)
    finally:
        deadline = time.monotonic() + 60  # the engine's watchdog (generation/reaper.py) signals them within ~10 s
        while (orphans := _group(proc.pid)) and time.monotonic() < deadline:
            time.sleep(0.5)
        if orphans:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.kill()
    done = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
    done.orphans = len(orphans)
    return done


def _ticks(proc: subprocess.CompletedProcess) -> int:
    found = re.findall(r"^TICKS (\d+)$", proc.stdout, re.M)
    assert proc.returncode == 0 and found, proc.stdout[-3000:] + proc.stderr[-3000:]
    return int(found[-1])


def _sent(run: dict) -> list[tuple[int, str]]:
    if not run["sent"].exists():
        return []
    return [(int(pid), rid) for pid, rid in (line.split() for line in run["sent"].read_text().split("\n") if line)]


def _stable(value):
    """A pointer or manifest without what differs between two runs of the same inputs."""
    if isinstance(value, dict):
        return {k: _stable(v) for k, v in value.items() if not VOLATILE_KEYS.search(k)}
    if isinstance(value, list):
        return [_stable(v) for v in value]
    if isinstance(value, str):
        return VERSION.sub("<version>", value)
    return value


def _table(path: Path) -> pl.DataFrame:
    """A published table with version stamps blanked, datetime columns dropped, rows in a canonical order."""
    frame = pl.read_parquet(path)
    frame = frame.select([c for c, t in frame.schema.items() if not t.is_temporal() and not VOLATILE_KEYS.search(c) or c == "drop_version"])
    frame = frame.with_columns(pl.col(c).str.replace_all(VERSION.pattern, "<version>") for c, t in frame.schema.items() if t == pl.String)
    rows = frame.rows()
    return frame[sorted(range(frame.height), key=lambda i: repr(rows[i]))]


def _published(home: Path) -> dict[str, object]:
    """Everything a reader sees: each pointer (stable part) and the tables it names; each one-file output."""
    seen: dict[str, object] = {}
    for pointer in sorted(home.rglob("current.json")):
        rel = pointer.parent.relative_to(home).as_posix()
        if rel.startswith(("generations", "_rejected", "logs", "models")):
            continue
        data = json.loads(pointer.read_text())
        seen[f"{rel}/current.json"] = _stable(data)
        for f in sorted((home / data["prefix"]).glob("*.parquet")):
            seen[f"{rel}/{f.name}"] = _table(f)
    for part in sorted(home.glob("*/*/*/part-*.parquet")):  # one-file outputs, renamed into place
        seen[part.relative_to(home).as_posix()] = _table(part)
    return seen


def _row_key(columns: list[str]) -> list[str]:
    """What identifies a published row: a mix row by origin, document and synthetic text; a generated row by
    its document and requests; a corpus row by its document; anything else by all of it."""
    for key in (["origin", "doc_id", "synth_id"], ["doc_id", "request_ids"], ["doc_id"], ["request_id"]):
        if set(key) <= set(columns):
            return key
    return columns


def _duplicates(seen: dict[str, object]) -> dict[str, int]:
    """Rows published twice, per table."""
    dups = {}
    for name, table in seen.items():
        if isinstance(table, pl.DataFrame) and table.height:
            n = table.height - len(set(map(repr, table.select(_row_key(table.columns)).rows())))
            if n:
                dups[name] = n
    return dups


class Reader(threading.Thread):
    """A reader that keeps reading what is published while processes are killed: every pointer must parse
    and name files that read whole, and every file a reader could list (not a `.tmp-` candidate) must read."""

    def __init__(self, home: Path) -> None:
        super().__init__(daemon=True)
        self.home = home
        self.stop = threading.Event()
        self.failures: list[str] = []
        self.reads = 0

    def run(self) -> None:
        while not self.stop.is_set():
            storage = LocalStorage(self.home)
            for key in storage.list(""):
                if key.startswith(("logs/", "models/")) or "/." in f"/{key}":
                    continue
                try:
                    if key.endswith(".parquet"):
                        pq.read_table(self.home / key)
                    elif key.endswith(".json"):
                        data = json.loads((self.home / key).read_text())
                        if key.endswith("current.json"):
                            for name in data.get("files", []):
                                pq.read_table(self.home / data["prefix"] / name) if name.endswith(".parquet") else (
                                    self.home / data["prefix"] / name
                                ).read_bytes()
                    self.reads += 1
                except FileNotFoundError:
                    continue  # listed, then cleaned up (an unpublished candidate): never a published file
                except Exception as exc:  # noqa: BLE001 - any failure to read is what this reader records
                    self.failures.append(f"{key}: {type(exc).__name__}: {exc}"[:300])
            time.sleep(0.05)


def _resent_per_kill(sent: list[tuple[int, str]], killed: list[int]) -> list[int]:
    """For each killed process: how many requests it sent were sent again by a later process."""
    order = list(dict.fromkeys(pid for pid, _ in sent))
    by_pid: dict[int, set[str]] = {}
    for pid, rid in sent:
        by_pid.setdefault(pid, set()).add(rid)
    resent = []
    for pid in killed:
        later = set().union(*(by_pid[p] for p in order[order.index(pid) + 1 :])) if pid in order else set()
        resent.append(len(by_pid.get(pid, set()) & later))
    return resent


@pytest.mark.e2e
def test_sigkill_at_seeded_points_then_rerun_publishes_what_an_uninterrupted_run_does(tmp_path):
    _drops(tmp_path)
    clean, crash = _setup(tmp_path / "clean", tmp_path / "drops"), _setup(tmp_path / "crash", tmp_path / "drops")
    rng = random.Random(SEED)
    figures: list[dict] = []
    reader = Reader(crash["home"])
    reader.start()
    synth_killed: list[int] = []
    try:
        for step, boundary, kills, extra in STEPS:
            full = _ticks(_worker(clean, step, 0, boundary, extra))  # the uninterrupted run, and how many boundaries it crosses
            for i in range(kills):
                # within the first 1/(kills - i + 1) of the uninterrupted step's boundaries: progress only adds up over the
                # kills, so each point lands before its process could finish, and the later ones reach further in
                kill_at = rng.randint(1, max(1, full // (kills - i + 1)))
                before = {pid for pid, _ in _sent(crash)}
                proc = _worker(crash, step, kill_at, boundary, extra)
                pids = {pid for pid, _ in _sent(crash)} - before
                held = [int(n) for n in re.findall(r"^HELD (\d+)$", proc.stdout, re.M)]
                killed = proc.returncode == -9 and f"KILLING {kill_at}" in proc.stdout  # killed by the hook, not by anything else
                figures.append({"step": step, "boundary": boundary, "kill_at": kill_at, "of": full, "killed": killed, "held": held})
                if killed:
                    if step == "synthesize":
                        synth_killed.append(pids.pop() if pids else -1)
                else:
                    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
            _ticks(_worker(crash, step, 0, boundary, extra))  # the rerun to completion
    finally:
        reader.stop.set()
        reader.join(timeout=30)

    kills = [f for f in figures if f["killed"]]
    print(f"\nkill points (seed {SEED}):")
    for f in figures:
        outcome = "killed" if f["killed"] else "ran to the end"
        print(
            f"  {f['step']:<11} {f['boundary']:<6} at {f['kill_at']:>4} of {f['of']:>4}: {outcome}; gpu slots held by killed runs, freed by the CLI: {f['held']}"
        )

    # the rerun publishes what the uninterrupted run did, and nothing twice
    want, got = _published(clean["home"]), _published(crash["home"])
    assert sorted(got) == sorted(want)
    differ = [k for k in want if not (want[k].equals(got[k]) if isinstance(want[k], pl.DataFrame) else want[k] == got[k])]
    assert differ == []
    assert _duplicates(got) == {}
    assert {k: v.height for k, v in got.items() if isinstance(v, pl.DataFrame)}["rewrites_medium/pt/high/rows.parquet"] > 0

    # the generation cache: one row per request, the same answers as the uninterrupted run
    rows = GenerationCache(LocalStorage(crash["home"])).load()
    assert rows["request_id"].n_unique() == rows.height
    finished = {c: GenerationCache(LocalStorage(r["home"])).finished().select("request_id", "text").sort("request_id") for c, r in
                (("clean", clean), ("crash", crash))}  # fmt: skip
    assert finished["crash"].equals(finished["clean"])

    # a kill costs at most one segment of requests sent again
    sent = _sent(crash)
    synth_pids = [p for p in dict.fromkeys(pid for pid, _ in sent)]
    resent = _resent_per_kill(sent, [p for p in synth_killed if p in synth_pids])
    requests = finished["clean"].height
    print(f"kills survived: {len(kills)} of {len(figures)} kill points; reader: {reader.reads} reads, {len(reader.failures)} failures")
    print(f"requests: {requests} in the uninterrupted run, {len(sent)} sent in the killed ones and their reruns")
    print(f"requests resent per synthesis kill: {resent}; max {max(resent, default=0)} vs flush_every {FLUSH_EVERY}")
    assert reader.failures == []
    assert reader.reads > 0
    # a killed synthesize left its run holding the gpu slot, and the next worker's CLI freed it and went on
    assert [f["held"] for f in figures if f["step"] == "synthesize" and f["boundary"] == "result"][1:] == [[1]] * 4, figures
    assert len(kills) == sum(k for *_, k, _ in STEPS), figures  # 18 here, and 2 of the real engine in test_crash_resume_engine.py
    assert len(resent) >= 5, "each kill at a result had sent requests"
    assert max(resent) <= FLUSH_EVERY, f"resent per kill {resent} > flush_every {FLUSH_EVERY}"
    assert len({rid for _, rid in sent}) == requests, "every request was sent, none that the clean run did not send"


SEGMENT_KILLER = """
import contextlib, os, signal, sys
from synth_cpt.core.storage import LocalStorage
from synth_cpt.generation.cache import GenerationCache
from synth_cpt.generation.engine import GenerationEngine
from synth_cpt_tests.doubles import DeterministicTestBackend, make_requests

original, segments = LocalStorage.writing, []

@contextlib.contextmanager
def writing(self, key):
    with original(self, key) as tmp:
        yield tmp
        if "/segments/" in key:
            segments.append(key)
            if len(segments) == 2:  # the second segment is written whole, not yet renamed into place
                os.kill(os.getpid(), signal.SIGKILL)

LocalStorage.writing = writing
engine = GenerationEngine(DeterministicTestBackend(), GenerationCache(LocalStorage(sys.argv[1])), model="double",
                          model_fingerprint="fp-double", flush_every=4, flush_seconds=3600)
engine.run(make_requests(12), scope="s")
"""


def test_a_kill_during_a_segment_write_leaves_nothing_the_documented_duckdb_glob_reads(tmp_path):
    import duckdb

    root = tmp_path / "home"
    proc = subprocess.run([sys.executable, "-c", SEGMENT_KILLER, str(root)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr[-2000:]
    rerun = subprocess.run([sys.executable, "-c", SEGMENT_KILLER.replace("len(segments) == 2", "False"), str(root)], cwd=REPO,
                           capture_output=True, text=True, timeout=120)  # fmt: skip
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    cached = GenerationCache(LocalStorage(root)).load()
    assert cached.height == 12 and cached["request_id"].n_unique() == 12
    glob = f"{root}/generations/segments/**/*.parquet"
    seen = duckdb.sql(f"select count(*), count(distinct request_id) from read_parquet('{glob}')").fetchall()[0]
    print(f"\nafter a kill mid segment write and a rerun: the cache reads {cached.height} rows; DuckDB's glob reads {seen}")
    assert seen == (12, 12)
