"""The training-mix build before streaming (frozen for benchmarks/mix.py): every component read whole into
memory (texts included), counted, taken, concatenated, shuffled and sharded from memory; a `.bin` shard
encodes its texts again. A copy of `synth_cpt/mix/build.py` (with the shard writer of `mix/shards.py` and
the take/shuffle of `mix/plan.py`) as of 399ca71; the recipe arithmetic (`plan_mix`, `shard_bounds`) and
the core modules are shared, as they were not changed.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl
import zstandard

from synth_cpt.core import publish
from synth_cpt.core.config import MixRecipe
from synth_cpt.core.contracts import MIX_SHARD, check_mix
from synth_cpt.core.layout import (
    ENTIGRAPH_CORPUS,
    INPUTS,
    QUALITY_SUBSETS,
    SYNTHETIC_ROWS,
    TOKENIZER,
    drop_prefix,
    mix_asset,
    partition_file,
    partition_prefix,
    rewrite_asset,
    snapshot_key,
    version_prefix,
)
from synth_cpt.core.storage import Storage
from synth_cpt.core.validation import Outcome
from synth_cpt.mix.plan import MixPlan, Part, plan_mix, shard_bounds
from synth_cpt.mix.shards import document_bos, shard_name, token_dtype, token_layout

if TYPE_CHECKING:
    from synth_cpt.corpus.tokenizer import TokenCounter

MANIFEST = "manifest.json"
REPEATS = "repeats.parquet"
_SYNTH_COLUMNS = ["synth_id", "doc_id", "drop_id", "drop_version", "text", "prompt_sha", "model_fingerprint"]
DROP_VERSION = "drop_version"  # the drop version a row came from, where its producer records it (null otherwise)
TOKEN_COUNTS = ("tokens: the documents' own tokens (sum of n_tokens, text ids only); tokens_in_file: the ids a .bin shard holds, "
                "every document framed as [BOS] ids EOS (see token_shards)")  # fmt: skip


def _order(n: int, seed: int, origin: str, epoch: int) -> list[int]:
    rng = random.Random(hashlib.sha256(f"{seed}:{origin}:{epoch}".encode()).digest())
    order = list(range(n))
    rng.shuffle(order)
    return order


def take(tokens: list[int], target: int, max_epochs: int, seed: int, origin: str) -> list[int]:
    """Indices of the documents a component takes (a document once per pass it is in), by the token rule."""
    out: list[int] = []
    total = 0
    for epoch in range(max_epochs):
        passed_over = False
        for i in _order(len(tokens), seed, origin, epoch):
            if total + tokens[i] > target:
                passed_over = True
                continue
            out.append(i)
            total += tokens[i]
        if passed_over:  # this was the last pass: a next one would only take what fits the same way
            return out
    return out


def shuffled(n: int, seed: int) -> list[int]:
    """The mix's row order: one seeded permutation of all rows taken."""
    return _order(n, seed, "mix", 0)


@dataclass(frozen=True)
class WrittenShard:
    """The keys one shard format was written to, and for `.bin` the ids it holds (BOS and EOS included)."""

    keys: list[str] = field(default_factory=list)
    tokens_in_file: int | None = None


