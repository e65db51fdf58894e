"""Ingest assets: crawl_drops -> [quality_cutpoints] -> raw_corpus -> tokenizer -> quality_subsets.

`quality_cutpoints` exists only with `quality.method: percentiles` (Nemotron-CC, METHODS §3): with
thresholds there is nothing to compute, so the asset is not in the graph.

Thin on purpose: each asset calls a plain function that computes a candidate, validates it (the
asset's `check_specs`), and publishes it only on success; the asset yields the check results and a
MaterializeResult whose metadata comes from the candidate, so nothing is read back.
"""

from dagster import (
    AllPartitionMapping,
    AssetDep,
    AssetExecutionContext,
    AssetsDefinition,
    AssetSelection,
    AutomationCondition,
    DataVersion,
    MaterializeResult,
    MetadataValue,
    MultiPartitionsDefinition,
    MultiToSingleDimensionPartitionMapping,
    asset,
)

from synth_cpt.core.config import PipelineConfig
from synth_cpt.core.contracts import check_budget, check_corpus_file, check_drop_version
from synth_cpt.core.layout import CRAWL_DROPS, QUALITY_CUTPOINTS, QUALITY_SUBSETS, RAW_CORPUS, TOKENIZER, cutpoints_file, partition_file
from synth_cpt.core.metadata import sample_markdown, summarize
from synth_cpt.core.plots import histogram_markdown
from synth_cpt.core.progress import RateLogger
from synth_cpt.core.publish import CandidateRejected, keep_rejected
from synth_cpt.corpus.subsets import select_budgeted_file
from synth_cpt.corpus.tokenizer import TokenCounter, build_tokenizer, check_model
from synth_cpt.defs.checks import check_result, publish_spec, rejected_result
from synth_cpt.defs.partitions import LANGUAGE, corpus_partitions, crawl_drop_partitions, language_partitions, split_corpus_key
from synth_cpt.defs.resources import PipelineResource, open_location
from synth_cpt.ingest.cutpoints import build_cutpoints, cutpoints_markdown
from synth_cpt.ingest.dedup import VALUES, build_raw_corpus
from synth_cpt.ingest.drops import ingest_drop, resolve_drop

GROUP = "ingest"
DOCUMENTS_VALID = "documents_valid"


