"""Asset checks: the boilerplate written once, and the checks that are not part of an asset's publish.

Most checks are `check_specs` of their asset: the suite runs on the candidate before it is published
(core.publish), and the asset yields the result. What stays a separate `@asset_check` here judges a
published output against today's config (a drop's acceptance).
"""

from typing import Any

import polars as pl
from dagster import (
    AssetCheckEvaluation,
    AssetCheckExecutionContext,
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetExecutionContext,
    AssetKey,
    MetadataValue,
    PartitionsDefinition,
    asset_check,
)

from synth_cpt.core.contracts import acceptance_suite
from synth_cpt.core.layout import CRAWL_DROPS
from synth_cpt.core.publish import CandidateRejected
from synth_cpt.core.validation import Outcome, run_suite
from synth_cpt.defs.partitions import crawl_drop_partitions
from synth_cpt.defs.resources import PipelineResource
from synth_cpt.ingest.drops import published


def check_result(outcome: Outcome, check_name: str | None = None, asset_key: str | None = None, **extra) -> AssetCheckResult:
    return AssetCheckResult(
        check_name=check_name,
        asset_key=asset_key,
        passed=outcome.success,
        severity=AssetCheckSeverity.ERROR,
        description="; ".join(outcome.failures)[:1000] or None,
        metadata={"expectations": MetadataValue.json(outcome.details), **extra},
    )


def rejected_result(
    context: AssetExecutionContext, rejected: CandidateRejected, asset_key: str | None = None, **metadata: Any
) -> AssetCheckResult:
    """The failed check of a candidate that was not published (`metadata`: what the step spent anyway)."""
    context.log.error(
        f"{asset_key or ''} {rejected.check_name} failed: not published, the previous version stays; "
        f"candidate kept at {rejected.kept}: {rejected}".strip()
    )
    return check_result(
        rejected.outcome, check_name=rejected.check_name, asset_key=asset_key, candidate=MetadataValue.path(rejected.kept), **metadata
    )


def partition_check(result: AssetCheckResult, partition: str) -> AssetCheckEvaluation:
    """`result` as the evaluation of one partition's check. Dagster takes an AssetCheckResult's partition from
    the step, and the step of a single-run backfill covers several partitions, so the generation assets say it."""
    return AssetCheckEvaluation(
        asset_key=AssetKey.from_coercible(result.asset_key), check_name=result.check_name, passed=result.passed,
        metadata=result.metadata, severity=result.severity, description=result.description, blocking=True, partition=partition,
    )  # fmt: skip


def publish_spec(name: str, asset: str, description: str, partitions_def: PartitionsDefinition | None = None) -> AssetCheckSpec:
    """A blocking check that runs on the candidate, before publishing (see the module docstring)."""
    return AssetCheckSpec(
        name,
        asset=asset,
        partitions_def=partitions_def,
        blocking=True,
        description=f"GX, on the candidate before it is published: {description}",
    )


@asset_check(
    asset=AssetKey(CRAWL_DROPS),
    name="quarantine_rate",
    partitions_def=crawl_drop_partitions,
    blocking=True,
    description="GX: the share of quarantined records is at most limits.max_quarantine_rate and the file is complete "
    "(unless limits.accept_partial_files); otherwise the drop is kept out of raw_corpus.",
)
def drop_acceptance(context: AssetCheckExecutionContext, pipeline: PipelineResource) -> AssetCheckResult:
    cfg, storage = pipeline.load(), pipeline.storage()
    pointer = published(storage, context.partition_key)
    if pointer is None:
        return AssetCheckResult(passed=False, description=f"drop {context.partition_key} has no published version")
    manifest = pointer["manifest"]  # the pointer carries it: nothing else is read
    complete = bool(manifest.get("complete", True))
    frame = pl.DataFrame({"quarantine_rate": [float(manifest["quarantine_rate"])], "complete": [complete]})
    outcome = run_suite("drop_acceptance", frame, acceptance_suite(cfg.limits.max_quarantine_rate, cfg.limits.accept_partial_files))
    return check_result(
        outcome,
        quarantine_rate=float(manifest["quarantine_rate"]),
        complete=complete,
        damage=manifest.get("damage") or "",
        max_quarantine_rate=cfg.limits.max_quarantine_rate,
        quarantine_by_reason=MetadataValue.json(manifest["quarantine_by_reason"]),
    )


CHECKS = [drop_acceptance]
