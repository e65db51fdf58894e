"""One training mix of one `language|quality` partition: components read, planned, taken, shuffled,
sharded, validated and published as one version (shards and manifests behind one pointer).

Every component is read from what is published (quality_subsets; the versions in force of
rewrites_<style> and entigraph_corpus) and its texts are counted with the target tokenizer (the
published `tokenizer`, SentencePiece or Hugging Face), whose ids and EOS the `.bin` shards hold. The
plan is made before anything is written (mix/plan.py), so a mix that cannot be made as asked fails
with its shortfall in tokens and writes nothing.

Strings are held a batch of rows and a shard at a time, never a whole component; what grows with the
input is a few numbers per row (tens of bytes); the repeats table (the ids of every distinct row
taken) is written in row groups as it is gathered. Each component is read once, `batch_rows` rows at a time (its text and lineage columns); texts are counted (and for `.bin`
shards encoded once) and, with each row's doc_id and synth_id, spooled to a local work folder
(mix/spool.py; under TMPDIR: on a pod, give it the room of the partition's text). Only numbers stay per row (token counts, spool positions, a lineage class), so the plan,
the pins, the manifest's lists and the suite are made from them, and each shard (and the repeats
table) gathers its rows' strings from the spool. The shards, inputs and manifest are byte for byte what reading
whole components made; repeats.parquet holds the same rows in other row groups.

A mix version pins the exact inputs it read (`inputs` in its manifest, written first as `inputs.json`):
each synthesis component's published version folder, the tokenizer's version, the drop versions its
rows name (when rows carry `drop_version`), and the subset partition by content (a one-file output: its
bytes as read are kept once under `quality_subsets/<l>/<q>/pinned/<sha256>.parquet`). `synth-cpt gc`
never removes a pinned input while the mix version stays, so a shard stays explainable.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from synth_cpt.core import publish
from synth_cpt.core.config import MixRecipe
from synth_cpt.core.contracts import MIX_SHARD, check_mix_columns
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
from synth_cpt.mix.plan import MixPlan, Part, plan_mix, shard_bounds, shuffled, take
from synth_cpt.mix.shards import token_layout, write_shard
from synth_cpt.mix.spool import Spooled, TextSpool

if TYPE_CHECKING:
    from synth_cpt.corpus.tokenizer import TokenCounter

MANIFEST = "manifest.json"
REPEATS = "repeats.parquet"
_SYNTH_COLUMNS = ["synth_id", "doc_id", "drop_id", "drop_version", "text", "prompt_sha", "model_fingerprint"]
_LINEAGE = [c for c in _SYNTH_COLUMNS if c != "text"]  # a row's lineage: spool.LINEAGE, then what only the manifest needs
DROP_VERSION = "drop_version"  # the drop version a row came from, where its producer records it (null otherwise)
TOKEN_COUNTS = ("tokens: the documents' own tokens (sum of n_tokens, text ids only); tokens_in_file: the ids a .bin shard holds, "
                "every document framed as [BOS] ids EOS (see token_shards)")  # fmt: skip
BATCH_ROWS = 2048  # rows read, counted and spooled at once (and the repeats table's ids gathered at once)
READ_BUFFER = 1 << 20  # texts are read from a column chunk in pieces of this size, never the whole chunk
_COPY_CHUNK = 1 << 20


def origin_of(source: str) -> str:
    """Config source -> the shard rows' `origin` (original | rewrite:<style> | entigraph)."""
    return "original" if source == "originals" else source


@dataclass
class Component:
    """Where a component's rows are read from (in file order, batch by batch), how many there are (from
    the footer), and the exact input it was read from (its pin): `snapshot` (a one-file input, copied as
    read: the bytes the pin names) or `texts_key` (a file of a published version folder, never rewritten)."""

    rows: int
    pin: dict[str, Any]
    snapshot: Path | None = None  # kept under the pin's key once the mix is planned
    texts_key: str | None = None


def _with_lineage_columns(frame: pl.DataFrame) -> pl.DataFrame:
    missing = [pl.lit(None, pl.String).alias(c) for c in _LINEAGE if c not in frame.columns]
    return frame.with_columns(missing).select(_LINEAGE).with_columns(pl.col(DROP_VERSION).cast(pl.String))


