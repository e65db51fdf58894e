"""The one Definitions object of synth-cpt."""

from __future__ import annotations

from dagster import (
    AssetSelection,
    AutomationConditionSensorDefinition,
    DefaultSensorStatus,
    Definitions,
    define_asset_job,
)

from synth_cpt.core.config import current_config
from synth_cpt.core.layout import CRAWL_DROPS, QUALITY_CUTPOINTS, QUALITY_SUBSETS, RAW_CORPUS, TOKENIZER
from synth_cpt.defs.checks import CHECKS
from synth_cpt.defs.cluster import generation_run_tags
from synth_cpt.defs.evals import GROUP as EVALS_GROUP
from synth_cpt.defs.evals import build_eval_assets
from synth_cpt.defs.ingest import build_ingest_assets
from synth_cpt.defs.mix import GROUP as MIX_GROUP
from synth_cpt.defs.mix import build_mix_assets
from synth_cpt.defs.partitions import corpus_partitions, crawl_drop_partitions, language_partitions
from synth_cpt.defs.resources import LLM, PipelineResource
from synth_cpt.defs.sensors import drop_sensor_every
from synth_cpt.defs.synthesis import GROUP as SYNTHESIS_GROUP
from synth_cpt.defs.synthesis import build_synthesis_assets

INGEST_DROP_JOB = "ingest_drop_job"
CORPUS_JOB = "corpus_job"
CUTPOINTS_JOB = "quality_cutpoints_job"  # quality.method percentiles only
TOKENIZER_JOB = "tokenizer_job"
SUBSETS_JOB = "quality_subsets_job"
SYNTHESIS_JOB = "synthesis_job"
MIX_JOB = "mix_job"
EVALS_JOB = "evals_job"


def automation_sensor_every(seconds: int) -> AutomationConditionSensorDefinition:
    """Declarative automation (eager downstream of a new drop), on by default when the daemon runs, evaluated
    at most every `seconds` (config `drops.automation_interval_seconds`)."""
    return AutomationConditionSensorDefinition(
        "synth_cpt_automation",
        target=AssetSelection.all(),
        default_status=DefaultSensorStatus.RUNNING,
        minimum_interval_seconds=seconds,
        description="Brings raw_corpus, tokenizer and quality_subsets up to date after new drops (and the generation assets too "
        "when synthesis.automation is eager).",
    )


def build_definitions() -> Definitions:
    config = current_config()
    assets = [*build_ingest_assets(config), *build_synthesis_assets(config), *build_mix_assets(config), *build_eval_assets(config)]
    corpus_parts = corpus_partitions(config)
    jobs = [
        define_asset_job(INGEST_DROP_JOB, AssetSelection.assets(CRAWL_DROPS), partitions_def=crawl_drop_partitions),
        define_asset_job(CORPUS_JOB, AssetSelection.assets(RAW_CORPUS), partitions_def=corpus_parts),
        define_asset_job(TOKENIZER_JOB, AssetSelection.assets(TOKENIZER)),
        define_asset_job(SUBSETS_JOB, AssetSelection.assets(QUALITY_SUBSETS), partitions_def=corpus_parts),
        # every generation asset of a partition: one step, one engine load
        define_asset_job(
            SYNTHESIS_JOB, AssetSelection.groups(SYNTHESIS_GROUP), partitions_def=corpus_parts, tags=generation_run_tags(config.generation)
        ),
        define_asset_job(MIX_JOB, AssetSelection.groups(MIX_GROUP), partitions_def=corpus_parts),
        define_asset_job(EVALS_JOB, AssetSelection.groups(EVALS_GROUP), partitions_def=corpus_parts),
    ]
    if config.quality.method == "percentiles":
        jobs.append(define_asset_job(CUTPOINTS_JOB, AssetSelection.assets(QUALITY_CUTPOINTS), partitions_def=language_partitions(config)))
    return Definitions(
        assets=assets,
        asset_checks=CHECKS,
        jobs=jobs,
        sensors=[
            drop_sensor_every(config.drops.sensor_interval_seconds),
            automation_sensor_every(config.drops.automation_interval_seconds),
        ],
        resources={"pipeline": PipelineResource(), "llm": LLM.from_config(config)},
    )


defs = build_definitions()