def build_ingest_assets(config: PipelineConfig) -> list[AssetsDefinition]:
    """The ingest assets for the partitions this config defines (quality_cutpoints with percentiles only)."""
    corpus_parts: MultiPartitionsDefinition = corpus_partitions(config)
    marks = config.quality.marks()

    @asset(
        name=CRAWL_DROPS,
        partitions_def=crawl_drop_partitions,
        group_name=GROUP,
        kinds={"parquet"},
        output_required=False,  # a rejected candidate publishes nothing
        description="One crawl drop file parsed, validated, normalized, language-identified and scored; bad records quarantined.",
        check_specs=[
            publish_spec(
                DOCUMENTS_VALID,
                CRAWL_DROPS,
                "docs and quarantine have the contracts' columns; every document has text, a doc_id, a language and a score in 0-5.",
                crawl_drop_partitions,
            )
        ],  # fmt: skip
    )
    def crawl_drops(context: AssetExecutionContext, pipeline: PipelineResource):
        cfg, storage = pipeline.load(), pipeline.storage()
        location, drop = resolve_drop(storage, context.partition_key, cfg, open_location=open_location)
        context.log.info(f"ingesting {drop.uri} ({drop.size:,} bytes, version {drop.version})")
        rate = RateLogger(context.log.info, f"drop {drop.key}")
        try:
            report = ingest_drop(
                cfg, storage, location, drop,
                progress=lambda d, t, r, n: rate(d, t, f"{r:,} records, {n:,} documents"),
                validate=lambda s, prefix: check_drop_version(s, prefix, cfg),
            )  # fmt: skip
        except CandidateRejected as rejected:
            yield rejected_result(context, rejected)
            return
        rate(drop.size, drop.size, f"{report.records:,} records, {report.documents:,} documents", final=True)
        yield check_result(report.outcome, check_name=DOCUMENTS_VALID, documents=report.documents)
        if report.superseded_by:  # the newer run recorded the materialization of what readers see
            context.log.warning(
                f"drop {drop.key}: another run published a newer version ({report.superseded_by}) meanwhile; it stays "
                f"in force at {storage.uri(report.prefix)} and this run's candidate was not published"
            )
            return
        if not report.accepted:
            context.log.warning(
                f"drop {drop.key}: damaged, kept out of raw_corpus until a complete version arrives: {report.damage}"
                if not report.complete
                else f"drop {drop.key}: {report.quarantine_rate:.1%} of records quarantined, over "
                f"limits.max_quarantine_rate={cfg.limits.max_quarantine_rate:.1%}; kept out of raw_corpus"
            )
        yield MaterializeResult(
            metadata={
                "dagster/row_count": report.documents,
                "dagster/uri": storage.uri(report.prefix),
                "source_uri": drop.uri,
                "source_version": drop.version,
                "records": report.records,
                "documents": report.documents,
                "quarantined": report.quarantined,
                "quarantine_rate": round(report.quarantine_rate, 6),
                "quarantine_by_reason": MetadataValue.json(report.quarantine_by_reason),
                "accepted": report.accepted,
                "complete": report.complete,
                "damage": report.damage or "",
                "encoding_repaired": report.encoding_repaired,
                "languages": MetadataValue.json(report.languages),
                "quality_score_source": MetadataValue.json(report.quality_sources),
                "mb_per_s": round(drop.size / 1e6 / max(report.seconds, 1e-9), 2),
                "sample_documents": MetadataValue.md(sample_markdown(report.sample[:3])),
                "sample_quarantine": MetadataValue.md(sample_markdown(report.quarantine_sample, width=160)),
                "quality_histogram": MetadataValue.md(
                    histogram_markdown(report.histogram, f"quality score, {drop.key}", "score (0-5)", marks)
                ),
            }
        )

    language_parts = language_partitions(config)

    @asset(
        name=QUALITY_CUTPOINTS,
        partitions_def=language_parts,
        deps=[AssetDep(crawl_drops, partition_mapping=AllPartitionMapping())],
        group_name=GROUP,
        kinds={"json"},
        automation_condition=AutomationCondition.eager().without(~AutomationCondition.any_deps_missing()),
        output_required=False,
        description="Nemotron-CC (METHODS §3): the 19 weighted percentile cut points (5..95; tokens of tokenizer.model_file, else characters) of each quality score of a "
        "language, on a seeded sample of its accepted drops; raw_corpus buckets by the max of the 0-19 values they give.",
        check_specs=[
            publish_spec(
                "cutpoints_valid", QUALITY_CUTPOINTS, "each score has no cut points or 19 finite non-decreasing ones.", language_parts
            )
        ],
    )
    def quality_cutpoints(context: AssetExecutionContext, pipeline: PipelineResource):
        cfg, storage = pipeline.load(), pipeline.storage()
        language = context.partition_key
        try:
            report = build_cutpoints(storage, cfg, language)
        except CandidateRejected as rejected:
            yield rejected_result(context, rejected)
            return
        payload = report.payload
        yield check_result(report.outcome, check_name="cutpoints_valid")
        changed = report.previous_sha256 != payload["sha256"]
        context.log.info(f"{language}: cut points {payload['sha256'][:12]} ({'changed' if changed else 'unchanged'}) from {report.drops}")
        yield MaterializeResult(
            data_version=DataVersion(payload["sha256"]),  # raw_corpus goes stale when a cut point moves
            metadata={
                "dagster/uri": storage.uri(cutpoints_file(language)),
                "cutpoints": MetadataValue.md(cutpoints_markdown(payload)),
                "cutpoints_sha256": payload["sha256"],
                "previous_sha256": report.previous_sha256 or "",
                "changed": changed,
                "weight": payload["weight"],
                "tokenizer_sha256": payload["tokenizer_sha256"] or "",
                "seed": payload["seed"],
                "sample_limit": payload["sample_limit"],
                "sampled_documents": payload["sampled_documents"],
                "documents_per_score": MetadataValue.json({k: v["documents"] for k, v in payload["scores"].items()}),
                "drops_read": MetadataValue.json(report.drops),
            },
        )

    percentiles = config.quality.method == "percentiles"
    raw_deps = [AssetDep(crawl_drops, partition_mapping=AllPartitionMapping())]
    # eager, except that a drop that failed to ingest must not hold every other drop back
    raw_automation = AutomationCondition.eager().without(~AutomationCondition.any_deps_missing())
    if percentiles:
        raw_deps.append(
            AssetDep(quality_cutpoints, partition_mapping=MultiToSingleDimensionPartitionMapping(partition_dimension_name=LANGUAGE))
        )
        # raw_corpus follows its cut points (which follow the drops), never the drops ahead of them
        raw_automation = AutomationCondition.eager().ignore(AssetSelection.assets(CRAWL_DROPS))

    @asset(
        name=RAW_CORPUS,
        partitions_def=corpus_parts,
        deps=raw_deps,
        group_name=GROUP,
        kinds={"parquet", "duckdb"},
        automation_condition=raw_automation,
        output_required=False,
        description="All accepted drops of a language, exact-deduplicated by doc_id (earliest drop wins), in one quality bucket.",
        check_specs=[publish_spec(DOCUMENTS_VALID, RAW_CORPUS, _DOCUMENTS, corpus_parts)],
    )
    def raw_corpus(context: AssetExecutionContext, pipeline: PipelineResource):
        cfg, storage = pipeline.load(), pipeline.storage()
        language, quality = split_corpus_key(context.partition_key)
        try:
            stats = build_raw_corpus(storage, cfg, language, quality, validate=lambda path: check_corpus_file(path, cfg, language, quality))
        except CandidateRejected as rejected:
            yield rejected_result(context, rejected)
            return
        if stats.rejected_drops:
            context.log.warning(f"drops kept out by their blocking check: {stats.rejected_drops}")
        summary = stats.summary
        yield check_result(stats.outcome, check_name=DOCUMENTS_VALID, documents=stats.documents)
        if stats.cutpoints is not None:  # which cut points made the buckets, and what the values look like
            bucketing = {
                "quality_cutpoints_sha256": stats.cutpoints.sha256,
                "quality_histogram": MetadataValue.md(
                    histogram_markdown(
                        stats.value_histogram, f"{language}|{quality}: bucket value", "max percentile bucket (0-19)", marks, 0.0, VALUES
                    )
                ),
            }
        else:
            bucketing = {
                "quality_histogram": MetadataValue.md(
                    histogram_markdown(summary.histogram, f"{language}|{quality}: quality score", "score (0-5)", marks)
                )
            }
        yield MaterializeResult(
            metadata={
                "dagster/row_count": stats.documents,
                "dagster/uri": storage.uri(partition_file(RAW_CORPUS, language, quality)),
                "characters": stats.characters,
                "language_documents": stats.language_documents,
                "unique_documents": stats.unique_documents,
                "duplicates_removed": stats.duplicates_removed,
                "in_no_bucket": stats.in_no_bucket,
                "bucket": cfg.quality.buckets[quality].describe(),
                "contributing_drops": MetadataValue.json(summary.drops),
                "rejected_drops": MetadataValue.json(stats.rejected_drops),
                "sample_documents": MetadataValue.md(sample_markdown(summary.sample)),
                **bucketing,
            },
        )

    @asset(
        name=TOKENIZER,
        deps=[AssetDep(raw_corpus, partition_mapping=AllPartitionMapping())],
        group_name=GROUP,
        kinds={"tokenizer"},
        automation_condition=AutomationCondition.eager(),
        output_required=False,
        description=(
            "The target tokenizer behind every token count and .bin shard: the configured model file (SentencePiece .model or "
            "Hugging Face tokenizer.json), or a SentencePiece model trained on a seeded raw_corpus sample."
        ),
        check_specs=[
            publish_spec("model_loads", TOKENIZER, "the model loads, tokenizes sample text, and its hash and vocabulary match its info.")
        ],
    )
    def tokenizer(context: AssetExecutionContext, pipeline: PipelineResource):
        cfg, storage = pipeline.load(), pipeline.storage()
        files = [k for k in storage.list(RAW_CORPUS) if k.endswith(".parquet")]
        try:
            info = build_tokenizer(storage, cfg, files, validate=check_model)
        except CandidateRejected as rejected:
            yield rejected_result(context, rejected)
            return
        context.log.info(f"tokenizer {info['source']} ({info['kind']}): vocab {info['vocab_size']}, sha256 {info['sha256'][:12]}")
        yield check_result(info["outcome"], check_name="model_loads")
        if info["superseded_by"]:  # the newer run recorded the materialization of what readers see
            context.log.warning(
                f"another run published a newer tokenizer ({info['superseded_by']}) meanwhile; it stays in force "
                f"at {info['uri']} and this run's candidate was not published"
            )
            return
        yield MaterializeResult(
            metadata={
                "dagster/uri": info["uri"],
                "kind": info["kind"],
                "sha256": info["sha256"],
                "vocab_size": info["vocab_size"],
                "bos_id": info["bos_id"] if info["bos_id"] is not None else -1,
                "eos_id": info["eos_id"] if info["eos_id"] is not None else -1,
                "source": info["source"],
                "version": info["version"],
                "trained_on_documents": info.get("trained_on_documents", 0),
            }
        )

    @asset(
        name=QUALITY_SUBSETS,
        partitions_def=corpus_parts,
        deps=[raw_corpus, tokenizer],
        group_name=GROUP,
        kinds={"parquet"},
        automation_condition=AutomationCondition.eager(),
        output_required=False,
        description="A seeded, token-budgeted selection of the partition's raw_corpus: the documents to synthesize from.",
        check_specs=[
            publish_spec(DOCUMENTS_VALID, QUALITY_SUBSETS, _DOCUMENTS, corpus_parts),
            publish_spec(
                "tokens_within_budget", QUALITY_SUBSETS, "every document has n_tokens > 0 and the total is within budget.", corpus_parts
            ),
        ],
    )
    def quality_subsets(context: AssetExecutionContext, pipeline: PipelineResource):
        cfg, storage = pipeline.load(), pipeline.storage()
        language, quality = split_corpus_key(context.partition_key)
        counter = TokenCounter.from_storage(storage)
        budget = cfg.subsets.budget_for(f"{language}|{quality}")
        key = partition_file(QUALITY_SUBSETS, language, quality)
        try:
            with storage.local_path(partition_file(RAW_CORPUS, language, quality)) as source, storage.writing(key) as target:
                stats = select_budgeted_file(str(source), str(target), counter, budget, cfg.subsets.order, cfg.seeds.subsets)
                outcomes = {
                    DOCUMENTS_VALID: check_corpus_file(str(target), cfg, language, quality, with_tokens=True),
                    "tokens_within_budget": check_budget(str(target), budget),
                }
                for name, outcome in outcomes.items():
                    if not outcome.success:
                        raise CandidateRejected(outcome, keep_rejected(storage, key, target), name)
                summary = summarize(str(target), ["doc_id", "n_tokens", "quality_score", "text"])
        except CandidateRejected as rejected:
            yield rejected_result(context, rejected)
            return
        context.log.info(
            f"{language}|{quality}: {stats.documents:,} of {stats.candidate_documents:,} documents, {stats.tokens:,} tokens (budget {budget})"
        )
        yield check_result(outcomes[DOCUMENTS_VALID], check_name=DOCUMENTS_VALID, documents=stats.documents)
        yield check_result(
            outcomes["tokens_within_budget"], check_name="tokens_within_budget", tokens=stats.tokens, budget_tokens=budget or -1
        )
        yield MaterializeResult(
            metadata={
                "dagster/row_count": stats.documents,
                "dagster/uri": storage.uri(key),
                "tokens": stats.tokens,
                "budget_tokens": budget if budget is not None else "unlimited",
                "budget_used": round(stats.tokens / budget, 4) if budget else 0.0,
                "candidate_documents": stats.candidate_documents,
                "order": cfg.subsets.order,
                "seed": cfg.seeds.subsets,
                "tokenizer_sha256": counter.sha256,
                "contributing_drops": MetadataValue.json(summary.drops),
                "sample_documents": MetadataValue.md(sample_markdown(summary.sample)),
            },
        )

    return [crawl_drops, *([quality_cutpoints] if percentiles else []), raw_corpus, tokenizer, quality_subsets]


_DOCUMENTS = "contract columns, non-empty text, unique doc_id, language equals the partition's, quality score inside the bucket."
