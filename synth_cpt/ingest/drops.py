"""Ingest one crawl drop file into `<root>/crawl_drops/<drop_id>/`.

Each ingestion writes a new version, `crawl_drops/<drop_id>/v/<version>/`: `docs.parquet` (valid
documents), `quarantine.parquet` (rejected records with reasons) and `manifest.json` (counts, source
version, completeness, acceptance). Readers never list versions: they read the pointer
`crawl_drops/<drop_id>/current.json`, written last in one atomic write, which names the published
version and carries its manifest. So a crash mid-ingest, or a replaced drop being re-ingested, leaves
the previous version whole and in force: documents and manifest always belong together. The
published version and the one before it are kept; older ones are removed on publish.

The registry entry (`crawl_drops/_registry/<drop_id>.json`) remembers where a drop came from, so any
run (sensor, CLI, UI) can rematerialize it.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.parquet as pq

from synth_cpt.config import PipelineConfig
from synth_cpt.ingest.records import (
    QUARANTINE_SCHEMA,
    TRUNCATED_FILE,
    UNREADABLE_FILE,
    Batch,
    RecordParser,
    StartedBatch,
    complete_batch,
    docs_schema,
    iter_batches_jsonl,
    iter_batches_rows,
    start_batch,
)
from synth_cpt.ingest.sources import CountingReader, DropFile, DropSource, GuardedStream, decompressed, open_source
from synth_cpt.storage import Storage, utc_stamp

ASSET = "crawl_drops"
REGISTRY = f"{ASSET}/_registry"


POINTER = "current.json"
LEGACY = "legacy"  # the version name of a drop ingested before versioned publishing


def accepts(quarantine_rate: float, complete: bool, max_quarantine_rate: float, accept_partial_files: bool) -> bool:
    """The one acceptance rule: over the quarantine rate, or damaged (unless partial files are
    accepted), a drop is kept out of raw_corpus (and its blocking check fails) until a good version
    arrives."""
    return quarantine_rate <= max_quarantine_rate and (complete or accept_partial_files)


def drop_prefix(drop_id: str) -> str:
    return f"{ASSET}/{drop_id}"


def new_version() -> str:
    """A version name that sorts by time and never collides."""
    return f"{utc_stamp()}-{uuid.uuid4().hex[:8]}"


def version_prefix(drop_id: str, version: str) -> str:
    return f"{drop_prefix(drop_id)}/v/{version}"


def published(storage: Storage, drop_id: str) -> dict | None:
    """The pointer of a drop's published version (`version`, `prefix`, `manifest`), or None."""
    key = f"{drop_prefix(drop_id)}/{POINTER}"
    if storage.exists(key):
        return storage.read_json(key)
    legacy = f"{drop_prefix(drop_id)}/manifest.json"  # ingested before versions existed: still in force
    if storage.exists(legacy):
        return {"drop_id": drop_id, "version": LEGACY, "prefix": drop_prefix(drop_id), "manifest": storage.read_json(legacy)}
    return None


def published_prefix(storage: Storage, drop_id: str) -> str:
    """Where the published version's files are; FileNotFoundError if the drop was never published."""
    pointer = published(storage, drop_id)
    if pointer is None:
        raise FileNotFoundError(f"drop {drop_id!r} has no published version yet (no {drop_prefix(drop_id)}/{POINTER})")
    return pointer["prefix"]


def publish_drop(storage: Storage, drop_id: str, version: str, manifest: dict) -> None:
    """Make `version` the one readers see (one atomic write), then drop versions older than the previous."""
    current = published(storage, drop_id)
    previous = current["version"] if current and current["version"] != LEGACY else None
    if previous is not None and previous > version:
        return  # a newer version was published meanwhile (two runs of one drop): it stays in force
    pointer = {"drop_id": drop_id, "version": version, "prefix": version_prefix(drop_id, version), "manifest": manifest}
    storage.write_json(f"{drop_prefix(drop_id)}/{POINTER}", pointer)
    # keep the new and the previously published version; older ones (and crashed candidates) go,
    # newer ones may be another run's candidate and are left alone
    floor = previous or version
    versions = {k.split("/v/", 1)[1].split("/", 1)[0] for k in storage.list(f"{drop_prefix(drop_id)}/v")}
    for old in sorted(versions):
        if old < floor and old not in (version, previous):
            storage.delete_prefix(version_prefix(drop_id, old))


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
    accept_partial_files: bool = False
    ingested_at: str = ""

    @property
    def quarantine_rate(self) -> float:
        return self.quarantined / self.records if self.records else 0.0

    @property
    def accepted(self) -> bool:
        return accepts(self.quarantine_rate, self.complete, self.max_quarantine_rate, self.accept_partial_files)

    def to_json(self) -> dict:
        return {**asdict(self), "quarantine_rate": round(self.quarantine_rate, 6), "accepted": self.accepted}


