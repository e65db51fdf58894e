"""Ingest throughput: `crawl_drops`' code against a plain per-record Python baseline, side by side.

Both parse, normalize, hash, language-identify and score every record of the same generated drop
(>= 200 MB of realistic Portuguese and English text built from the sample corpus, 1% broken
records), and both write docs and quarantine Parquet files. Each runs in its own process so its peak
RSS is its own.

    python benchmarks/ingest.py [--mb 200] [--profile TOP]

Last line: RESULT ingest ratio=<ours/baseline> mb_s=<ours> peak_rss_mb=<ours>
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.processes import measure  # noqa: E402


def paragraphs() -> list[str]:
    import polars as pl
    import zstandard

    drops = REPO / "synth_cpt" / "sample_corpus" / "drops"
    texts: list[str] = []
    with gzip.open(drops / "2026-11-01_pt_gimp-help.jsonl.gz") as f:
        texts += [json.loads(line)["text"] for line in f]
    data = zstandard.ZstdDecompressor().stream_reader(open(drops / "2026-11-01_en_gimp-help.jsonl.zst", "rb")).read()
    texts += [json.loads(line)["text"] for line in data.splitlines()]
    texts += pl.read_parquet(drops / "2026-11-02_en_debian-edu.parquet")["text"].to_list()
    return [p for t in texts for p in t.split("\n\n") if len(p) > 40]


def generate(path: Path, megabytes: int, seed: int = 0) -> int:
    """A JSONL drop of unique documents of 10-30 shuffled paragraphs (~3 KB, about the mean length of
    a FineWeb document: 15T tokens over 22B documents); 1% broken records."""
    rng = random.Random(seed)
    pool = paragraphs()
    target = megabytes * 1_000_000
    written = n = 0
    broken = [b'{"text": "unterminated', b'["not", "an", "object"]', b'{"text": null}', b'{"id": 1}', b'{"text": "caf\xe9"}']
    with open(path, "wb") as f:
        while written < target:
            n += 1
            if n % 100 == 0:
                line = rng.choice(broken)
            else:
                k = rng.randint(10, 30)
                text = "\n\n".join(rng.sample(pool, k)) + f"\n\n({n})"
                line = json.dumps({"id": f"doc-{n}", "url": f"https://example.org/{n}", "text": text}, ensure_ascii=False).encode()
            f.write(line + b"\n")
            written += len(line) + 1
    return written


def run_ours(drop: str, out: str, limits: dict | None = None) -> dict:
    from synth_cpt.core.config import parse_config
    from synth_cpt.core.storage import LocalStorage
    from synth_cpt.ingest.drops import ingest_drop
    from synth_cpt.ingest.sources import list_drops

    settings = {"storage_root": out, "drops": {"location": str(Path(drop).parent)}, "limits": limits or {}}
    cfg = parse_config(json.dumps(settings), "benchmark")
    location = LocalStorage(Path(drop).parent)
    (d,) = [x for x in list_drops(location, cfg.drops.patterns).drops if x.relative_path == Path(drop).name]
    start = time.perf_counter()
    report = ingest_drop(cfg, LocalStorage(out), location, d)
    return {"seconds": time.perf_counter() - start, "documents": report.documents, "quarantined": report.quarantined}


def run_baseline(drop: str, out: str) -> dict:
    """What a plain Python ingester does: one record at a time, everything in the interpreter, the same
    steps as ours (encoding repair with ftfy behind its own badness test, normalization, a no-letters
    check, language id, heuristic score, doc_id)."""
    import re

    import ftfy
    import pyarrow as pa
    import pyarrow.parquet as pq
    from ftfy.badness import BADNESS_RE

    from synth_cpt.text.heuristics import score_text
    from synth_cpt.text.langid import identify
    from synth_cpt.text.normalize import doc_id, normalize_text

    letter = re.compile(r"[^\W\d_]")
    start = time.perf_counter()
    docs, quarantine = [], []
    with open(drop, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            try:
                obj = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                quarantine.append({"source_line": line_no, "reason": str(exc)})
                continue
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                quarantine.append({"source_line": line_no, "reason": "bad record"})
                continue
            fixed = ftfy.fix_encoding(obj["text"]) if BADNESS_RE.search(obj["text"]) else obj["text"]
            repaired = fixed != obj["text"]
            text = normalize_text(fixed)
            if not text:
                quarantine.append({"source_line": line_no, "reason": "empty"})
                continue
            if not letter.search(text):
                quarantine.append({"source_line": line_no, "reason": "no letters"})
                continue
            (code,), (prob,) = identify([text])
            if prob < 0.4:
                quarantine.append({"source_line": line_no, "reason": "language"})
                continue
            docs.append(
                {
                    "doc_id": doc_id(text), "text": text, "url": obj.get("url"), "language": code,
                    "language_score": prob, "score_heuristic": score_text(text), "n_chars": len(text), "source_line": line_no,
                    "encoding_repaired": repaired,
                }
            )  # fmt: skip
    os.makedirs(out, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(docs), f"{out}/docs.parquet", compression="zstd")
    pq.write_table(pa.Table.from_pylist(quarantine), f"{out}/quarantine.parquet", compression="zstd")
    return {"seconds": time.perf_counter() - start, "documents": len(docs), "quarantined": len(quarantine)}


def profile_ours(drop: Path, out: Path, top: int) -> None:
    """Where our CPU time goes: one process (no workers, polars on one thread), under cProfile."""
    import cProfile
    import pstats

    import synth_cpt.ingest.drops  # noqa: F401 - imported once per worker, not per batch
    from synth_cpt.text.langid import _model

    _model()  # loaded once per worker
    profiler = cProfile.Profile()
    profiler.enable()
    result = run_ours(str(drop), str(out), limits={"workers": 1})
    profiler.disable()
    stats = pstats.Stats(profiler)
    total = stats.total_tt  # type: ignore[attr-defined]
    print(f"ours in one process: {result['seconds']:.2f} s, cProfile total {total:.2f} s")
    rows = sorted(stats.stats.items(), key=lambda kv: kv[1][2], reverse=True)[:top]  # type: ignore[attr-defined]
    for (file, line, name), (_, calls, tottime, _, _) in rows:
        print(f"{100 * tottime / total:5.1f}% {tottime:7.2f} s {calls:8} calls  {name} ({Path(file).name}:{line})")


def child(which: str, drop: str, out: str) -> None:
    result = (run_ours if which == "ours" else run_baseline)(drop, out)
    # the main process plus its largest worker: an upper bound on what was resident at once
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    result["peak_rss_mb"] = (own + workers) / 1024
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=200, help="size of the generated drop in MB (default 200)")
    parser.add_argument("--profile", type=int, metavar="TOP", help="profile ours in one process and print the TOP costs (no baseline)")
    parser.add_argument("--child", nargs=3, metavar=("WHICH", "DROP", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    if args.profile:
        os.environ["POLARS_MAX_THREADS"] = "1"  # before polars is imported: a worker's share of 2 cores
    with tempfile.TemporaryDirectory(prefix="synth-cpt-bench-") as tmp:
        drop = Path(tmp, "drops", "bench.jsonl")
        drop.parent.mkdir()
        size = generate(drop, args.mb)
        mb = size / 1e6
        print(f"generated {drop.name}: {mb:,.1f} MB")
        if args.profile:
            profile_ours(drop, Path(tmp, "ours"), args.profile)
            return
        ours = measure(__file__, "ours", drop, Path(tmp, "ours"))
        base = measure(__file__, "baseline", drop, Path(tmp, "baseline"))
        if (ours["documents"], ours["quarantined"]) != (base["documents"], base["quarantined"]):
            raise SystemExit(f"ours and the baseline disagree: {ours} vs {base}")
    ours_mb_s, base_mb_s = mb / ours["seconds"], mb / base["seconds"]
    print(f"{'':10} {'seconds':>9} {'MB/s':>8} {'peak RSS MB':>12} {'documents':>10}")
    for name, r, rate in (("baseline", base, base_mb_s), ("ours", ours, ours_mb_s)):
        print(f"{name:10} {r['seconds']:9.1f} {rate:8.2f} {r['peak_rss_mb']:12.0f} {r['documents']:10,}")
    print(f"RESULT ingest ratio={ours_mb_s / base_mb_s:.2f} mb_s={ours_mb_s:.2f} peak_rss_mb={ours['peak_rss_mb']:.0f}")


if __name__ == "__main__":
    main()