def component_rows(storage: Storage, origin: str, language: str, quality: str, workdir: Path | None = None) -> Component | None:
    """A published component (None when its partition never was): its row count and pin, nothing of its
    rows. The subset (a one-file output a rerun replaces) is copied once into `workdir` as it is hashed,
    so its rows, pin and snapshot are all of the same bytes."""
    if origin == "original":
        key = partition_file(QUALITY_SUBSETS, language, quality)
        if not storage.exists(key):
            return None
        if workdir is None:
            raise ValueError("the originals are read through a local copy: give component_rows a work folder")
        copy, digest = Path(workdir, "original.parquet"), hashlib.sha256()
        with contextlib.closing(storage.open(key)) as source, open(copy, "wb") as out:
            while chunk := source.read(_COPY_CHUNK):
                digest.update(chunk)
                out.write(chunk)
        sha = digest.hexdigest()
        pin = {"component": origin, "asset": QUALITY_SUBSETS, "prefix": snapshot_key(partition_prefix(QUALITY_SUBSETS, language, quality), sha),
               "source": key, "sha256": sha}  # fmt: skip
        return Component(pq.read_metadata(copy).num_rows, pin, snapshot=copy)
    asset = ENTIGRAPH_CORPUS if origin == "entigraph" else rewrite_asset(origin.split(":", 1)[1])
    pointer = publish.published(storage, partition_prefix(asset, language, quality))
    if pointer is None:
        return None
    key = f"{pointer['prefix']}/{SYNTHETIC_ROWS}"
    with contextlib.closing(storage.parquet_file(key)) as pf:  # the footer only (on S3 one ranged read)
        rows = pf.metadata.num_rows
    pin = {"component": origin, "asset": asset, "prefix": pointer["prefix"], "version": pointer["version"]}
    return Component(rows, pin, texts_key=key)


@contextlib.contextmanager
def component_batches(storage: Storage, component: Component, batch_rows: int = BATCH_ROWS) -> Iterator[Iterator[pa.RecordBatch]]:
    """The component's rows in file order, `batch_rows` at a time: its text and the lineage columns it has.
    Read from a local file without pre-buffering, so a row group's text column is never held whole (on
    S3 the rows file is downloaded to a temporary file first: the mix reads every text, most of it)."""
    with contextlib.ExitStack() as stack:
        path = component.snapshot if component.snapshot is not None else stack.enter_context(storage.local_path(str(component.texts_key)))
        pf = stack.enter_context(contextlib.closing(pq.ParquetFile(path, pre_buffer=False, buffer_size=READ_BUFFER)))
        columns = [c for c in ("text", *_LINEAGE) if c in pf.schema_arrow.names]
        yield pf.iter_batches(batch_size=batch_rows, columns=columns, use_threads=False)


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


def _drop_pins(pairs: set[tuple[str, str]]) -> list[dict[str, Any]]:
    """The drop versions the rows taken name (`pairs`: their distinct (drop_id, drop_version))."""
    return [{"asset": "crawl_drops", "drop_id": d, "prefix": version_prefix(drop_prefix(d), v), "version": v} for d, v in sorted(pairs)]


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


