"""Ingest half of the graph: crawl_drops -> raw_corpus -> tokenizer -> quality_subsets, with checks.

Thin on purpose: each asset reads its inputs, calls the plain functions in synth_cpt.ingest, corpus,
tokens and subsets, writes explicitly, and returns a MaterializeResult with metadata.
"""

import polars as pl
from dagster import (
    AllPartitionMapping,
    AssetCheckExecutionContext,
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetDep,
    AssetExecutionContext,
    AssetKey,
    AssetsDefinition,
    AutomationCondition,
    MaterializeResult,
    MetadataValue,
    MultiPartitionsDefinition,
    asset,
    asset_check,
)

from synth_cpt.config import PipelineConfig
from synth_cpt.corpus import ASSET as RAW_CORPUS
from synth_cpt.corpus import build_raw_corpus, corpus_columns, corpus_file
from synth_cpt.ingest.drops import ASSET as CRAWL_DROPS
from synth_cpt.ingest.drops import ingest_drop, published_prefix, resolve_drop
from synth_cpt.ingest.records import QUARANTINE_SCHEMA, docs_schema
from synth_cpt.partitions import corpus_partitions, crawl_drop_partitions, split_corpus_key
from synth_cpt.plots import histogram_markdown
from synth_cpt.progress import RateLogger
from synth_cpt.resources import PipelineResource
from synth_cpt.storage import Storage
from synth_cpt.subsets import select_budgeted_file
from synth_cpt.tokens import ASSET as TOKENIZER
from synth_cpt.tokens import INFO_KEY, MODEL_KEY, TokenCounter, build_tokenizer
from synth_cpt.validation import CandidateRejected, Outcome, document_suite, expect, run_suite

QUALITY_SUBSETS = "quality_subsets"
GROUP = "ingest"


def _sample_md(frame: pl.DataFrame, columns: list[str], n: int = 3, width: int = 80) -> str:
    rows = frame.head(n).select(columns).to_dicts()
    if not rows:
        return "(none)"
    head = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n"
    cell = lambda v: str(v).replace("\n", " ").replace("|", "\\|")[:width]  # noqa: E731
    return head + "\n".join("| " + " | ".join(cell(r[c]) for c in columns) + " |" for r in rows)


def _bucket_marks(config: PipelineConfig) -> list[float]:
    marks = set()
    for b in config.quality.buckets.values():
        marks.update(v for v in (b.gt, b.ge, b.lt, b.le) if v is not None)
    return sorted(marks)


