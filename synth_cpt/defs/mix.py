"""Training mixes: one asset `training_mix_<recipe>` per recipe of the config, `[language|quality]`.

Thin: the plan, the shards, the manifests and the validation are `mix.build`; the asset yields the
check and the metadata. A mix that cannot be made as asked fails before writing, with its shortfall.
"""

from dagster import (
    AssetExecutionContext,
    AssetsDefinition,
    AutomationCondition,
    Failure,
    MaterializeResult,
    MetadataValue,
    PartitionsDefinition,
    asset,
)

from synth_cpt.core.config import MixRecipe, PipelineConfig
from synth_cpt.core.layout import ENTIGRAPH_CORPUS, QUALITY_SUBSETS, mix_asset, rewrite_asset
from synth_cpt.core.metadata import sample_markdown
from synth_cpt.corpus.tokenizer import TokenCounter
from synth_cpt.defs.checks import check_result, publish_spec
from synth_cpt.defs.partitions import corpus_partitions, split_corpus_key
from synth_cpt.defs.resources import PipelineResource
from synth_cpt.mix.build import build_mix, origin_of
from synth_cpt.mix.plan import MixShortfall

GROUP = "mix"
MIX_VALID = "mix_valid"
_VALID = "the contract's columns, text and tokens in every row, only the recipe's origins, lineage on every synthetic row, each origin's tokens at its target within one document."


def _upstream(source: str) -> str:
    origin = origin_of(source)
    if origin == "original":
        return QUALITY_SUBSETS
    return ENTIGRAPH_CORPUS if origin == "entigraph" else rewrite_asset(origin.split(":", 1)[1])


def build_mix_assets(config: PipelineConfig) -> list[AssetsDefinition]:
    parts = corpus_partitions(config)
    # mixes stand on the generation assets: they follow new drops only when those do (synthesis.automation)
    automation = AutomationCondition.eager() if config.synthesis.automation == "eager" else None
    return [_mix(name, recipe, parts, automation) for name, recipe in config.mixes.recipes.items()]


def _mix(name: str, recipe: MixRecipe, parts: PartitionsDefinition, automation: AutomationCondition | None) -> AssetsDefinition:
    key = mix_asset(name)
    deps = sorted({_upstream(p.source) for p in recipe.parts()})

    @asset(
        name=key, partitions_def=parts, deps=deps, group_name=GROUP, kinds={"parquet"},
        automation_condition=automation, output_required=False,
        description=f"Training mix '{name}': {recipe.description or 'see the config'}",
        check_specs=[publish_spec(MIX_VALID, key, _VALID, parts)],
    )  # fmt: skip
    def training_mix(context: AssetExecutionContext, pipeline: PipelineResource):
        cfg, storage = pipeline.load(), pipeline.storage()
        language, quality = split_corpus_key(context.partition_key)
        try:
            result = build_mix(
                storage, name, cfg.mixes.recipes[name], language, quality, TokenCounter.from_storage(storage), run_id=context.run_id
            )
        except MixShortfall as short:
            raise Failure(str(short), metadata={"plan": MetadataValue.json(short.plan.describe())}) from None
        m = result.manifest
        if result.superseded_by:
            context.log.warning(f"{key} {language}|{quality}: a newer run published {result.superseded_by} meanwhile; it stays in force")
            yield check_result(result.outcome, check_name=MIX_VALID, asset_key=key, superseded_by=result.superseded_by)
            return
        if result.pointer is None:
            yield check_result(result.outcome, check_name=MIX_VALID, asset_key=key, candidate=MetadataValue.path(result.kept or ""))
            return
        yield check_result(result.outcome, check_name=MIX_VALID, asset_key=key)
        context.log.info(f"{key} {language}|{quality}: {m['documents']:,} rows, {m['tokens']:,} tokens in {len(m['shards'])} shards")
        table = [{"origin": o, "documents": v["documents"], "tokens": v["tokens"]} for o, v in m["by_origin"].items()]
        yield MaterializeResult(
            asset_key=key,
            metadata={
                "dagster/row_count": m["documents"], "dagster/uri": storage.uri(result.pointer["prefix"]),
                "version": result.pointer["version"], "tokens": m["tokens"], "shards": len(m["shards"]),
                "tokens_by_origin": MetadataValue.md(sample_markdown(table)), "plan": MetadataValue.json(m["plan"]),
                "shrunk": m["plan"]["shrunk"], "recipe_sha": m["recipe_sha"], "seed": m["seed"], "tokenizer_sha": m["tokenizer_sha"],
                "drops": MetadataValue.json(m["drops"]), "prompt_shas": MetadataValue.json(m["prompt_shas"]),
                "model_fingerprints": MetadataValue.json(m["model_fingerprints"]), "repeats": MetadataValue.json(m["repeats"]),
                "missing_components": MetadataValue.json(m["missing_components"]),
                "inputs": MetadataValue.json(m["inputs"]),  # the exact input versions this mix version pinned
                **({"tokens_in_files": m["tokens_in_files"]} if "tokens_in_files" in m else {}),
            },
        )  # fmt: skip

    return training_mix
