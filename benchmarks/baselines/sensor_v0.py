# The drop sensor before issue 18 (synth_cpt/defs/sensors.py and plan_drops of synth_cpt/ingest/drops.py at
# 399ca71), kept as the baseline of benchmarks/sensor.py: every tick reads the published pointer of every listed
# drop (one or two storage requests per drop). Do not use it anywhere else.
"""The drop sensor: new or changed files in the drops location become crawl_drops runs."""

import json
import time

from dagster import AssetSelection, RunRequest, SensorEvaluationContext, SensorResult, SkipReason, sensor

from synth_cpt.core.layout import CRAWL_DROPS
from synth_cpt.core.storage import Storage
from synth_cpt.defs.partitions import crawl_drop_partitions
from synth_cpt.defs.resources import PipelineResource
from synth_cpt.ingest.drops import DropPlan, published, register_drop
from synth_cpt.ingest.sources import DropFile, list_drops


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
        elif settle_seconds > 0 and drop.changed_ns and now_ns - drop.changed_ns < settle_seconds * 1e9:  # 0: take it now
            plan.unsettled.append(drop)
            plan.settles_in[drop.key] = settle_seconds - (now_ns - drop.changed_ns) / 1e9
        elif (requested or {}).get(drop.key) == drop.version:
            plan.requested.append(drop)
        else:
            plan.new.append(drop)
    return plan


def run_key(drop: DropFile) -> str:
    """Unique per file version: Dagster never launches the same key twice."""
    return f"{drop.key}@{drop.version}"


@sensor(name="crawl_drop_sensor_v0", asset_selection=AssetSelection.assets(CRAWL_DROPS), minimum_interval_seconds=30)
def crawl_drop_sensor(context: SensorEvaluationContext, pipeline: PipelineResource) -> SensorResult | SkipReason:
    cfg, storage = pipeline.load(), pipeline.storage()
    location = cfg.drops_uri()
    listing = list_drops(pipeline.drops(), cfg.drops.patterns, cfg.drops.recursive)
    state = json.loads(context.cursor) if context.cursor else {}
    for line in sorted(set(listing.refused) - set(state.get("refused", []))):
        context.log.warning(line)  # once per refused path, not on every tick
    plan = plan_drops(storage, listing.drops, cfg.drops.settle_seconds, requested=state.get("requested", {}))
    changed = plan.new
    requested = {d.key: d.version for d in [*plan.requested, *plan.new]}  # published ones need no memory
    cursor = json.dumps({"requested": requested, "refused": sorted(listing.refused)}, sort_keys=True)
    if not changed:
        waiting = f"; {len(plan.unsettled)} still being written" if plan.unsettled else ""
        return SensorResult(skip_reason=SkipReason(f"no new or changed drops in {location}{waiting}"), cursor=cursor)
    for drop in changed:
        register_drop(storage, drop, location)
    known = set(context.instance.get_dynamic_partitions(crawl_drop_partitions.name))
    new_keys = sorted({d.key for d in changed} - known)
    return SensorResult(
        run_requests=[
            RunRequest(run_key=run_key(d), partition_key=d.key, tags={"synth_cpt/source_uri": d.uri, "synth_cpt/source_version": d.version})
            for d in changed
        ],
        dynamic_partitions_requests=[crawl_drop_partitions.build_add_request(new_keys)] if new_keys else [],
        cursor=cursor,
    )
