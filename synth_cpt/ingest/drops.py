"""Ingest one crawl drop file into `<root>/crawl_drops/<drop_id>/`.

Each ingestion writes a new version, `crawl_drops/<drop_id>/v/<version>/`: `docs.parquet` (valid
documents), `quarantine.parquet` (rejected records with reasons) and `manifest.json` (counts, source
version, completeness, acceptance). Readers never list versions: they read the pointer
`crawl_drops/<drop_id>/current.json`, written last in one atomic write, which names the published
version and carries its manifest. So a crash mid-ingest, or a replaced drop being re-ingested, leaves
the previous version whole and in force: documents and manifest always belong together. Published
versions are kept until `synth-cpt gc` removes them (never one a retained mix pins); a candidate
that was never published is removed once older than `publish.CANDIDATE_GRACE`.

The registry entry (`crawl_drops/_registry/<drop_id>.json`) remembers where a drop came from, so any
run (sensor, CLI, UI) can rematerialize it.
"""

from __future__ import annotations

import contextlib
import hashlib
import multiprocessing
import os
import time
from collections import Counter, deque
from collections.abc import Callable, Container, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from synth_cpt.core import publish
from synth_cpt.core.config import PipelineConfig
from synth_cpt.core.contracts import QUARANTINE, drop_documents
from synth_cpt.core.layout import CRAWL_DROPS, POINTER, drop_prefix, registry_entry, version_prefix
from synth_cpt.core.plots import BINS, histogram_counts
from synth_cpt.core.publish import CandidateRejected
from synth_cpt.core.storage import LocalStorage, Storage, open_storage
from synth_cpt.core.validation import Outcome
from synth_cpt.ingest.documents import finish_batch
from synth_cpt.ingest.quarantine import TRUNCATED_FILE, UNREADABLE_FILE
from synth_cpt.ingest.records import Batch, RecordParser, iter_batches_jsonl, iter_batches_rows
from synth_cpt.ingest.sources import CountingReader, DropFile, GuardedStream, decompressed, find_drop


def accepts(quarantine_rate: float, complete: bool, max_quarantine_rate: float, accept_partial_files: bool) -> bool:
    """The one acceptance rule: over the quarantine rate, or damaged (unless partial files are
    accepted), a drop is kept out of raw_corpus (and its blocking check fails) until a good version
    arrives."""
    return not kept_out_because(quarantine_rate, complete, max_quarantine_rate, accept_partial_files)


def kept_out_because(
    quarantine_rate: float, complete: bool, max_quarantine_rate: float, accept_partial_files: bool, damage: str | None = None
) -> list[str]:
    """Why `accepts` says no, one sentence per broken rule (empty: accepted), so whoever shows a drop
    kept out can say what to fix: the damage, or the rate against its limit."""
    why = []
    if not (complete or accept_partial_files):
        why.append(damage or "the file is incomplete")
    if quarantine_rate > max_quarantine_rate:
        why.append(f"{quarantine_rate:.1%} of records quarantined, over limits.max_quarantine_rate={max_quarantine_rate:.1%}")
    return why


def published(storage: Storage, drop_id: str) -> dict | None:
    """The pointer of a drop's published version (`version`, `prefix`, `manifest`), or None."""
    pointer = publish.published(storage, drop_prefix(drop_id), legacy_file="manifest.json")
    if pointer is not None and pointer["version"] == publish.LEGACY:  # ingested before versions existed
        pointer = {"drop_id": drop_id, "version": publish.LEGACY, "prefix": pointer["prefix"], "manifest": pointer["legacy_file"]}
    return pointer


def published_prefix(storage: Storage, drop_id: str) -> str:
    """Where the published version's files are; FileNotFoundError if the drop was never published."""
    pointer = published(storage, drop_id)
    if pointer is None:
        raise FileNotFoundError(f"drop {drop_id!r} has no published version yet (no {drop_prefix(drop_id)}/{POINTER})")
    return pointer["prefix"]


def publish_drop(storage: Storage, drop_id: str, version: str, manifest: dict) -> dict:
    """Make `version` the one readers see (its pointer carries the manifest), unless another run
    published a newer version meanwhile; returns the pointer in force, so the caller reports that one."""
    publish.publish_version(storage, drop_prefix(drop_id), version, {"drop_id": drop_id, "manifest": manifest})
    pointer = published(storage, drop_id)
    assert pointer is not None  # just written, or a newer one
    return pointer