def build_ingest_assets(config: PipelineConfig) -> tuple[list[AssetsDefinition], list]:
    """The four ingest assets and their checks for the partitions this config defines."""
    corpus_parts: MultiPartitionsDefinition = corpus_partitions(config)

    @asset(
        name=CRAWL_DROPS,
        partitions_def=crawl_drop_partitions,
        group_name=GROUP,
        kinds={"parquet"},
        description="One crawl drop file parsed, validated, normalized, language-identified and scored; bad records quarantined.",
    )
    def crawl_drops(context: AssetExecutionContext, pipeline: PipelineResource) -> MaterializeResult:
        cfg, storage = pipeline.load(), pipeline.storage()
        source, drop = resolve_drop(storage, context.partition_key, cfg)
        context.log.info(f"ingesting {drop.uri} ({drop.size:,} bytes, version {drop.version})")
        rate = RateLogger(context.log.info, f"drop {drop.key}")
        report = ingest_drop(cfg, storage, source, drop, progress=lambda d, t, r, n: rate(d, t, f"{r:,} records, {n:,} documents"))
        rate(drop.size, drop.size, f"{report.records:,} records, {report.documents:,} documents", final=True)
        prefix = published_prefix(storage, drop.key)
        docs = storage.read_parquet(f"{prefix}/docs.parquet", columns=["doc_id", "language", "quality_score", "url", "text"], n_rows=3)
        scores = storage.read_parquet(f"{prefix}/docs.parquet", columns=["quality_score"])["quality_score"]
        quarantine = storage.read_parquet(f"{prefix}/quarantine.parquet", columns=["source_line", "reason"], n_rows=5)
        if not report.accepted:
            context.log.warning(
                f"drop {drop.key}: damaged, kept out of raw_corpus until a complete version arrives: {report.damage}"
                if not report.complete
                else f"drop {drop.key}: {report.quarantine_rate:.1%} of records quarantined, over "
                f"limits.max_quarantine_rate={cfg.limits.max_quarantine_rate:.1%}; kept out of raw_corpus"
            )
        return MaterializeResult(
            metadata={
                "dagster/row_count": report.documents,
                "dagster/uri": storage.uri(prefix),
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
                "sample_documents": MetadataValue.md(_sample_md(docs, ["doc_id", "language", "quality_score", "url", "text"])),
                "sample_quarantine": MetadataValue.md(_sample_md(quarantine, ["source_line", "reason"], n=5, width=160)),
                "quality_histogram": MetadataValue.md(
                    histogram_markdown(scores.to_list(), f"quality score, {drop.key}", "score (0-5)", _bucket_marks(cfg))
                ),
            }
        )

    @asset(
        name=RAW_CORPUS,
        partitions_def=corpus_parts,
        deps=[AssetDep(crawl_drops, partition_mapping=AllPartitionMapping())],
        group_name=GROUP,
        kinds={"parquet", "polars"},
        # eager, except that a drop that failed to ingest must not hold every other drop back
        automation_condition=AutomationCondition.eager().without(~AutomationCondition.any_deps_missing()),
        description="All accepted drops of a language, exact-deduplicated by doc_id (earliest drop wins), in one quality bucket.",
        check_specs=[_documents_spec(RAW_CORPUS, corpus_parts)],
        output_required=False,
    )
    def raw_corpus(context: AssetExecutionContext, pipeline: PipelineResource):
        cfg, storage = pipeline.load(), pipeline.storage()
        language, quality = split_corpus_key(context.partition_key)
        try:  # validate, then publish: a failed candidate never replaces what readers see
            stats = build_raw_corpus(storage, cfg, language, quality, validate=_documents_validator(cfg, RAW_CORPUS, language, quality))
        except CandidateRejected as rejected:
            yield _rejected_result(context, rejected, "documents_valid")
            return
        if stats.rejected_drops:
            context.log.warning(f"drops kept out for their quarantine rate: {stats.rejected_drops}")
        key = corpus_file(RAW_CORPUS, language, quality)
        frame = storage.read_parquet(key, columns=["doc_id", "quality_score", "drop_id", "text"], n_rows=3)
        scores = storage.read_parquet(key, columns=["quality_score"])["quality_score"]
        bounds = cfg.quality.buckets[quality]
        yield MaterializeResult(
            check_results=[_result(stats.outcome, check_name="documents_valid", documents=stats.documents)],
            metadata={
                "dagster/row_count": stats.documents,
                "dagster/uri": storage.uri(key),
                "characters": stats.characters,
                "language_documents": stats.language_documents,
                "unique_documents": stats.unique_documents,
                "duplicates_removed": stats.duplicates_removed,
                "in_no_bucket": stats.in_no_bucket,
                "bucket": bounds.describe(),
                "contributing_drops": MetadataValue.json(stats.drops),
                "rejected_drops": MetadataValue.json(stats.rejected_drops),
                "sample_documents": MetadataValue.md(_sample_md(frame, ["doc_id", "quality_score", "drop_id", "text"])),
                "quality_histogram": MetadataValue.md(
                    histogram_markdown(scores.to_list(), f"{language}|{quality}: quality score", "score (0-5)", _bucket_marks(cfg))
                ),
            },
        )

    @asset(
        name=TOKENIZER,
        deps=[AssetDep(raw_corpus, partition_mapping=AllPartitionMapping())],
        group_name=GROUP,
        kinds={"sentencepiece"},
        automation_condition=AutomationCondition.eager(),
        description="The SentencePiece model behind every token count: the configured model file, or one trained on a seeded raw_corpus sample.",
    )
    def tokenizer(context: AssetExecutionContext, pipeline: PipelineResource) -> MaterializeResult:
        cfg, storage = pipeline.load(), pipeline.storage()
        files = [k for k in storage.list(RAW_CORPUS) if k.endswith(".parquet")]
        info = build_tokenizer(storage, cfg, files)
        context.log.info(f"tokenizer {info['source']}: vocab {info['vocab_size']}, sha256 {info['sha256'][:12]}")
        return MaterializeResult(
            metadata={
                "dagster/uri": storage.uri(MODEL_KEY),
                "sha256": info["sha256"],
                "vocab_size": info["vocab_size"],
                "source": info["source"],
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
        description="A seeded, token-budgeted selection of the partition's raw_corpus: the documents to synthesize from.",
        check_specs=[_documents_spec(QUALITY_SUBSETS, corpus_parts), _budget_spec(corpus_parts)],
        output_required=False,
    )
    def quality_subsets(context: AssetExecutionContext, pipeline: PipelineResource):
        cfg, storage = pipeline.load(), pipeline.storage()
        language, quality = split_corpus_key(context.partition_key)
        counter = TokenCounter.from_storage(storage)
        budget = cfg.subsets.budget_for(f"{language}|{quality}")
        key = corpus_file(QUALITY_SUBSETS, language, quality)
        validate_documents = _documents_validator(cfg, QUALITY_SUBSETS, language, quality)
        try:  # validate, then publish
            with storage.local_path(corpus_file(RAW_CORPUS, language, quality)) as source, storage.writing(key) as target:
                stats = select_budgeted_file(str(source), str(target), counter, budget, cfg.subsets.order, cfg.seeds.subsets)
                outcomes = {
                    "documents_valid": validate_documents(str(target)),
                    "tokens_within_budget": _budget_outcome(str(target), budget),
                }
                for name, outcome in outcomes.items():
                    if not outcome.success:
                        rejected = CandidateRejected(outcome, storage.keep_rejected(key, target))
                        rejected.check_name = name
                        raise rejected
        except CandidateRejected as rejected:
            yield _rejected_result(context, rejected, rejected.check_name)
            return
        subset = storage.read_parquet(key, columns=["doc_id", "n_tokens", "quality_score", "text"], n_rows=3)
        drops = storage.read_parquet(key, columns=["drop_id"])["drop_id"].unique().sort().to_list()
        context.log.info(
            f"{language}|{quality}: {stats.documents:,} of {stats.candidate_documents:,} documents, {stats.tokens:,} tokens (budget {budget})"
        )
        yield MaterializeResult(
            check_results=[
                _result(outcomes["documents_valid"], check_name="documents_valid", documents=stats.documents),
                _result(
                    outcomes["tokens_within_budget"], check_name="tokens_within_budget", tokens=stats.tokens, budget_tokens=budget or -1
                ),
            ],
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
                "contributing_drops": MetadataValue.json(drops),
                "sample_documents": MetadataValue.md(_sample_md(subset, ["doc_id", "n_tokens", "quality_score", "text"])),
            },
        )

    checks = [*_drop_checks(config), _tokenizer_check()]  # raw_corpus and quality_subsets check inside, before publishing
    return [crawl_drops, raw_corpus, tokenizer, quality_subsets], checks


