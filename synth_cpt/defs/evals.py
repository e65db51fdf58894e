"""eval_scores `[language|quality]`: every set of texts of the partition scored side by side (see
evals/scores.py), published as one version, with plots and NPM in its metadata."""

from dagster import AssetExecutionContext, AssetsDefinition, MaterializeResult, MetadataValue, asset

from synth_cpt.core.config import PipelineConfig
from synth_cpt.core.contracts import check_scores
from synth_cpt.core.layout import ENTIGRAPH_CORPUS, EVAL_SCORES, QUALITY_SUBSETS, mix_asset, rewrite_asset
from synth_cpt.core.metadata import sample_markdown
from synth_cpt.core.publish import CandidateRejected
from synth_cpt.corpus.tokenizer import TokenCounter
from synth_cpt.defs.checks import check_result, publish_spec, rejected_result
from synth_cpt.defs.partitions import corpus_partitions, split_corpus_key
from synth_cpt.defs.resources import PipelineResource
from synth_cpt.evals.diversity import near_duplicate_meaning
from synth_cpt.evals.scores import plots, score_partition
from synth_cpt.synthesis.outputs import publish_tables
from synth_cpt.synthesis.prompts import list_prompts

GROUP = "evals"
SCORES_VALID = "scores_valid"


def build_eval_assets(config: PipelineConfig) -> list[AssetsDefinition]:
    parts = corpus_partitions(config)
    deps = [
        QUALITY_SUBSETS,
        ENTIGRAPH_CORPUS,
        *(rewrite_asset(s) for s in list_prompts("rewrite")),
        *(mix_asset(r) for r in config.mixes.recipes),
    ]

    @asset(
        name=EVAL_SCORES, partitions_def=parts, deps=deps, group_name=GROUP, kinds={"parquet"}, output_required=False,
        description="Diversity, copying, fidelity, quality and contamination of every synthetic set and mix of the partition; NPM of "
        "configured lm-eval results. near_duplicate_rate: the share of a set's texts that have at least one other text with "
        "estimated Jaccard >= evals.near_duplicate_threshold (MinHash of word 5-grams, after strip_template).",
        check_specs=[publish_spec(SCORES_VALID, EVAL_SCORES, "one row per set, counts >= 0, ratios in [0, 1].", parts)],
    )  # fmt: skip
    def eval_scores(context: AssetExecutionContext, pipeline: PipelineResource):
        cfg, storage = pipeline.load(), pipeline.storage()
        language, quality = split_corpus_key(context.partition_key)
        report = score_partition(storage, cfg, language, quality, TokenCounter.from_storage(storage).count)
        outcome = check_scores(report.scores)
        tables = {"scores.parquet": report.scores, "contamination.parquet": report.contamination}
        try:
            pointer = publish_tables(storage, EVAL_SCORES, language, quality, tables, {SCORES_VALID: outcome}, {"npm": report.npm})
        except CandidateRejected as rejected:
            yield rejected_result(context, rejected, asset_key=EVAL_SCORES)
            return
        yield check_result(outcome, check_name=SCORES_VALID, asset_key=EVAL_SCORES)
        shown = report.scores.select(
            "set", "rows", "tokens", "distinct_2", "compression_ratio", "near_duplicate_rate", "copy_overlap_mean", "heuristic_score_mean"
        )
        table = [{k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()} for r in shown.to_dicts()]
        context.log.info(f"eval_scores {language}|{quality}: {report.scores.height} sets, {report.contamination.height} contaminated texts")
        yield MaterializeResult(
            asset_key=EVAL_SCORES,
            metadata={
                "dagster/row_count": report.scores.height, "dagster/uri": storage.uri(pointer["prefix"]), "version": pointer["version"],
                "scores": MetadataValue.md(sample_markdown(table, width=40)), "contaminated_texts": report.contamination.height,
                "near_duplicate_rate_is": near_duplicate_meaning(cfg.evals.near_duplicate_threshold),
                "tokens_by_set": MetadataValue.json(dict(report.scores.select("set", "tokens").iter_rows())),
                **{k: MetadataValue.md(v) for k, v in plots(report).items()},
                **({"npm": MetadataValue.json({k: v for k, v in report.npm.items() if k != "tasks"})} if report.npm else {}),
            },
        )  # fmt: skip

    return [eval_scores]