@dataclass
class DropReport:
    drop_id: str
    source_uri: str
    source_version: str
    format: str
    bytes: int
    records: int = 0
    documents: int = 0
    quarantined: int = 0
    quarantine_by_reason: dict[str, int] = field(default_factory=dict)
    languages: dict[str, int] = field(default_factory=dict)
    quality_sources: dict[str, int] = field(default_factory=dict)
    characters: int = 0
    encoding_repaired: int = 0  # documents whose mojibake was undone
    seconds: float = 0.0
    max_quarantine_rate: float = 0.0
    complete: bool = True  # False: the file broke off (truncated, corrupt, not what its name says)
    damage: str | None = None  # what broke, where, and how much was read before
    damage_code: str | None = None  # the reason code of the damage's quarantine row (truncated_file, unreadable_file)
    accept_partial_files: bool = False
    ingested_at: str = ""
    prefix: str = ""  # where the published version's files are
    superseded_by: str | None = None  # another run's newer version, in force instead of this one (not published)
    histogram: list[int] = field(default_factory=lambda: [0] * BINS)  # quality_score in core.plots bins
    # not part of the manifest:
    outcome: Outcome | None = None  # the validation of the published version
    sample: list[dict] = field(default_factory=list)  # the first documents (texts cut short)
    quarantine_sample: list[dict] = field(default_factory=list)

    @property
    def quarantine_rate(self) -> float:
        return self.quarantined / self.records if self.records else 0.0

    @property
    def accepted(self) -> bool:
        return accepts(self.quarantine_rate, self.complete, self.max_quarantine_rate, self.accept_partial_files)

    def to_json(self) -> dict:
        fields = {k: v for k, v in asdict(self).items() if k not in ("outcome", "sample", "quarantine_sample", "superseded_by")}
        return {**fields, "quarantine_rate": round(self.quarantine_rate, 6), "accepted": self.accepted}


SAMPLE_ROWS = 5
SAMPLE_COLUMNS = ["doc_id", "language", "quality_score", "url", "text"]
Progress = Callable[[int, int, int, int], None]  # bytes done, bytes total, records, documents


@dataclass
class DropPlan:
    """What to ingest now, from what is actually published (the one answer for the sensor and the CLI)."""

    new: list[DropFile]  # never published at this version, nor already requested
    unchanged: list[DropFile]  # published at this version
    unsettled: list[DropFile]  # local files still changing (being copied): next time
    requested: list[DropFile]  # asked for already (a run may be under way)
    settles_in: dict[str, float] = field(default_factory=dict)  # unsettled drop key -> seconds until it is settled
    pointers_read: int = 0  # drops whose published pointer was read (the others were known published)


DIGEST_BYTES = 8  # 64 bits: a replaced file passes for a known version with a chance of (drops remembered) / 2**64


def published_digest(storage: Storage, drop: DropFile) -> bytes:
    """Eight bytes standing for "this drop, at this version, is published under this storage root": what a caller
    (the sensor's memory file) remembers of each published drop instead of its pointer, so 10,000 drops fit in 80 KB.
    A replaced file has a new version, hence a new digest; another storage root (a changed `storage_root`) makes
    every digest new, so nothing published elsewhere passes for published here."""
    return hashlib.blake2b(f"{storage.root}\n{drop.key}\n{drop.version}".encode(), digest_size=DIGEST_BYTES).digest()


def plan_drops(
    storage: Storage,
    drops: list[DropFile],
    settle_seconds: float,
    requested: dict[str, str] | None = None,
    now_ns: int | None = None,
    known_published: Container[bytes] = frozenset(),
) -> DropPlan:
    """Which drops are new: compared with each drop's published version, so a drop the CLI ingested
    is not ingested again by the sensor (or the reverse). `requested` (key -> version) holds what a
    caller has already launched runs for, so a run in flight is not requested twice. `known_published`
    holds the `published_digest` of drops an earlier plan found published at their listed version: they
    are unchanged without reading their pointer (a pointer moves on only when a newer file is ingested, and
    a newer file has another digest; `synth-cpt gc` never removes the current version), so a sensor tick
    reads the pointers of new, replaced, requested and unsettled drops only, not of every drop there."""
    now_ns = time.time_ns() if now_ns is None else now_ns
    plan = DropPlan([], [], [], [])
    for drop in drops:
        if published_digest(storage, drop) in known_published:
            plan.unchanged.append(drop)
            continue
        pointer = published(storage, drop.key)
        plan.pointers_read += 1
        if pointer is not None and pointer["manifest"].get("source_version") == drop.version:
            plan.unchanged.append(drop)
        elif settle_seconds > 0 and drop.changed_ns and now_ns - drop.changed_ns < settle_seconds * 1e9:  # 0: take it now
            plan.unsettled.append(drop)
            plan.settles_in[drop.key] = settle_seconds - (now_ns - drop.changed_ns) / 1e9
        elif (requested or {}).get(drop.key) == drop.version:
            plan.requested.append(drop)
        else:
            plan.new.append(drop)
    return plan