def _result(
    outcome: Outcome, severity: AssetCheckSeverity = AssetCheckSeverity.ERROR, check_name: str | None = None, **extra
) -> AssetCheckResult:
    return AssetCheckResult(
        check_name=check_name,
        passed=outcome.success,
        severity=severity,
        description="; ".join(outcome.failures)[:1000] or None,
        metadata={"expectations": MetadataValue.json(outcome.details), **extra},
    )


def _drop_checks(config: PipelineConfig) -> list:
    @asset_check(
        asset=AssetKey(CRAWL_DROPS),
        name="documents_valid",
        partitions_def=crawl_drop_partitions,
        description="GX: docs.parquet and quarantine.parquet have the contract's columns; every document has text and a doc_id.",
    )
    def drop_documents_valid(context: AssetCheckExecutionContext, pipeline: PipelineResource) -> AssetCheckResult:
        cfg, storage = pipeline.load(), pipeline.storage()
        prefix = published_prefix(storage, context.partition_key)
        docs = _narrow(storage, f"{prefix}/docs.parquet")
        gxe = expect()
        outcome = run_suite(
            "crawl_drop_docs",
            docs,
            [
                gxe.ExpectTableColumnsToMatchSet(column_set=_narrow_columns([f.name for f in docs_schema(cfg)]), exact_match=True),
                gxe.ExpectColumnValuesToNotBeNull(column="doc_id"),
                gxe.ExpectColumnValuesToBeBetween(column="text_chars", min_value=1),
                gxe.ExpectColumnValuesToNotBeNull(column="language"),
                gxe.ExpectColumnValuesToBeBetween(column="quality_score", min_value=0, max_value=5),
            ],
        )
        q = _narrow(storage, f"{prefix}/quarantine.parquet")
        q_outcome = run_suite(
            "crawl_drop_quarantine",
            q,
            [
                gxe.ExpectTableColumnsToMatchSet(column_set=[f.name for f in QUARANTINE_SCHEMA], exact_match=True),
                gxe.ExpectColumnValuesToNotBeNull(column="reason"),
            ],
        )
        merged = Outcome(
            outcome.success and q_outcome.success,
            outcome.failures + q_outcome.failures,
            {**outcome.details, **{f"quarantine.{k}": v for k, v in q_outcome.details.items()}},
        )
        return _result(merged)

    @asset_check(
        asset=AssetKey(CRAWL_DROPS),
        name="quarantine_rate",
        partitions_def=crawl_drop_partitions,
        blocking=True,
        description="GX: the share of quarantined records is at most limits.max_quarantine_rate and the file is complete "
        "(unless limits.accept_partial_files); otherwise the drop is kept out of raw_corpus.",
    )
    def drop_quarantine_rate(context: AssetCheckExecutionContext, pipeline: PipelineResource) -> AssetCheckResult:
        cfg, storage = pipeline.load(), pipeline.storage()
        manifest = storage.read_json(f"{published_prefix(storage, context.partition_key)}/manifest.json")
        complete = bool(manifest.get("complete", True))
        frame = pl.DataFrame({"quarantine_rate": [float(manifest["quarantine_rate"])], "complete": [complete]})
        expectations = [
            expect().ExpectColumnValuesToBeBetween(column="quarantine_rate", min_value=0, max_value=cfg.limits.max_quarantine_rate)
        ]
        if not cfg.limits.accept_partial_files:  # a damaged file waits for a complete version
            expectations.append(expect().ExpectColumnValuesToBeInSet(column="complete", value_set=[True]))
        outcome = run_suite("crawl_drop_quarantine_rate", frame, expectations)
        return _result(
            outcome,
            quarantine_rate=float(manifest["quarantine_rate"]),
            complete=complete,
            damage=manifest.get("damage") or "",
            max_quarantine_rate=cfg.limits.max_quarantine_rate,
            quarantine_by_reason=MetadataValue.json(manifest["quarantine_by_reason"]),
        )

    return [drop_documents_valid, drop_quarantine_rate]