Progress = Callable[[int, int, int, int], None]  # bytes done, bytes total, records, documents


@dataclass
class DropPlan:
    """What to ingest now, from what is actually published (the one answer for the sensor and the CLI)."""

    new: list[DropFile]  # never published at this version, nor already requested
    unchanged: list[DropFile]  # published at this version
    unsettled: list[DropFile]  # local files still changing (being copied): next time
    requested: list[DropFile]  # asked for already (a run may be under way)


def plan_drops(
    storage: Storage,
    drops: list[DropFile],
    settle_seconds: float,
    requested: dict[str, str] | None = None,
    now_ns: int | None = None,
) -> DropPlan:
    """Which drops are new: compared with each drop's published version, so a drop the CLI ingested
    is not ingested again by the sensor (or the reverse). `requested` (key -> version) holds what a
    caller has already launched runs for, so a run in flight is not requested twice."""
    now_ns = time.time_ns() if now_ns is None else now_ns
    plan = DropPlan([], [], [], [])
    for drop in drops:
        pointer = published(storage, drop.key)
        if pointer is not None and pointer["manifest"].get("source_version") == drop.version:
            plan.unchanged.append(drop)
        elif drop.changed_ns and now_ns - drop.changed_ns < settle_seconds * 1e9:
            plan.unsettled.append(drop)
        elif (requested or {}).get(drop.key) == drop.version:
            plan.requested.append(drop)
        else:
            plan.new.append(drop)
    return plan


def register_drop(storage: Storage, drop: DropFile, location: str) -> None:
    """Remember where a drop's partition key points, for later rematerializations."""
    storage.write_json(f"{REGISTRY}/{drop.key}.json", {"drops_location": location, **asdict(drop)})


def resolve_drop(storage: Storage, drop_id: str, config: PipelineConfig) -> tuple[DropSource, DropFile]:
    """The source and current file of a drop: from the registry, else from the configured location."""
    entry = f"{REGISTRY}/{drop_id}.json"
    if storage.exists(entry):
        reg = storage.read_json(entry)
        source = open_source(reg["drops_location"])
        try:
            return source, source.find(drop_id, config.drops.patterns)
        except FileNotFoundError:
            raise FileNotFoundError(
                f"drop {drop_id!r} was registered from {reg['uri']} but that file is gone; restore it or delete the partition"
            ) from None
    source = open_source(config.drops_uri())
    return source, source.find(drop_id, config.drops.patterns)