def register_drop(storage: Storage, drop: DropFile, location: str) -> None:
    """Remember where a drop's partition key points, for later rematerializations."""
    storage.write_json(registry_entry(drop.key), {"drops_location": location, **asdict(drop)})


def resolve_drop(
    storage: Storage, drop_id: str, config: PipelineConfig, open_location: Callable[[str], Storage] = open_storage
) -> tuple[Storage, DropFile]:
    """The location and current file of a drop: from the registry, else from the configured location."""
    entry = registry_entry(drop_id)
    if storage.exists(entry):
        reg = storage.read_json(entry)
        location = open_location(reg["drops_location"])
        try:
            return location, find_drop(location, drop_id, config.drops.patterns)
        except FileNotFoundError:
            raise FileNotFoundError(
                f"drop {drop_id!r} was registered from {reg['uri']} but that file is gone; restore it or delete the partition"
            ) from None
    location = open_location(config.drops_uri())
    return location, find_drop(location, drop_id, config.drops.patterns)


def ingest_drop(
    config: PipelineConfig,
    storage: Storage,
    location: Storage,
    drop: DropFile,
    progress: Progress | None = None,
    validate: Callable[[Storage, str], Outcome] | None = None,
) -> DropReport:
    """Stream one drop through parsing, normalization, language id and scoring, in bounded memory, into
    a new version; publish it only if `validate(storage, version_prefix)` passes (else CandidateRejected,
    the previous version stays and the candidate is kept under _rejected/). When another run published a
    newer version meanwhile, that one stays in force and `report.superseded_by` names it."""
    started = time.monotonic()
    report = DropReport(
        drop_id=drop.key,
        source_uri=drop.uri,
        source_version=drop.version,
        format=drop.format,
        bytes=drop.size,
        max_quarantine_rate=config.limits.max_quarantine_rate,
        accept_partial_files=config.limits.accept_partial_files,
    )
    parser = RecordParser(config)
    version = publish.new_version()
    prefix = version_prefix(drop_prefix(drop.key), version)
    reasons: Counter[str] = Counter()
    languages: Counter[str] = Counter()
    qsources: Counter[str] = Counter()
    counter: CountingReader | None = None
    guard: GuardedStream | None = None
    broken: tuple[str, str, int] | None = None  # (reason code, what happened, line or row where it broke)

    def batches():
        nonlocal counter, guard, broken
        if drop.format == "parquet":
            # a local drop is read from the file its check opened (LocalStorage.open), never reopened by name
            local = isinstance(location, LocalStorage)
            with location.open(drop.relative_path) if local else location.local_path(drop.relative_path) as path:
                try:
                    pf = pq.ParquetFile(path)
                except Exception as exc:  # not Parquet at all (bad magic, truncated footer)
                    broken = (UNREADABLE_FILE, f"not a readable Parquet file: {type(exc).__name__}: {exc}", 1)
                    return
                row_no = 0

                def rows():
                    nonlocal row_no, broken
                    for group in range(pf.num_row_groups):
                        try:
                            table = pf.read_row_group(group)
                        except Exception as exc:  # one damaged row group: keep the others' rows
                            broken = (UNREADABLE_FILE, f"row group {group} is unreadable: {type(exc).__name__}: {exc}", row_no + 1)
                            row_no += pf.metadata.row_group(group).num_rows
                            continue
                        for row in table.to_pylist():
                            row_no += 1
                            yield row_no, row

                yield from iter_batches_rows(parser, rows(), config.limits.batch_bytes)
        else:
            counter = CountingReader(location.open(drop.relative_path))
            stream, guard = decompressed(counter, drop.format)  # type: ignore[arg-type]
            with stream:
                yield from iter_batches_jsonl(parser, stream, config.limits.batch_bytes)
            if guard.damage is not None:
                code = TRUNCATED_FILE if "TruncatedStream" in guard.damage or "EOFError" in guard.damage else UNREADABLE_FILE
                broken = (code, guard.damage, guard.newlines + 1)
            elif guard.compression and counter.count == 0:  # no compressed stream at all, not even an empty one
                broken = (UNREADABLE_FILE, f"the file is empty: no {guard.compression}-compressed data", 1)

    schema = drop_documents(config)
    with (
        storage.parquet_writer(f"{prefix}/docs.parquet", schema) as docs_out,
        storage.parquet_writer(f"{prefix}/quarantine.parquet", QUARANTINE) as q_out,
    ):
        for n_records, (docs, quarantine) in _finished(batches(), config, drop):
            report.records += n_records
            report.documents += docs.height
            report.quarantined += quarantine.height
            reasons.update(quarantine["reason_code"].to_list())
            languages.update(docs["language"].to_list())
            qsources.update(docs["quality_score_source"].to_list())
            report.characters += int(docs["n_chars"].sum() or 0)
            report.encoding_repaired += int(docs["encoding_repaired"].sum() or 0)
            report.histogram = [a + b for a, b in zip(report.histogram, histogram_counts(docs["quality_score"]), strict=True)]
            if len(report.sample) < SAMPLE_ROWS:
                report.sample += (
                    docs.select(SAMPLE_COLUMNS)
                    .head(SAMPLE_ROWS - len(report.sample))
                    .with_columns(pl.col("text").str.slice(0, 200))
                    .to_dicts()
                )
            if len(report.quarantine_sample) < SAMPLE_ROWS:
                report.quarantine_sample += (
                    quarantine.select("source_line", "reason").head(SAMPLE_ROWS - len(report.quarantine_sample)).to_dicts()
                )
            if docs.height:
                docs_out.write_table(docs.to_arrow().cast(schema))
            if quarantine.height:
                q_out.write_table(quarantine.to_arrow().cast(QUARANTINE))
            if progress:
                done = counter.count if counter is not None else drop.size
                progress(done, drop.size, report.records, report.documents)
        if broken is not None:
            code, what, where = broken
            read = counter.count if counter is not None else drop.size
            report.complete = False
            report.damage_code = code
            report.damage = (
                f"{what} (at line/row {where}; {read:,} of {drop.size:,} stored bytes read; "
                f"{report.records:,} records read before the break, the last of them possibly cut short)"
            )
            if report.records == 0 and where <= 1:  # read to zero records: the same row, saying nothing was read
                reason = f"no record could be read from the file: {report.damage}. Deliver a readable file in the format its name says."
            else:
                reason = (
                    f"the file is damaged, so records after line/row {where - 1} are missing: {report.damage}. "
                    "Deliver a complete file (or set limits.accept_partial_files to use what was read)."
                )
            row = {"drop_id": drop.key, "source_file": drop.uri, "source_line": where, "reason_code": code, "reason": reason, "raw": ""}
            q_out.write_table(pa.Table.from_pylist([row], schema=QUARANTINE))
            reasons[code] += 1
            if len(report.quarantine_sample) < SAMPLE_ROWS:
                report.quarantine_sample.append({"source_line": where, "reason": reason})
    report.quarantine_by_reason = dict(sorted(reasons.items()))
    report.languages = dict(sorted(languages.items()))
    report.quality_sources = dict(sorted(qsources.items()))
    report.seconds = round(time.monotonic() - started, 3)
    report.ingested_at = datetime.now(timezone.utc).isoformat()
    report.prefix = prefix
    manifest = {**report.to_json(), "version": version}
    storage.write_json(f"{prefix}/manifest.json", manifest)
    if validate is not None:
        report.outcome = validate(storage, prefix)
        if not report.outcome.success:
            raise CandidateRejected(report.outcome, publish.reject_version(storage, drop_prefix(drop.key), version), "documents_valid")
    in_force = publish_drop(storage, drop.key, version, manifest)  # last: the new version becomes visible whole
    if in_force["version"] != version:  # a newer run won: the figures are this candidate's, the files are not
        report.superseded_by, report.prefix = in_force["version"], in_force["prefix"]
    return report


