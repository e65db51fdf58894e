"""Every partitions definition of the project, built from the pipeline config."""

from __future__ import annotations

import hashlib
import re

from dagster import DynamicPartitionsDefinition, MultiPartitionKey, MultiPartitionsDefinition, StaticPartitionsDefinition

from synth_cpt.config import PipelineConfig

LANGUAGE = "language"
QUALITY = "quality"

# One partition per drop file; the drop sensor and `synth-cpt ingest` add them.
crawl_drop_partitions = DynamicPartitionsDefinition(name="crawl_drops")


def corpus_partitions(config: PipelineConfig) -> MultiPartitionsDefinition:
    """`language|quality` keys such as `pt|high` (Dagster orders dimensions by name)."""
    return MultiPartitionsDefinition(
        {
            LANGUAGE: StaticPartitionsDefinition(list(config.languages)),
            QUALITY: StaticPartitionsDefinition(list(config.quality.buckets)),
        }
    )


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


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def drop_key(relative_path: str) -> str:
    """A safe, stable partition key (and storage folder name) for a drop file's path in its location.

    Sub-folders become `__`; anything outside [A-Za-z0-9._-] becomes `_`. When that changed the name,
    a short hash of the original path keeps two different files from sharing a key.
    """
    cleaned = "__".join(_UNSAFE.sub("_", part) for part in relative_path.strip("/").split("/") if part)
    cleaned = cleaned.strip("._") or "drop"
    if cleaned != relative_path or len(cleaned) > 120:
        digest = hashlib.sha256(relative_path.encode("utf-8")).hexdigest()[:8]
        cleaned = f"{cleaned[:110]}-{digest}"
    return cleaned