def write_shard(
    storage: Storage, folder: str, index: int, rows: pl.DataFrame, fmt: str, tokenizer: TokenCounter | None = None
) -> WrittenShard:
    """Write one shard in one format (each file atomically)."""
    key = f"{folder}/{shard_name(index, fmt)}"
    if fmt == "parquet":
        storage.write_parquet(key, rows)
        return WrittenShard([key])
    if fmt == "jsonl.zst":
        buffer = io.BytesIO()
        rows.write_ndjson(buffer)
        storage.write_bytes(key, zstandard.ZstdCompressor(level=3).compress(buffer.getvalue()))
        return WrittenShard([key])
    if fmt == "tokens":
        if tokenizer is None:
            raise ValueError("the tokens format needs the target tokenizer")
        eos = tokenizer.eos_id
        if eos is None:
            raise ValueError(f"the {tokenizer.kind} tokenizer has no EOS id: the tokens format separates documents with EOS")
        head = [] if (bos := document_bos(tokenizer)) is None else [bos]
        ids = tokenizer.encode(rows["text"].to_list())
        lengths = np.fromiter((len(head) + len(d) + 1 for d in ids), dtype=np.int64, count=len(ids))
        index_values = np.concatenate([[0], np.cumsum(lengths)]).astype("<i8")
        dtype = token_dtype(tokenizer.vocab_size)
        flat = np.fromiter((t for doc in ids for t in (*head, *doc, eos)), dtype=np.int64, count=int(lengths.sum()))
        if flat.size and (flat.min() < 0 or flat.max() > np.iinfo(dtype).max):  # never wrap an id around silently
            raise ValueError(f"token id {int(flat.max())} does not fit {dtype.name} (vocab_size {tokenizer.vocab_size})")
        flat = flat.astype(dtype)
        idx_key = key.removesuffix(".bin") + ".idx"
        storage.write_bytes(key, flat.tobytes())
        storage.write_bytes(idx_key, index_values.tobytes())
        return WrittenShard([key, idx_key], int(flat.size))
    raise ValueError(f"unknown shard format {fmt!r}")


def origin_of(source: str) -> str:
    """Config source -> the shard rows' `origin` (original | rewrite:<style> | entigraph)."""
    return "original" if source == "originals" else source


@dataclass
class Component:
    """What a component can draw from, and the exact input it was read from (its pin)."""

    frame: pl.DataFrame
    pin: dict[str, Any]
    snapshot: bytes | None = None  # a one-file input's bytes as read, kept under the pin's key once the mix is planned


def _with_lineage_columns(frame: pl.DataFrame) -> pl.DataFrame:
    missing = [pl.lit(None, pl.String).alias(c) for c in _SYNTH_COLUMNS if c not in frame.columns]
    return frame.with_columns(missing).select(_SYNTH_COLUMNS).with_columns(pl.col(DROP_VERSION).cast(pl.String))


def component_rows(storage: Storage, origin: str, language: str, quality: str) -> Component | None:
    """A component's rows read once from what is published (None when its partition never was), and its pin."""
    if origin == "original":
        key = partition_file(QUALITY_SUBSETS, language, quality)
        if not storage.exists(key):
            return None
        data = storage.read_bytes(key)  # read once: the pin is exactly what the mix read
        sha = hashlib.sha256(data).hexdigest()
        names = pl.read_parquet_schema(io.BytesIO(data))
        frame = pl.read_parquet(io.BytesIO(data), columns=[c for c in ("doc_id", "drop_id", DROP_VERSION, "text") if c in names])
        pin = {"component": origin, "asset": QUALITY_SUBSETS, "prefix": snapshot_key(partition_prefix(QUALITY_SUBSETS, language, quality), sha),
               "source": key, "sha256": sha}  # fmt: skip
        return Component(_with_lineage_columns(frame), pin, data)
    asset = ENTIGRAPH_CORPUS if origin == "entigraph" else rewrite_asset(origin.split(":", 1)[1])
    pointer = publish.published(storage, partition_prefix(asset, language, quality))
    if pointer is None:
        return None
    key = f"{pointer['prefix']}/{SYNTHETIC_ROWS}"
    # opened once for ranged reads: the footer and the lineage columns, not the object (on S3 a
    # download, and a second open for the schema, would fetch what the mix never uses)
    with contextlib.closing(storage.parquet_file(key)) as pf:
        names = pf.schema_arrow.names
        frame = pl.from_arrow(pf.read(columns=[c for c in _SYNTH_COLUMNS if c in names]))
    return Component(
        _with_lineage_columns(frame), {"component": origin, "asset": asset, "prefix": pointer["prefix"], "version": pointer["version"]}
    )


def _tokenizer_pin(storage: Storage, tokenizer: TokenCounter) -> list[dict[str, Any]]:
    """The published tokenizer version, when it is the one the mix counted with."""
    from synth_cpt.corpus.tokenizer import published_tokenizer

    try:
        pointer = published_tokenizer(storage)
    except FileNotFoundError:
        return []
    if pointer["version"] == publish.LEGACY or pointer["info"].get("sha256") != tokenizer.sha256:
        return []
    return [{"asset": TOKENIZER, "prefix": pointer["prefix"], "version": pointer["version"]}]