def _finished(batches: Iterator[Batch], config: PipelineConfig, drop: DropFile) -> Iterator[tuple[int, tuple]]:
    """(records, (docs, quarantine)) per batch, in input order.

    Each batch is finished whole (repair, normalization, language id, scoring, hashing) by
    `documents.finish_batch`; on a drop larger than two batches that runs in `limits.workers` processes
    (language id is C++ that holds the GIL), up to one batch per worker ahead of the one this process
    is writing, while it parses the next. Each worker's polars gets its share of the cores. Small drops
    skip the pool (starting processes costs more than it saves). The pool is the one a caller keeps
    open across drops (`worker_pool`), else one started for this drop.
    """
    workers = _workers(config)
    if workers <= 1 or drop.size <= 2 * config.limits.batch_bytes:
        for batch in batches:
            yield _records(batch), finish_batch(batch, config, drop.key, drop.uri)
        return
    # a kept pool whose worker died (killed, out of memory) is broken for good: later drops get a pool of their own
    kept = next((pool for n, pool in _POOLS if n == workers and not getattr(pool, "_broken", False)), None)
    with contextlib.nullcontext(kept) if kept is not None else _start_pool(workers) as pool:
        pending: deque[tuple[int, Future]] = deque()
        for batch in batches:
            pending.append((_records(batch), pool.submit(finish_batch, batch, config, drop.key, drop.uri)))
            if len(pending) > workers:
                records, future = pending.popleft()
                yield records, future.result()
        while pending:
            records, future = pending.popleft()
            yield records, future.result()


