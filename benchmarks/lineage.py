"""Lineage answers at scale: `lineage doc` and `lineage shard` over a catalog of 10M synthetic rows.

Builds a storage root shaped like a real one (raw_corpus documents; 10M synthetic rows published as
rewrites_<style> partitions; their generations in the cache; a training mix whose shards hold 10M
rows), then times, in one run:
- ours: the catalog (views over the published versions only) and `synth-cpt lineage doc|shard`'s queries;
- baseline: the same answers with polars reading every file whole and filtering in Python memory,
  which is what a user without the catalog would do.
Last line: `RESULT lineage doc_s=<s> shard_s=<s>` (ours); target < 2 s each.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import polars as pl


def build(root: Path, rows: int, documents: int, files: int) -> tuple[str, str]:
    from synth_cpt.core.publish import publish_version
    from synth_cpt.core.storage import LocalStorage

    storage = LocalStorage(root)
    doc_ids = pl.int_range(0, documents, eager=True).cast(pl.String).str.zfill(32).alias("doc_id")
    storage.write_parquet(
        "raw_corpus/pt/high/part-0.parquet",
        pl.DataFrame({"doc_id": doc_ids, "drop_id": "drop-1", "source_file": "drop-1.jsonl", "source_line": pl.int_range(0, documents, eager=True),
                      "language": "pt", "quality": "high", "text": "um documento de exemplo"}),  # fmt: skip
    )
    per_file = rows // files
    for f in range(files):
        style = f"style{f:02d}"  # one rewrite asset per file: 40 styles of one partition
        start = f * per_file
        idx = pl.int_range(start, start + per_file, eager=True)
        frame = pl.DataFrame({"i": idx}).select(
            ("s" + pl.col("i").cast(pl.String).str.zfill(31)).alias("synth_id"),
            (pl.col("i") % documents).cast(pl.String).str.zfill(32).alias("doc_id"),
            pl.lit("drop-1").alias("drop_id"), pl.lit("rewrite").alias("kind"), pl.lit(style).alias("style"),
            pl.concat_list(["r" + pl.col("i").cast(pl.String).str.zfill(63)]).alias("request_ids"),
            pl.lit(f"sha-{style}").alias("prompt_sha"), pl.lit("fp").alias("model_fingerprint"),
            pl.lit("um texto reescrito de exemplo").alias("text"), pl.lit(7).alias("n_tokens"),
        )  # fmt: skip
        prefix = f"rewrites_{style}/pt/high"
        storage.write_parquet(f"{prefix}/v/v1/rows.parquet", frame)
        publish_version(storage, prefix, "v1", {"asset": f"rewrites_{style}"})
        storage.write_parquet(
            f"generations/segments/{prefix}/seg-{f:05d}.parquet",  # the cache's layout: segments/<scope>/
            frame.select(pl.col("request_ids").list.first().alias("request_id"), pl.lit("2026-12-04T00:00:00").alias("created_at"),
                         pl.lit(None, pl.String).alias("error")),  # fmt: skip
        )
        if f == 0:
            probe_doc = frame["doc_id"][123]
    # a mix: 10 shards over all synthetic rows
    shard_rows = rows // 10
    for s in range(10):
        idx = pl.int_range(s * shard_rows, (s + 1) * shard_rows, eager=True)
        shard = pl.DataFrame({"i": idx}).select(
            pl.lit("um texto").alias("text"), ("rewrite:style" + (pl.col("i") // per_file).cast(pl.String).str.zfill(2)).alias("origin"),
            ("s" + pl.col("i").cast(pl.String).str.zfill(31)).alias("synth_id"),
            (pl.col("i") % documents).cast(pl.String).str.zfill(32).alias("doc_id"), pl.lit("drop-1").alias("drop_id"),
            pl.lit(7).alias("n_tokens"),
        )  # fmt: skip
        storage.write_parquet(f"training_mix_bench/pt/high/v/v1/shard-{s:05d}.parquet", shard)
    storage.write_json("training_mix_bench/pt/high/v/v1/manifest.json", {"recipe_sha": "x", "seed": 1, "tokens": rows * 7, "documents": rows,
                       "shards": [{}] * 10, "by_origin": {}, "drops": ["drop-1"], "prompt_shas": [], "model_fingerprints": [],
                       "tokenizer_sha": "t", "run_id": "run"})  # fmt: skip
    publish_version(storage, "training_mix_bench/pt/high", "v1", {"asset": "training_mix_bench"})
    return probe_doc, str(root / "training_mix_bench/pt/high/v/v1/shard-00003.parquet")


def baseline(root: Path, doc_id: str, shard: str) -> tuple[float, float]:
    started = time.monotonic()
    synthetic = pl.concat([pl.read_parquet(p) for p in root.glob("rewrites_*/*/*/v/*/rows.parquet")])
    shards = pl.concat([pl.read_parquet(p).with_columns(pl.lit(p.name).alias("shard")) for p in root.glob("training_mix_*/*/*/v/*/shard-*.parquet")])
    assert synthetic.filter(pl.col("doc_id") == doc_id).height and shards.filter(pl.col("doc_id") == doc_id).height
    doc_s = time.monotonic() - started
    started = time.monotonic()
    rows = pl.read_parquet(shard)
    synthetic = pl.concat([pl.read_parquet(p) for p in root.glob("rewrites_*/*/*/v/*/rows.parquet")])
    made = rows.join(synthetic, on="synth_id").group_by("prompt_sha").len()
    assert made.height
    return doc_s, time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--documents", type=int, default=1_000_000)
    parser.add_argument("--files", type=int, default=40)
    parser.add_argument("--keep", help="build (or reuse) the catalog data here instead of a temporary folder")
    args = parser.parse_args()
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench-lineage-"))
    started = time.monotonic()
    doc_id, shard = build(root, args.rows, args.documents, args.files)
    print(f"built {args.rows:,} synthetic rows, {args.documents:,} documents, a 10-shard mix in {time.monotonic() - started:.1f} s", flush=True)

    from synth_cpt.core.storage import LocalStorage
    from synth_cpt.lineage import queries
    from synth_cpt.lineage.catalog import Catalog

    started = time.monotonic()
    catalog = Catalog(LocalStorage(root))
    open_s = time.monotonic() - started
    started = time.monotonic()
    answer = queries.doc(catalog, doc_id)
    doc_s = time.monotonic() - started
    started = time.monotonic()
    made = queries.shard(catalog, shard)
    shard_s = time.monotonic() - started
    assert answer["synthetic"] and answer["shards"] and made["made_by"], "the answers are not empty"
    base_doc, base_shard = baseline(root, doc_id, shard)
    print(f"catalog opened in {open_s:.2f} s; doc: {len(answer['synthetic'])} descendants, {sum(r['copies'] for r in answer['shards'])} shard rows")
    print(f"baseline (polars, every file read whole): doc {base_doc:.2f} s, shard {base_shard:.2f} s; "
          f"ours: doc {doc_s:.2f} s, shard {shard_s:.2f} s; ratio doc {base_doc / doc_s:.1f}, shard {base_shard / shard_s:.1f}")  # fmt: skip
    print(f"RESULT lineage doc_s={doc_s:.2f} shard_s={shard_s:.2f}")
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
