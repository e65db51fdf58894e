"""Every partitions definition of the project, built from the pipeline config."""

from __future__ import annotations

from dagster import DynamicPartitionsDefinition, MultiPartitionKey, MultiPartitionsDefinition, StaticPartitionsDefinition

from synth_cpt.core.config import PipelineConfig
from synth_cpt.core.layout import CRAWL_DROPS

LANGUAGE = "language"
QUALITY = "quality"

# One partition per drop file; the drop sensor and `synth-cpt ingest` add them.
crawl_drop_partitions = DynamicPartitionsDefinition(name=CRAWL_DROPS)


def corpus_partitions(config: PipelineConfig) -> MultiPartitionsDefinition:
    """`language|quality` keys such as `pt|high` (Dagster orders dimensions by name)."""
    return MultiPartitionsDefinition(
        {
            LANGUAGE: StaticPartitionsDefinition(list(config.languages)),
            QUALITY: StaticPartitionsDefinition(list(config.quality.buckets)),
        }
    )


def language_partitions(config: PipelineConfig) -> StaticPartitionsDefinition:
    """One partition per language (`quality_cutpoints`); raw_corpus maps its `language` dimension onto it."""
    return StaticPartitionsDefinition(list(config.languages))


def corpus_key(language: str, quality: str) -> MultiPartitionKey:
    return MultiPartitionKey({LANGUAGE: language, QUALITY: quality})


def split_corpus_key(key: str | MultiPartitionKey) -> tuple[str, str]:
    """(language, quality) of a `language|quality` key."""
    if isinstance(key, MultiPartitionKey):
        dims = key.keys_by_dimension
        return dims[LANGUAGE], dims[QUALITY]
    language, sep, quality = str(key).partition("|")
    if not sep or not language or not quality:
        raise ValueError(f"partition key {key!r} is not of the form 'language|quality'")
    return language, quality