_POOLS: list[tuple[int, ProcessPoolExecutor]] = []  # pools kept open by `worker_pool`, innermost last


def _workers(config: PipelineConfig) -> int:
    return config.limits.workers or os.cpu_count() or 1


@contextlib.contextmanager
def _start_pool(workers: int) -> Iterator[ProcessPoolExecutor]:
    """`workers` spawned processes, started now (each imports the batch code and loads the language model)."""
    # polars reads POLARS_MAX_THREADS once, at import, and a spawned worker imports the parent's __main__
    # (and so maybe polars) before any initializer runs: the workers inherit it from this process's
    # environment instead, set while the pool starts them (one per submit while none is idle) and restored
    threads = str(max(1, (os.cpu_count() or 1) // workers))
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        with _environ("POLARS_MAX_THREADS", threads):
            for _ in range(workers):
                pool.submit(_warm)
        yield pool


def _warm() -> None:
    from synth_cpt.text.langid import _model

    _model()


@contextlib.contextmanager
def worker_pool(config: PipelineConfig) -> Iterator[None]:
    """One pool of `limits.workers` processes for every drop ingested in this process meanwhile (the CLI
    ingesting several drops): the workers start at once, alongside whatever the caller does next, and
    each starts, imports and loads its language model once instead of once per drop. Batches, their
    order and their results are the same as with a pool per drop."""
    workers = _workers(config)
    if workers <= 1:
        yield
        return
    with _start_pool(workers) as pool:
        _POOLS.append((workers, pool))
        try:
            yield
        finally:
            _POOLS.remove((workers, pool))


@contextlib.contextmanager
def _environ(name: str, value: str) -> Iterator[None]:
    """`name=value` in this process's environment (inherited by processes started meanwhile), then as it was."""
    saved = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = saved


def _records(batch: Batch) -> int:
    return len(batch.texts) + len(batch.quarantine)


def ingested_drops(storage: Storage) -> list[dict]:
    """Manifests of every published drop (with the `prefix` of its files), by drop id."""
    manifests: dict[str, dict] = {}
    legacy: dict[str, str] = {}
    for key in storage.list(CRAWL_DROPS):
        if key.count("/") != 2:  # crawl_drops/<drop>/<file>
            continue
        drop_id = key.split("/")[1]
        if key.endswith(f"/{POINTER}"):
            pointer = storage.read_json(key)
            manifests[drop_id] = {**pointer["manifest"], "prefix": pointer["prefix"], "version": pointer["version"]}
        elif key.endswith("/manifest.json"):
            legacy[drop_id] = key
    for drop_id, key in legacy.items():  # ingested before versions existed, never re-published
        if drop_id not in manifests:
            manifests[drop_id] = {**storage.read_json(key), "prefix": drop_prefix(drop_id), "version": publish.LEGACY}
    return sorted(manifests.values(), key=lambda m: m["drop_id"])


def drop_accepted(manifest: dict, config: PipelineConfig) -> bool:
    """Judged with today's limits, not those of ingest time: raising `limits.max_quarantine_rate` or
    setting `limits.accept_partial_files` lets a drop in without re-ingesting it (and the reverse)."""
    return not drop_kept_out_because(manifest, config)


def drop_kept_out_because(manifest: dict, config: PipelineConfig) -> list[str]:
    """Why `drop_accepted` says no (empty: accepted), by today's limits: the damage with the reason code
    of its quarantine row ("unreadable_file: not zstd-compressed data ..."), the rate against its limit."""
    limits = config.limits
    damage = manifest.get("damage")
    if damage:
        by_reason = manifest.get("quarantine_by_reason", {})  # manifests from before damage_code: the code is among the reasons
        code = manifest.get("damage_code") or next((c for c in (TRUNCATED_FILE, UNREADABLE_FILE) if c in by_reason), None)
        damage = f"{code}: {damage}" if code else damage
    return kept_out_because(
        float(manifest["quarantine_rate"]), manifest.get("complete", True), limits.max_quarantine_rate, limits.accept_partial_files, damage
    )