def _first_picks(picked: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The rows picked, each once in the order first picked, and how often each was."""
    rows, first, counts = np.unique(picked, return_index=True, return_counts=True)
    order = np.argsort(first, kind="stable")
    return rows[order], counts[order].astype(np.int64)


def _checked_columns(origins: list[str], comp: np.ndarray, n_tokens: np.ndarray, has: dict[str, np.ndarray]) -> pl.DataFrame:
    """The mix's rows as the suite of `check_mix` reads them (`contracts.check_mix_columns`), in the mix's
    order, made from numbers: origin and n_tokens as they are, `text_chars` 0 for an empty text and 1
    otherwise, `doc_id` a stand-in null exactly where the row's is (what the suite tests of them)."""
    original = comp == origins.index("original") if "original" in origins else np.zeros(comp.size, dtype=bool)
    return pl.DataFrame(
        {
            "origin": pl.Series(comp, dtype=pl.UInt32).replace_strict(dict(enumerate(origins)), return_dtype=pl.String),
            "doc_id": pl.Series(has["doc_id"], dtype=pl.Boolean),
            "n_tokens": pl.Series(n_tokens, dtype=pl.Int64),
            "text_chars": pl.Series(has["text"], dtype=pl.Boolean).cast(pl.Int64),
            "has_lineage": pl.Series(has["synth_id"] | original, dtype=pl.Boolean),
        }
    ).with_columns(doc_id=pl.when(pl.col("doc_id")).then(pl.lit("doc_id")).otherwise(pl.lit(None, pl.String)))


def build_mix(
    storage: Storage,
    name: str,
    recipe: MixRecipe,
    language: str,
    quality: str,
    tokenizer: TokenCounter,
    run_id: str | None = None,
    batch_rows: int = BATCH_ROWS,
) -> MixResult:
    """Plan, write, validate, publish (see the module docstring). Raises MixShortfall before writing."""
    with tempfile.TemporaryDirectory(prefix="synth-cpt-mix-") as work:
        spool = TextSpool(Path(work), with_ids="tokens" in recipe.formats)
        try:
            return _build(storage, name, recipe, language, quality, tokenizer, run_id, batch_rows, Path(work), spool)
        finally:
            spool.close()


def _build(
    storage: Storage, name: str, recipe: MixRecipe, language: str, quality: str, tokenizer: TokenCounter,
    run_id: str | None, batch_rows: int, work: Path, spool: TextSpool,
) -> MixResult:  # fmt: skip
    parts_cfg = recipe.parts()
    spooled: dict[str, Spooled] = {}  # origin -> where its rows are in the spool, their token counts and lineage classes
    components: dict[str, Component] = {}
    missing: list[str] = []
    for part in parts_cfg:
        origin = origin_of(part.source)
        component = component_rows(storage, origin, language, quality, work)
        if component is None:
            missing.append(origin)
            spooled[origin] = spool.add([], tokenizer, _with_lineage_columns)
            continue
        components[origin] = component
        with component_batches(storage, component, batch_rows) as batches:
            spooled[origin] = spool.add(batches, tokenizer, _with_lineage_columns)
        if spooled[origin].rows != component.rows:
            raise ValueError(f"{origin}: {spooled[origin].rows:,} rows read of the {component.rows:,} its footer counts")
    parts = [Part(origin_of(p.source), p.ratio, p.max_epochs, int(spooled[origin_of(p.source)].n_tokens.sum())) for p in parts_cfg]
    plan = plan_mix(parts, target_tokens=recipe.target_tokens, target_originals=recipe.target_originals, on_shortfall=recipe.on_shortfall)

    origins = [p.origin for p in plan.parts]
    classes = spool.classes
    picks: list[np.ndarray] = []
    firsts: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # origin -> the rows taken, each once in the order first taken, and their repeats
    pairs: set[tuple[str, str]] = set()  # (drop_id, drop_version) of the rows taken
    drops: set[str] = set()
    prompts: set[str] = set()
    models: set[str] = set()
    by_origin: dict[str, dict[str, int]] = {}
    for p in plan.parts:
        s = spooled[p.origin]
        picked = np.frombuffer(take(s.n_tokens.tolist(), p.target, p.max_epochs, recipe.seed, p.origin), dtype=np.int64)
        picks.append(picked)
        firsts[p.origin] = once, _ = _first_picks(picked)
        for c in (classes[int(k)] for k in np.unique(s.lineage_class[once])):
            if c["drop_id"] is not None:
                drops.add(c["drop_id"])  # type: ignore[arg-type]
                if c[DROP_VERSION] is not None:
                    pairs.add((c["drop_id"], c[DROP_VERSION]))  # type: ignore[arg-type]
            if p.origin != "original":
                prompts.update([c["prompt_sha"]] if c["prompt_sha"] is not None else [])  # type: ignore[list-item]
                models.update([c["model_fingerprint"]] if c["model_fingerprint"] is not None else [])  # type: ignore[list-item]
        if picked.size:
            by_origin[p.origin] = {"documents": int(picked.size), "tokens": int(s.n_tokens[picked].sum())}
    # the mix's rows, as (component, row) in the shuffled order
    comp = np.concatenate([np.full(k.size, i, dtype=np.int32) for i, k in enumerate(picks)])
    row = np.concatenate(picks)
    del picks
    order = np.frombuffer(shuffled(int(row.size), recipe.seed), dtype=np.int64)
    comp, row = comp[order], row[order]
    del order

    def column(values: dict[str, np.ndarray]) -> np.ndarray:
        """One value per row of the mix, from one array per component (in file order)."""
        out = np.empty(row.size, dtype=next(iter(values.values())).dtype) if values else np.empty(0, dtype=np.int64)
        for i, origin in enumerate(origins):
            mask = comp == i
            out[mask] = values[origin][row[mask]]
        return out

    has_doc = np.array([c["has_doc_id"] for c in classes] or [False], dtype=bool)
    has_synth = np.array([c["has_synth_id"] for c in classes] or [False], dtype=bool)
    n_tokens = column({o: spooled[o].n_tokens for o in origins})
    has = {
        "text": column({o: spooled[o].text_bytes > 0 for o in origins}),
        "doc_id": column({o: has_doc[spooled[o].lineage_class] for o in origins}),
        "synth_id": column({o: has_synth[spooled[o].lineage_class] for o in origins}),
    }
    largest = {o: int(spooled[o].n_tokens.max()) if spooled[o].rows else 0 for o in spooled}
    checked = _checked_columns(origins, comp, n_tokens, has)
    del has
    outcome = check_mix_columns(checked, MIX_SHARD.names, origins, {p.origin: (p.target, largest[p.origin]) for p in plan.parts})
    del checked

    prefix = partition_prefix(mix_asset(name), language, quality)
    version = publish.new_version()
    folder = publish.version_prefix(prefix, version)
    # pins first (gc reads them from a mix still being built), then the snapshots they name, always
    # (re)written: a gc planned before the pins may be about to remove an existing one, and it leaves a
    # snapshot written within CANDIDATE_GRACE alone (content-addressed: rewriting changes no byte)
    inputs = [c.pin for c in components.values()] + _tokenizer_pin(storage, tokenizer) + _drop_pins(pairs)
    storage.write_json(f"{folder}/{INPUTS}", inputs)
    for c in components.values():
        if c.snapshot is not None:
            with open(c.snapshot, "rb") as source, storage.writing(c.pin["prefix"]) as tmp, open(tmp, "wb") as out:
                while chunk := source.read(_COPY_CHUNK):
                    out.write(chunk)
    shards = []
    for i, (a, b) in enumerate(shard_bounds(n_tokens, recipe.shard_tokens)):
        shard, ids = _shard(spooled, spool, origins, comp[a:b], row[a:b], with_ids="tokens" in recipe.formats)
        written = [write_shard(storage, folder, i, shard, fmt, tokenizer, ids) for fmt in recipe.formats]
        by_shard = shard.group_by("origin").agg(pl.len().alias("documents"), pl.col("n_tokens").sum().alias("tokens")).sort("origin")
        in_file = [w.tokens_in_file for w in written if w.tokens_in_file is not None]
        shards.append({"shard": i, "files": [k.rsplit("/", 1)[1] for w in written for k in w.keys], "documents": shard.height,
                       "tokens": int(shard["n_tokens"].sum() or 0), **({"tokens_in_file": in_file[0]} if in_file else {}),
                       "by_origin": {r["origin"]: {"documents": r["documents"], "tokens": r["tokens"]} for r in by_shard.to_dicts()}})  # fmt: skip
        del shard, ids
    repeated = write_repeats(storage, f"{folder}/{REPEATS}", spool, spooled, firsts, batch_rows)
    manifest = {
        "recipe": name, "version": version, "recipe_sha": recipe_sha(recipe), "seed": recipe.seed, "language": language, "quality": quality, "run_id": run_id,
        "tokenizer_sha": tokenizer.sha256, "formats": list(recipe.formats), "shard_tokens": recipe.shard_tokens,
        "plan": plan.describe(), "missing_components": missing,
        "documents": int(row.size), "tokens": int(n_tokens.sum()), "token_counts": TOKEN_COUNTS,
        **({"tokens_in_files": sum(e["tokens_in_file"] for e in shards)} if "tokens" in recipe.formats else {}),
        "inputs": inputs,
        "by_origin": dict(sorted(by_origin.items())),
        "drops": sorted(drops),
        "prompt_shas": sorted(prompts),
        "model_fingerprints": sorted(models),
        "repeats": {"file": REPEATS, **repeated},
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


REPEATS_SCHEMA = pa.schema(
    [("origin", pa.large_string()), ("doc_id", pa.large_string()), ("synth_id", pa.large_string()), ("repeats", pa.int64())]
)
REPEATS_GROUP = 1 << 16  # rows of repeats.parquet per row group: ~5 MB of 32-character ids, whatever the mix's size


def write_repeats(
    storage: Storage,
    key: str,
    spool: TextSpool,
    spooled: dict[str, Spooled],
    firsts: dict[str, tuple[np.ndarray, np.ndarray]],
    batch_rows: int,
) -> dict[str, int]:
    """repeats.parquet: each row taken once, component by component in the order first taken, with how
    often it was. Its ids are gathered from the spool `batch_rows` at a time and written in row groups of
    REPEATS_GROUP rows, so memory holds about two groups (one being written, the rest of the last gather), never the table. Returns the manifest's figures of it."""
    most, repeated = 0, 0
    with storage.parquet_writer(key, REPEATS_SCHEMA) as writer:
        group: list[pa.Table] = []

        def flush(whole: bool) -> None:
            """Write full row groups of what is gathered (and with `whole`, the rest too)."""
            table = pa.concat_tables(group).combine_chunks()
            cut = table.num_rows if whole else table.num_rows - table.num_rows % REPEATS_GROUP
            if cut:
                writer.write_table(table.slice(0, cut), row_group_size=REPEATS_GROUP)
            group[:] = [table.slice(cut)] if cut < table.num_rows else []

        for origin, (once, counts) in firsts.items():
            s = spooled[origin]
            most, repeated = max(most, int(counts.max(initial=0))), repeated + int((counts > 1).sum())
            for a in range(0, once.size, batch_rows):
                rows = once[a : a + batch_rows]
                ids = spool.lineage(*s.lineage_of(rows))
                group.append(
                    pa.table(
                        {"origin": pa.array([origin] * rows.size, pa.large_string()), "doc_id": ids["doc_id"].to_arrow().cast(pa.large_string()),
                         "synth_id": ids["synth_id"].to_arrow().cast(pa.large_string()), "repeats": pa.array(counts[a : a + batch_rows], pa.int64())},
                        schema=REPEATS_SCHEMA,
                    )
                )  # fmt: skip
                if sum(t.num_rows for t in group) >= REPEATS_GROUP:
                    flush(whole=False)
        if group:
            flush(whole=True)
    return {"max": most, "documents_repeated": repeated}


def _shard(
    spooled: dict[str, Spooled], spool: TextSpool, origins: list[str], comp: np.ndarray, row: np.ndarray, with_ids: bool
) -> tuple[pl.DataFrame, tuple[np.ndarray, np.ndarray] | None]:
    """One shard's rows (the MIX_SHARD columns, in the mix's order), its texts and lineage gathered from
    the spool, and with `with_ids` their ids (concatenated, and their lengths)."""
    starts, sizes, n_tokens = np.empty(row.size, np.int64), np.empty(row.size, np.int64), np.empty(row.size, np.int64)
    lineage = (np.empty(row.size, np.int64), np.empty(row.size, np.int32), np.empty(row.size, np.int32), np.empty(row.size, np.int32))
    id_starts = np.empty(row.size, np.int64) if with_ids else None
    for i, origin in enumerate(origins):
        at = np.flatnonzero(comp == i)
        if not at.size:
            continue
        rows, s = row[at], spooled[origin]
        starts[at], sizes[at], n_tokens[at] = s.text_start[rows], s.text_bytes[rows], s.n_tokens[rows]
        for gathered, values in zip(lineage, s.lineage_of(rows), strict=True):
            gathered[at] = values
        if id_starts is not None:
            id_starts[at] = s.ids_start[rows]  # type: ignore[index]
    shard = spool.lineage(*lineage).with_columns(
        spool.texts(starts, sizes),
        pl.Series("origin", comp, dtype=pl.UInt32).replace_strict(dict(enumerate(origins)), return_dtype=pl.String),
        pl.Series("n_tokens", n_tokens, dtype=pl.Int64),
    )
    ids = (spool.ids(id_starts, n_tokens), n_tokens) if id_starts is not None else None
    return shard.select(MIX_SHARD.names).rechunk(), ids