def _narrow_columns(columns: list[str]) -> list[str]:
    return [("text_chars" if c == "text" else c) for c in columns]


def _narrow(storage: Storage, key: str) -> pl.DataFrame:
    with storage.local_path(key) as path:
        return _narrow_file(str(path))


def _narrow_file(path: str) -> pl.DataFrame:
    """Every column but `text`, which becomes its length: GX needs pandas, texts need not go there."""
    lf = pl.scan_parquet(path)
    cols = lf.collect_schema().names()
    return lf.select([pl.col("text").str.len_chars().alias("text_chars") if c == "text" else pl.col(c) for c in cols]).collect()


def _documents_spec(asset_name: str, parts: MultiPartitionsDefinition) -> AssetCheckSpec:
    return AssetCheckSpec(
        "documents_valid",
        asset=asset_name,
        partitions_def=parts,
        blocking=True,
        description="GX, on the candidate before it is published: contract columns, non-empty text, unique doc_id, language "
        "equals the partition's, quality score inside the bucket.",
    )


def _documents_validator(cfg: PipelineConfig, asset_name: str, language: str, quality: str):
    """The document suite of a partition, as a function of a candidate file."""
    contract = _narrow_columns(_contract_columns(cfg, with_tokens=asset_name == QUALITY_SUBSETS))

    def validate(path: str) -> Outcome:
        return run_suite(f"{asset_name}_documents", _narrow_file(path), document_suite(contract, language, cfg.quality.buckets[quality]))

    return validate


def _rejected_result(context: AssetExecutionContext, rejected: CandidateRejected, check_name: str) -> AssetCheckResult:
    context.log.error(f"{check_name} failed: not published, the previous version stays; candidate kept at {rejected.kept}: {rejected}")
    return _result(rejected.outcome, check_name=check_name, candidate=MetadataValue.path(rejected.kept))


def _contract_columns(config: PipelineConfig, with_tokens: bool) -> list[str]:
    return corpus_columns(config) + (["n_tokens"] if with_tokens else [])


def _budget_spec(parts: MultiPartitionsDefinition) -> AssetCheckSpec:
    return AssetCheckSpec(
        "tokens_within_budget",
        asset=QUALITY_SUBSETS,
        partitions_def=parts,
        blocking=True,
        description="GX, on the candidate before it is published: every document has n_tokens > 0 and the total is within budget.",
    )


def _budget_outcome(path: str, budget: int | None) -> Outcome:
    frame = pl.read_parquet(path, columns=["n_tokens"])
    gxe = expect()
    return run_suite(
        "quality_subsets_budget",
        frame,
        [
            gxe.ExpectColumnValuesToBeBetween(column="n_tokens", min_value=1),
            gxe.ExpectColumnSumToBeBetween(column="n_tokens", min_value=0, max_value=budget),
        ],
    )


def _tokenizer_check():
    @asset_check(
        asset=AssetKey(TOKENIZER),
        name="model_loads",
        blocking=True,
        description="The stored model loads and its hash matches tokenizer.json.",
    )
    def model_loads(pipeline: PipelineResource) -> AssetCheckResult:
        storage = pipeline.storage()
        info = storage.read_json(INFO_KEY)
        counter = TokenCounter.from_storage(storage)
        ok = counter.sha256 == info["sha256"] and counter.vocab_size == info["vocab_size"] and counter.count(["Olá, mundo."])[0] > 0
        return AssetCheckResult(passed=ok, metadata={"sha256": counter.sha256, "vocab_size": counter.vocab_size})

    return model_loads
