"""Generation cache lookups: the scoped, indexed cache against the pre-issue-6 one, same cache, same request.

A cache of N rows (default 2,000,000) is built in a temp dir laid out as the real writer lays it
out: segments of 1,000 rows (~1 KB of text each, ~1% recorded failures) under `segments/<scope>/`
in 100 scopes named like `rewrites_<style>/<lang>/<quality>`, written with `Storage.write_parquet`;
each segment's id index beside it under `index/<scope>/`, written with the cache's own
`_write_index`; and after each segment the scope's index files merged with `merge_index(scope)`
(which calls `compact_index` on 4 files of a tier), as `SegmentWriter` does. (The writer's own
segments hold `flush_every // 2` = 64 rows until `synth-cpt cache compact` merges them; 1,000 keeps
the build fast and still gives 2,000 segments at 2M rows.) Then one run's request is answered:
10,000 ids asked from scope `rewrites_easy/pt/high` (9,000 generated in that scope, 500 generated
by other scopes, 500 never generated), first which are finished, then their rows:

- **new**: `GenerationCache.finished_ids(ids, scope)` then `.finished(ids, scope)` (own scope's
  index first, other scopes' index only for missing ids, ranged reads of the segments with hits);
- **old**: `benchmarks/baselines/cache_v0.py` (the cache before issue 6): `finished_ids()` (request_id
  and error of every segment) intersected with the ids, then `finished(ids)` (a filtered scan of every
  segment), which is what the engine did with it.

Both must return the same finished ids and the same rows (ids and texts), or the script fails.

The asked scope holds the same 20,000 rows at both sizes (the 9,000 are drawn at random among them);
the 500 cross-scope hits are 5 blocks of 100 rows that other scopes generated together (one segment
each); only the rest of the cache grows with N. The benchmark runs at N/10 and at N, so `growth` says
what a 10x bigger rest of the cache costs one lookup. Each side runs in its own fresh process (one
warm-up each, then old and new alternately, best of --repeats), on a cache in the page cache. Peak
RSS is the child's VmHWM: its ru_maxrss starts at the parent's RSS (Linux keeps the larger across
fork and exec), so it is printed beside it but not used.

    python benchmarks/cache.py [--rows 2000000] [--root DIR]

Last line: RESULT cache speedup=<old_s/new_s> lookup_s=<new_s> growth=<new_s at N / new_s at N/10> peak_rss_mb=<new>
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import random
import resource
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.processes import measure  # noqa: E402

STYLES = ["easy", "medium", "hard", "qa"]
LANGS = ["pt", "en", "es", "fr", "de"]
QUALITIES = ["high", "good", "medium", "low", "junk"]
SCOPES = [f"rewrites_{s}/{lang}/{q}" for s in STYLES for lang in LANGS for q in QUALITIES]  # 100
ASKED_SCOPE = SCOPES[0]  # rewrites_easy/pt/high
ASKED_IN_SCOPE, CROSS_BLOCKS, CROSS_BLOCK_ROWS, NEVER = 9_000, 5, 100, 500
SCOPE_ROWS = 20_000  # rows of the asked scope, at both sizes


def request_id(i: int) -> str:
    return hashlib.sha256(f"bench-{i}".encode()).hexdigest()


def failed(i: int) -> bool:
    return i % 100 == 42  # 1% of the rows are recorded failures


def text_pool(size: int = 64 << 20, seed: int = 0) -> bytes:
    """ASCII word salad from the sample corpus: every row's text is a window of it (cut anywhere)."""
    import numpy as np

    with gzip.open(REPO / "synth_cpt" / "sample_corpus" / "drops" / "2026-11-01_pt_gimp-help.jsonl.gz") as f:
        words = sorted({w for line in f for w in json.loads(line)["text"].split() if w.isascii()})
    rng = np.random.default_rng(seed)
    vocab = np.array(words, dtype=object)
    data = " ".join(vocab[rng.integers(len(vocab), size=size // 5)].tolist()).encode()
    while len(data) < size:
        data += data
    return data[:size]


class Builder:
    def __init__(self, root: Path, segment_rows: int, pool: bytes) -> None:
        from synth_cpt.core.storage import LocalStorage
        from synth_cpt.generation.cache import GenerationCache

        self.cache = GenerationCache(LocalStorage(root))
        self.segment_rows = segment_rows
        self.pool = pool
        self.t0 = datetime(2026, 11, 1, tzinfo=timezone.utc)

    def segment(self, scope: str, first: int, number: int) -> None:
        """Rows [first, first + segment_rows) as one segment of `scope`, written like write_segment."""
        import numpy as np
        import polars as pl
        import pyarrow as pa

        from synth_cpt.generation import cache as cache_mod

        n = self.segment_rows
        counters = range(first, first + n)
        rng = np.random.default_rng(first)
        lengths = rng.integers(800, 1250, size=n)
        offsets = np.zeros(n + 1, dtype=np.int32)
        np.cumsum(lengths, out=offsets[1:])
        start = int(rng.integers(0, len(self.pool) - int(offsets[-1])))
        text = pa.StringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(memoryview(self.pool)[start : start + int(offsets[-1])]))
        key = f"{self.cache.prefix}/segments/{cache_mod.safe_scope(scope)}/{cache_mod._segment_name('seg')}"

        def const(value: str | None) -> pa.Array:
            return pa.array([value] * n, pa.string())

        errors = [("TimeoutError: no answer in 600 s" if failed(i) else None) for i in counters]
        columns = {
            "request_id": pa.array([request_id(i) for i in counters], pa.string()),
            "scope": const(cache_mod.safe_scope(scope)),
            "model": const("HuggingFaceTB/SmolLM2-135M-Instruct"),
            "model_fingerprint": const(hashlib.sha256(b"model").hexdigest()),
            "engine": const("vllm"),
            "engine_version": const("0.32.0"),
            "engine_config": const('{"enforce_eager": true}'),
            "prompt_name": const(f"rewrite/{scope.split('/')[0].removeprefix('rewrites_')}"),
            "prompt_sha": const(hashlib.sha256(scope.encode()).hexdigest()),
            "messages": const('[{"role": "system", "content": "Rewrite the document."}]'),
            "sampling": const('{"max_tokens": 1024, "seed": null, "stop": null, "temperature": 0.7, "top_p": 0.9}'),
            "json_schema": const(None),
            "seed": pa.array(np.arange(first, first + n, dtype=np.int64)),
            "text": text,
            "finish_reason": const("stop"),
            "prompt_tokens": pa.array(rng.integers(200, 400, size=n)),
            "completion_tokens": pa.array(lengths // 4),
            "attempts": pa.array(np.ones(n, dtype=np.int64)),
            "latency_s": pa.array(rng.random(n) * 30),
            "error": pa.array(errors, pa.string()),
            "rejected": const(None),
            "created_at": const((self.t0 + timedelta(seconds=number)).isoformat()),
            "segment": const(key),
        }
        table = pa.table(columns, schema=cache_mod.SCHEMA)
        self.cache.storage.write_parquet(key, table)
        self.cache._write_index(key, pl.from_arrow(table.select(["request_id", "error"])))

    def scope(self, scope: str, segments: list[tuple[int, int]]) -> None:
        """A scope's segments in order, its index merged after each one as SegmentWriter does."""
        for first, number in segments:
            self.segment(scope, first, number)
            self.cache.merge_index(scope)


def build(root: Path, rows: int, scope_rows: int, segment_rows: int, pool: bytes, seed: int = 0) -> dict:
    """The cache, and the request to ask of it with the ids that must come back finished."""
    n_segments = rows // segment_rows
    own = scope_rows // segment_rows
    others = SCOPES[1:]
    plan: dict[str, list[tuple[int, int]]] = {s: [] for s in SCOPES}
    plan[ASKED_SCOPE] = [(j * segment_rows, j) for j in range(own)]
    for j in range(n_segments - own):
        plan[others[j % len(others)]].append(((own + j) * segment_rows, own + j))
    builder = Builder(root, segment_rows, pool)
    with ThreadPoolExecutor(2) as pool_:  # scopes are independent; Parquet writes release the GIL
        list(pool_.map(lambda s: builder.scope(s, plan[s]), [s for s in SCOPES if plan[s]]))

    rng = random.Random(seed)
    asked = rng.sample(range(scope_rows), ASKED_IN_SCOPE)
    cross_segments = rng.sample(range(own, own + min(len(others), n_segments - own)), CROSS_BLOCKS)  # distinct scopes
    for j in cross_segments:
        start = j * segment_rows + rng.randrange(segment_rows - CROSS_BLOCK_ROWS + 1)
        asked += range(start, start + CROSS_BLOCK_ROWS)
    ids = [request_id(i) for i in asked] + [hashlib.sha256(f"never-{k}".encode()).hexdigest() for k in range(NEVER)]
    rng.shuffle(ids)
    return {"scope": ASKED_SCOPE, "ids": ids, "expected": sorted(request_id(i) for i in asked if not failed(i))}


def run_new(root: str, scope: str, ids: list[str]):
    from synth_cpt.core.storage import LocalStorage
    from synth_cpt.generation.cache import GenerationCache

    cache = GenerationCache(LocalStorage(root))
    t0 = time.perf_counter()
    done = cache.finished_ids(ids, scope)
    t1 = time.perf_counter()
    rows = cache.finished(ids, scope)
    return done, rows, t1 - t0, time.perf_counter() - t1


def run_old(root: str, scope: str, ids: list[str]):
    from benchmarks.baselines.cache_v0 import GenerationCache
    from synth_cpt.core.storage import LocalStorage

    cache = GenerationCache(LocalStorage(root))
    t0 = time.perf_counter()
    done = cache.finished_ids() & set(ids)  # what the engine did with it
    t1 = time.perf_counter()
    rows = cache.finished(ids)
    return done, rows, t1 - t0, time.perf_counter() - t1


def child(which: str, root: str, request: str, out: str) -> None:
    req = json.loads(Path(request).read_text())
    done, rows, ids_s, rows_s = (run_new if which == "new" else run_old)(root, req["scope"], req["ids"])
    # ru_maxrss of a child started by fork+exec starts at the parent's RSS (Linux keeps the larger of
    # the two across exec), so it is reported beside VmHWM, the peak of this process's own memory
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    status = Path("/proc/self/status")
    hwm = [int(line.split()[1]) / 1024 for line in status.read_text().splitlines() if line.startswith("VmHWM:")] if status.exists() else []
    rss = hwm[0] if hwm else maxrss
    rows.select("request_id", "text").write_parquet(out + ".parquet")
    Path(out + ".json").write_text(json.dumps(sorted(done)))
    print(
        json.dumps(
            {"ids_s": ids_s, "rows_s": rows_s, "seconds": ids_s + rows_s, "rows": rows.height, "peak_rss_mb": rss, "ru_maxrss_mb": maxrss}
        )
    )


def compare(work: Path, expected: list[str]) -> None:
    """Both sides: the same finished ids (the expected ones) and the same rows with the same texts."""
    import polars as pl

    for which in ("old", "new"):
        done = json.loads(Path(work, f"{which}.json").read_text())
        if done != expected:
            raise SystemExit(
                f"{which}: finished_ids gave {len(done)} ids, expected {len(expected)} ({len(set(done) ^ set(expected))} differ)"
            )
    old = pl.read_parquet(work / "old.parquet").sort("request_id")
    new = pl.read_parquet(work / "new.parquet").sort("request_id")
    if old["request_id"].to_list() != expected or not old.equals(new):
        raise SystemExit(f"old and new rows disagree: {old.height} vs {new.height} rows, expected {len(expected)}")


def bench(root: Path, rows: int, args: argparse.Namespace, pool: bytes) -> dict:
    work = root / f"rows-{rows}"
    cache_root = work / "cache"
    try:
        t = time.perf_counter()
        req = build(cache_root, rows, args.scope_rows, args.segment_rows, pool)
        build_s = time.perf_counter() - t
        segs = sum(1 for _ in (cache_root / "generations" / "segments").rglob("*.parquet"))
        index = sum(1 for _ in (cache_root / "generations" / "index").rglob("*.parquet"))
        mb = sum(p.stat().st_size for p in cache_root.rglob("*.parquet")) / 1e6
        print(f"{rows:,} rows: built in {build_s:.1f} s: {segs:,} segments, {index:,} index files, {mb:,.0f} MB on disk", flush=True)
        request = work / "request.json"
        request.write_text(json.dumps(req))
        runs: dict[str, list[dict]] = {"old": [], "new": []}
        for attempt in range(args.repeats + 1):  # the first is a warm-up
            for which in ("old", "new"):
                r = measure(__file__, which, cache_root, request, work / which, cwd=REPO)
                print(f"  {'warm-up' if attempt == 0 else f'run {attempt}':8} {which}: {r['ids_s']:.3f} s ids + {r['rows_s']:.3f} s rows,"
                      f" {r['rows']:,} rows, peak RSS {r['peak_rss_mb']:.0f} MB (ru_maxrss {r['ru_maxrss_mb']:.0f})", flush=True)  # fmt: skip
                if attempt:
                    runs[which].append(r)
            if attempt == 0:
                compare(work, req["expected"])
        best = {w: min(rs, key=lambda r: r["seconds"]) for w, rs in runs.items()}
        best["new"]["peak_rss_mb"] = max(r["peak_rss_mb"] for r in runs["new"])
        best["old"]["peak_rss_mb"] = max(r["peak_rss_mb"] for r in runs["old"])
        return {"rows": rows, "build_s": build_s, "segments": segs, "finished": len(req["expected"]), **best}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2_000_000, help="rows of the big cache (default 2,000,000); N/10 is run too")
    parser.add_argument("--segment-rows", type=int, default=1_000, help="rows per segment (default 1,000)")
    parser.add_argument("--scope-rows", type=int, default=SCOPE_ROWS, help="rows of the asked scope at both sizes (default 20,000)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each side after a warm-up (best is kept)")
    parser.add_argument("--root", help="where to build the caches (default: a temp dir); removed at the end")
    parser.add_argument("--child", nargs=4, metavar=("WHICH", "ROOT", "REQUEST", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    small = args.rows // 10
    args.scope_rows = min(args.scope_rows, small // 2) // args.segment_rows * args.segment_rows
    if args.scope_rows < ASKED_IN_SCOPE + args.segment_rows or small - args.scope_rows < CROSS_BLOCKS * args.segment_rows:
        raise SystemExit(f"--rows {args.rows:,} is too small for a {ASKED_IN_SCOPE:,}-id ask (need N/10 >= 20,000)")
    base = Path(args.root or tempfile.gettempdir())
    base.mkdir(parents=True, exist_ok=True)
    free_gb, need_gb = shutil.disk_usage(base).free / 1e9, args.rows * 700 / 1e9
    print(f"{base}: {free_gb:,.0f} GB free, about {need_gb:,.1f} GB needed; load average {os.getloadavg()[0]:.2f}", flush=True)
    if free_gb < need_gb * 1.5:
        raise SystemExit("not enough disk")
    t = time.perf_counter()
    pool = text_pool()
    print(f"text pool: {len(pool) / 1e6:.0f} MB in {time.perf_counter() - t:.1f} s", flush=True)
    with tempfile.TemporaryDirectory(prefix="synth-cpt-cachebench-", dir=base) as tmp:
        results = [bench(Path(tmp), n, args, pool) for n in (small, args.rows)]
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(
        f"{'rows':>10} {'segments':>9} {'build s':>8} {'old s':>8} {'new s':>8} {'new ids s':>10} {'new rows s':>11} {'speedup':>8} {'old RSS MB':>11} {'new RSS MB':>11}"
    )
    for r in results:
        old, new = r["old"], r["new"]
        print(f"{r['rows']:>10,} {r['segments']:>9,} {r['build_s']:>8.1f} {old['seconds']:>8.3f} {new['seconds']:>8.3f} {new['ids_s']:>10.3f}"
              f" {new['rows_s']:>11.3f} {old['seconds'] / new['seconds']:>8.1f} {old['peak_rss_mb']:>11.0f} {new['peak_rss_mb']:>11.0f}")  # fmt: skip
    small_r, big = results
    print(
        f"RESULT cache speedup={big['old']['seconds'] / big['new']['seconds']:.1f} lookup_s={big['new']['seconds']:.3f}"
        f" growth={big['new']['seconds'] / small_r['new']['seconds']:.2f} peak_rss_mb={big['new']['peak_rss_mb']:.0f}"
    )


if __name__ == "__main__":
    main()