def _drop_pins(mixed: pl.DataFrame) -> list[dict[str, Any]]:
    if not mixed.height or DROP_VERSION not in mixed.columns:
        return []
    pairs = mixed.select("drop_id", DROP_VERSION).drop_nulls().unique().sort("drop_id", DROP_VERSION)
    return [{"asset": "crawl_drops", "drop_id": d, "prefix": version_prefix(drop_prefix(d), v), "version": v} for d, v in pairs.iter_rows()]


@dataclass
class MixResult:
    plan: MixPlan
    pointer: dict[str, Any] | None
    outcome: Outcome
    manifest: dict[str, Any]
    kept: str | None = None  # where a rejected candidate was kept
    missing: list[str] = field(default_factory=list)
    superseded_by: str | None = None  # a newer run's version was published meanwhile: it stays in force


def recipe_sha(recipe: MixRecipe) -> str:
    return hashlib.sha256(json.dumps(recipe.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()


def _gather(frame: pl.DataFrame, rows: list[int]) -> pl.DataFrame:
    return frame.select(pl.all().gather(pl.Series(rows, dtype=pl.UInt32)))


def build_mix(
    storage: Storage, name: str, recipe: MixRecipe, language: str, quality: str, tokenizer: TokenCounter, run_id: str | None = None
) -> MixResult:
    """Plan, write, validate, publish (see the module docstring). Raises MixShortfall before writing."""
    parts_cfg = recipe.parts()
    frames: dict[str, pl.DataFrame] = {}
    components: dict[str, Component] = {}
    missing: list[str] = []
    for part in parts_cfg:
        origin = origin_of(part.source)
        component = component_rows(storage, origin, language, quality)
        if component is None:
            missing.append(origin)
            frame = pl.DataFrame(schema={c: pl.String for c in _SYNTH_COLUMNS})
        else:
            components[origin], frame = component, component.frame
        frames[origin] = frame.with_columns(pl.Series("n_tokens", tokenizer.count(frame["text"].to_list()), dtype=pl.Int64))
    parts = [Part(origin_of(p.source), p.ratio, p.max_epochs, int(frames[origin_of(p.source)]["n_tokens"].sum() or 0)) for p in parts_cfg]
    plan = plan_mix(parts, target_tokens=recipe.target_tokens, target_originals=recipe.target_originals, on_shortfall=recipe.on_shortfall)

    taken: list[pl.DataFrame] = []
    repeats: list[pl.DataFrame] = []
    for p in plan.parts:
        frame = frames[p.origin]
        picked = take(frame["n_tokens"].to_list(), p.target, p.max_epochs, recipe.seed, p.origin)
        rows = _gather(frame, picked).with_columns(pl.lit(p.origin).alias("origin"))
        taken.append(rows)
        counts = Counter(picked)
        once = _gather(frame, list(counts))
        repeats.append(
            pl.DataFrame(
                {
                    "origin": [p.origin] * len(counts),
                    "doc_id": once["doc_id"].to_list(),
                    "synth_id": once["synth_id"].to_list(),
                    "repeats": list(counts.values()),
                },
                schema={"origin": pl.String, "doc_id": pl.String, "synth_id": pl.String, "repeats": pl.Int64},
            )  # fmt: skip
        )
    mixed = pl.concat(taken) if taken else pl.DataFrame()
    mixed = _gather(mixed, shuffled(mixed.height, recipe.seed)) if mixed.height else mixed
    rows = mixed.select([c for c in MIX_SHARD.names]) if mixed.height else pl.from_arrow(MIX_SHARD.empty_table())
    largest = {o: int(f["n_tokens"].max() or 0) for o, f in frames.items()}
    outcome = check_mix(rows, [p.origin for p in plan.parts], {p.origin: (p.target, largest[p.origin]) for p in plan.parts})

    prefix = partition_prefix(mix_asset(name), language, quality)
    version = publish.new_version()
    folder = publish.version_prefix(prefix, version)
    # pins first (gc reads them from a mix still being built), then the snapshots they name, always
    # (re)written: a gc planned before the pins may be about to remove an existing one, and it leaves a
    # snapshot written within CANDIDATE_GRACE alone (content-addressed: rewriting changes no byte)
    inputs = [c.pin for c in components.values()] + _tokenizer_pin(storage, tokenizer) + _drop_pins(mixed)
    storage.write_json(f"{folder}/{INPUTS}", inputs)
    for c in components.values():
        if c.snapshot is not None:
            storage.write_bytes(c.pin["prefix"], c.snapshot)
        c.snapshot = None
    shards = []
    for i, (a, b) in enumerate(shard_bounds(rows["n_tokens"].to_list(), recipe.shard_tokens)):
        shard = rows[a:b]
        written = [write_shard(storage, folder, i, shard, fmt, tokenizer) for fmt in recipe.formats]
        by_origin = shard.group_by("origin").agg(pl.len().alias("documents"), pl.col("n_tokens").sum().alias("tokens")).sort("origin")
        in_file = [w.tokens_in_file for w in written if w.tokens_in_file is not None]
        shards.append({"shard": i, "files": [k.rsplit("/", 1)[1] for w in written for k in w.keys], "documents": shard.height,
                       "tokens": int(shard["n_tokens"].sum() or 0), **({"tokens_in_file": in_file[0]} if in_file else {}),
                       "by_origin": {r["origin"]: {"documents": r["documents"], "tokens": r["tokens"]} for r in by_origin.to_dicts()}})  # fmt: skip
    repeat_table = pl.concat(repeats) if repeats else pl.DataFrame()
    storage.write_parquet(f"{folder}/{REPEATS}", repeat_table)
    synthetic = mixed.filter(pl.col("origin") != "original") if mixed.height else mixed
    by_origin = rows.group_by("origin").agg(pl.len().alias("documents"), pl.col("n_tokens").sum().alias("tokens")).sort("origin")
    manifest = {
        "recipe": name, "version": version, "recipe_sha": recipe_sha(recipe), "seed": recipe.seed, "language": language, "quality": quality, "run_id": run_id,
        "tokenizer_sha": tokenizer.sha256, "formats": list(recipe.formats), "shard_tokens": recipe.shard_tokens,
        "plan": plan.describe(), "missing_components": missing,
        "documents": rows.height, "tokens": int(rows["n_tokens"].sum() or 0), "token_counts": TOKEN_COUNTS,
        **({"tokens_in_files": sum(e["tokens_in_file"] for e in shards)} if "tokens" in recipe.formats else {}),
        "inputs": inputs,
        "by_origin": {r["origin"]: {"documents": r["documents"], "tokens": r["tokens"]} for r in by_origin.to_dicts()},
        "drops": sorted(set(mixed["drop_id"].drop_nulls().to_list())) if mixed.height else [],
        "prompt_shas": sorted(set(synthetic["prompt_sha"].drop_nulls().to_list())) if synthetic.height else [],
        "model_fingerprints": sorted(set(synthetic["model_fingerprint"].drop_nulls().to_list())) if synthetic.height else [],
        "repeats": {"file": REPEATS, "max": int(repeat_table["repeats"].max() or 0) if repeat_table.height else 0,
                    "documents_repeated": int((repeat_table["repeats"] > 1).sum()) if repeat_table.height else 0},
        "shards": shards,
        **({"token_shards": token_layout(tokenizer)} if "tokens" in recipe.formats else {}),
    }  # fmt: skip
    storage.write_json(f"{folder}/{MANIFEST}", manifest)
    if not outcome.success:
        kept = publish.reject_version(storage, prefix, version)
        return MixResult(plan, None, outcome, manifest, kept, missing)
    if not publish.publish_version(storage, prefix, version, {"asset": mix_asset(name), "manifest": MANIFEST, "shards": len(shards)}):
        newer = publish.published(storage, prefix)
        return MixResult(plan, None, outcome, manifest, None, missing, superseded_by=newer["version"] if newer else None)
    return MixResult(plan, publish.published(storage, prefix), outcome, manifest, None, missing)