def ingest_drop(
    config: PipelineConfig,
    storage: Storage,
    source: DropSource,
    drop: DropFile,
    progress: Progress | None = None,
) -> DropReport:
    """Stream one drop through parsing, normalization, language id and scoring, in bounded memory."""
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
    version = new_version()
    prefix = version_prefix(drop.key, version)
    reasons: Counter[str] = Counter()
    languages: Counter[str] = Counter()
    qsources: Counter[str] = Counter()
    counter: CountingReader | None = None
    guard: GuardedStream | None = None
    broken: tuple[str, str, int] | None = None  # (reason code, what happened, line or row where it broke)

    def batches():
        nonlocal counter, guard, broken
        if drop.format == "parquet":
            with source.local_path(drop) as path:
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
            counter = CountingReader(source.open(drop))
            stream, guard = decompressed(counter, drop.format)  # type: ignore[arg-type]
            with stream:
                yield from iter_batches_jsonl(parser, stream, config.limits.batch_bytes)
            if guard.damage is not None:
                code = TRUNCATED_FILE if "TruncatedStream" in guard.damage or "EOFError" in guard.damage else UNREADABLE_FILE
                broken = (code, guard.damage, guard.newlines + 1)

    schema = docs_schema(config)
    with (
        storage.parquet_writer(f"{prefix}/docs.parquet", schema) as docs_out,
        storage.parquet_writer(f"{prefix}/quarantine.parquet", QUARANTINE_SCHEMA) as q_out,
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
            if docs.height:
                docs_out.write_table(docs.to_arrow().cast(schema))
            if quarantine.height:
                q_out.write_table(quarantine.to_arrow().cast(QUARANTINE_SCHEMA))
            if progress:
                done = counter.count if counter is not None else drop.size
                progress(done, drop.size, report.records, report.documents)
        if broken is not None:
            code, what, where = broken
            read = counter.count if counter is not None else drop.size
            report.complete = False
            report.damage = (
                f"{what} (at line/row {where}; {read:,} of {drop.size:,} stored bytes read; "
                f"{report.records:,} records before the break kept)"
            )
            reason = (
                f"the file is damaged, so records after line/row {where - 1} are missing: {report.damage}. "
                "Deliver a complete file (or set limits.accept_partial_files to use what was read)."
            )
            row = {"drop_id": drop.key, "source_file": drop.uri, "source_line": where, "reason_code": code, "reason": reason, "raw": ""}
            q_out.write_table(pa.Table.from_pylist([row], schema=QUARANTINE_SCHEMA))
            reasons[code] += 1
    report.quarantine_by_reason = dict(sorted(reasons.items()))
    report.languages = dict(sorted(languages.items()))
    report.quality_sources = dict(sorted(qsources.items()))
    report.seconds = round(time.monotonic() - started, 3)
    report.ingested_at = datetime.now(timezone.utc).isoformat()
    manifest = {**report.to_json(), "version": version}
    storage.write_json(f"{prefix}/manifest.json", manifest)
    publish_drop(storage, drop.key, version, manifest)  # last: the new version becomes visible whole
    return report


def _finished(batches: Iterator, config: PipelineConfig, drop: DropFile) -> Iterator[tuple[int, tuple]]:
    """(records, (docs, quarantine)) per batch, in input order.

    Language id is per-record C++ that holds the GIL: on a drop larger than two batches it runs in
    `limits.workers` processes, one batch ahead, while this process scores, hashes and writes the
    previous batch with polars. Small drops skip the pool (starting processes costs more than it saves).
    """
    workers = config.limits.workers or os.cpu_count() or 1
    with contextlib.ExitStack() as stack:
        pool = None
        if workers > 1 and drop.size > 2 * config.limits.batch_bytes:
            pool = stack.enter_context(ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")))
        previous: StartedBatch | None = None
        for batch in batches:
            started = start_batch(batch, config, pool)  # its language id runs while the previous completes
            if previous is not None:
                yield _records(previous.batch), complete_batch(previous, config, drop.key, drop.uri)
            previous = started
        if previous is not None:
            yield _records(previous.batch), complete_batch(previous, config, drop.key, drop.uri)


def _records(batch: Batch) -> int:
    return len(batch.texts) + len(batch.quarantine)


def ingested_drops(storage: Storage) -> list[dict]:
    """Manifests of every published drop (with the `prefix` of its files), by drop id."""
    manifests: dict[str, dict] = {}
    legacy: dict[str, str] = {}
    for key in storage.list(ASSET):
        if key.count("/") != 2:  # crawl_drops/<drop>/<file>
            continue
        drop_id = key.split("/")[1]
        if key.endswith(f"/{POINTER}"):
            pointer = storage.read_json(key)
            manifests[drop_id] = {**pointer["manifest"], "prefix": pointer["prefix"]}
        elif key.endswith("/manifest.json"):
            legacy[drop_id] = key
    for drop_id, key in legacy.items():  # ingested before versions existed, never re-published
        if drop_id not in manifests:
            manifests[drop_id] = {**storage.read_json(key), "prefix": drop_prefix(drop_id)}
    return sorted(manifests.values(), key=lambda m: m["drop_id"])
