"""The drop sensor: new or changed files in the drops location become crawl_drops runs.

Why it remembers what is published: reading every drop's pointer on every tick costs one or two storage
requests per drop (20,000 S3 requests a tick at 10,000 drops). It keeps the `published_digest` (8 bytes)
of each listed drop found published at its listed version, so a tick reads only the pointers of drops it
has not seen published: new, replaced, requested or still settling.

Why that memory is a file under the storage root and not the cursor: Dagster stores the cursor with every
tick record (one per `drops.sensor_interval_seconds`, 30 by default; skipped ticks kept for days), so 80 KB of digests there would grow the instance
database by gigabytes. The digests go to `_sensor/published/<sha256>.bin` (sorted, so an unchanged set is
the same file), written atomically and only when the set changes; the cursor names only its SHA-256. A
quiet tick costs the listing and one read of that file. A memory that is missing (removed by `synth-cpt
gc`), does not match its SHA-256, or a cursor without one (reset in the UI, or written before it existed)
means every pointer is read once more.
"""

import hashlib
import json
import re

from dagster import (
    AssetSelection,
    DefaultSensorStatus,
    RunRequest,
    SensorDefinition,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    sensor,
)

from synth_cpt.core.config import DropsConfig
from synth_cpt.core.layout import CRAWL_DROPS, sensor_memory_key
from synth_cpt.core.storage import Storage
from synth_cpt.defs.partitions import crawl_drop_partitions
from synth_cpt.defs.resources import PipelineResource
from synth_cpt.ingest.drops import DIGEST_BYTES, plan_drops, published_digest, register_drop
from synth_cpt.ingest.sources import DropFile, list_drops

MEMORY = "published_sha256"  # the cursor's field naming the memory file
_SHA256 = re.compile(r"[0-9a-f]{64}")


def run_key(drop: DropFile) -> str:
    """Unique per file version: Dagster never launches the same key twice."""
    return f"{drop.key}@{drop.version}"


def pack_published(digests: set[bytes]) -> bytes:
    """The known-published digests as one byte string (sorted: an unchanged set gives the same bytes, the same file)."""
    return b"".join(sorted(digests))


def unpack_published(raw: bytes) -> set[bytes] | None:
    """The digests of `pack_published`, or None when `raw` cannot be them."""
    if len(raw) % DIGEST_BYTES:
        return None
    return {raw[i : i + DIGEST_BYTES] for i in range(0, len(raw), DIGEST_BYTES)}


def save_published(storage: Storage, digests: set[bytes]) -> str | None:
    """Write the memory file of `digests` (atomically) and return its SHA-256; None (no file) for an empty set."""
    if not digests:
        return None
    raw = pack_published(digests)
    sha = hashlib.sha256(raw).hexdigest()
    storage.write_bytes(sensor_memory_key(sha), raw)
    return sha


def load_published(storage: Storage, sha: object) -> tuple[set[bytes] | None, str]:
    """The digests of the memory file a cursor names (one read), or None and why it is not to be trusted."""
    if not isinstance(sha, str) or not _SHA256.fullmatch(sha):
        return None, f"the cursor's {MEMORY} {sha!r} is not a SHA-256"
    try:
        raw = storage.read_bytes(sensor_memory_key(sha))
    except Exception as exc:  # missing (gc), or unreadable: correctness first, every pointer is read again
        return None, f"{storage.uri(sensor_memory_key(sha))} could not be read ({type(exc).__name__})"
    found = unpack_published(raw) if hashlib.sha256(raw).hexdigest() == sha else None
    return found, "" if found is not None else f"{storage.uri(sensor_memory_key(sha))} does not hold what its name says"


def drop_sensor_every(seconds: int) -> SensorDefinition:
    """crawl_drop_sensor, evaluated by the daemon at most every `seconds` (config `drops.sensor_interval_seconds`)."""
    return sensor(
        name="crawl_drop_sensor",
        asset_selection=AssetSelection.assets(CRAWL_DROPS),
        minimum_interval_seconds=seconds,
        default_status=DefaultSensorStatus.RUNNING,
        description="Watches the drops folder or S3 prefix; each new or replaced file becomes a crawl_drops partition and a run.",
    )(_drop_tick)


def _drop_tick(context: SensorEvaluationContext, pipeline: PipelineResource) -> SensorResult | SkipReason:
    cfg, storage = pipeline.load(), pipeline.storage()
    location = cfg.drops_uri()
    listing = list_drops(pipeline.drops(), cfg.drops.patterns, cfg.drops.recursive)
    state = json.loads(context.cursor) if context.cursor else {}
    for line in sorted(set(listing.refused) - set(state.get("refused", []))):
        context.log.warning(line)  # once per refused path, not on every tick
    memory, loaded = state.get(MEMORY), None
    if memory is not None:
        loaded, why = load_published(storage, memory)
        if loaded is None:
            context.log.warning(f"the drop sensor's memory of published drops is lost: {why}; every drop's pointer is read once")
    plan = plan_drops(
        storage, listing.drops, cfg.drops.settle_seconds, requested=state.get("requested", {}), known_published=loaded or set()
    )
    changed = plan.new
    requested = {d.key: d.version for d in [*plan.requested, *plan.new]}
    # only drops listed now and published at their listed version: a deleted or replaced file is forgotten
    known = {published_digest(storage, d) for d in plan.unchanged}
    sha = memory if loaded is not None and memory is not None and known == loaded else save_published(storage, known)
    cursor = json.dumps({MEMORY: sha, "requested": requested, "refused": sorted(listing.refused)}, sort_keys=True)
    if not changed:
        waiting = f"; {len(plan.unsettled)} still being written" if plan.unsettled else ""
        return SensorResult(
            skip_reason=SkipReason(f"no new or changed drops in {location} ({len(plan.unchanged)} published{waiting})"), cursor=cursor
        )
    for drop in changed:
        register_drop(storage, drop, location)
    known_keys = set(context.instance.get_dynamic_partitions(crawl_drop_partitions.name))
    new_keys = sorted({d.key for d in changed} - known_keys)
    return SensorResult(
        run_requests=[
            RunRequest(run_key=run_key(d), partition_key=d.key, tags={"synth_cpt/source_uri": d.uri, "synth_cpt/source_version": d.version})
            for d in changed
        ],
        dynamic_partitions_requests=[crawl_drop_partitions.build_add_request(new_keys)] if new_keys else [],
        cursor=cursor,
    )


crawl_drop_sensor = drop_sensor_every(DropsConfig().sensor_interval_seconds)  # the default's; definitions use the config's
