"""The drop sensor: new or changed files in the drops location become crawl_drops runs."""

import json

from dagster import AssetSelection, DefaultSensorStatus, RunRequest, SensorEvaluationContext, SensorResult, SkipReason, sensor

from synth_cpt.core.layout import CRAWL_DROPS
from synth_cpt.defs.partitions import crawl_drop_partitions
from synth_cpt.defs.resources import PipelineResource
from synth_cpt.ingest.drops import plan_drops, register_drop
from synth_cpt.ingest.sources import DropFile, list_drops


def run_key(drop: DropFile) -> str:
    """Unique per file version: Dagster never launches the same key twice."""
    return f"{drop.key}@{drop.version}"


@sensor(
    name="crawl_drop_sensor",
    asset_selection=AssetSelection.assets(CRAWL_DROPS),
    minimum_interval_seconds=30,
    default_status=DefaultSensorStatus.RUNNING,
    description="Watches the drops folder or S3 prefix; each new or replaced file becomes a crawl_drops partition and a run.",
)
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
