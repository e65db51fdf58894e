"""Asset names and where each asset's files live under the storage root: the one place that knows.

Every asset writes below a folder named after it; partitioned corpora write one Parquet file per
`language|quality` partition, and outputs made of several files (a drop, the tokenizer) are published
as versions behind a pointer (see `core.publish`).
"""

from __future__ import annotations

import hashlib
import re

# asset names (= their Dagster asset keys and top-level storage folders)
CRAWL_DROPS = "crawl_drops"
RAW_CORPUS = "raw_corpus"
TOKENIZER = "tokenizer"
QUALITY_SUBSETS = "quality_subsets"
QUALITY_CUTPOINTS = "quality_cutpoints"  # quality.method percentiles only (METHODS §3)
ENTITY_GRAPHS = "entity_graphs"
ENTIGRAPH_CORPUS = "entigraph_corpus"
REWRITES = "rewrites_"  # + style: one asset per prompts/rewrite/<style>.yaml
TRAINING_MIX = "training_mix_"  # + recipe: one asset per mix recipe of the config
EVAL_SCORES = "eval_scores"
GENERATIONS = "generations"  # the generation cache (not an asset: shared by every generating asset)

REJECTED = "_rejected"  # candidates that failed validation, outside every asset's folder
POINTER = "current.json"  # the pointer file of a versioned output, written last
DROP_REGISTRY = f"{CRAWL_DROPS}/_registry"  # where each drop partition's source file is remembered

TOKENIZER_MODEL = "tokenizer.model"
TOKENIZER_INFO = "tokenizer.json"
# a Hugging Face tokenizer keeps its own file names, in a folder of their own: TOKENIZER_INFO took `tokenizer.json` first
TOKENIZER_HF_MODEL = "huggingface/tokenizer.json"
TOKENIZER_HF_CONFIG = "huggingface/tokenizer_config.json"  # published only when one sat beside the configured tokenizer.json
TOKENIZER_MODEL_FILES = {"sentencepiece": TOKENIZER_MODEL, "huggingface": TOKENIZER_HF_MODEL}  # the model file of each kind


def partition_file(asset: str, language: str, quality: str) -> str:
    """The one file of a `language|quality` partition of a corpus-shaped asset."""
    return f"{asset}/{language}/{quality}/part-0.parquet"


def cutpoints_file(language: str) -> str:
    """The cut points of a language's quality scores (`quality_cutpoints`, one file per language)."""
    return f"{QUALITY_CUTPOINTS}/{language}/cutpoints.json"


def rewrite_asset(style: str) -> str:
    return f"{REWRITES}{style}"


def mix_asset(recipe: str) -> str:
    return f"{TRAINING_MIX}{recipe}"


def partition_prefix(asset: str, language: str, quality: str) -> str:
    """The folder of a `language|quality` partition of an asset published as versions (synthesis)."""
    return f"{asset}/{language}/{quality}"


def generation_scope(asset: str, language: str, quality: str) -> str:
    """Where an asset partition's generations are stored in the cache (looked up there first)."""
    return f"{asset}/{language}/{quality}"


# files of a synthesis output version
SYNTHETIC_ROWS = "rows.parquet"
SYNTHETIC_REJECTS = "rejects.parquet"
SUMMARIES = "summaries.parquet"
ENTITY_ROWS = "entities.parquet"


def drop_prefix(drop_id: str) -> str:
    return f"{CRAWL_DROPS}/{drop_id}"


def version_prefix(prefix: str, version: str) -> str:
    return f"{prefix}/v/{version}"


def registry_entry(drop_id: str) -> str:
    return f"{DROP_REGISTRY}/{drop_id}.json"


def rejected_key(key: str, stamp: str) -> str:
    folder, _, name = key.rpartition("/")
    return f"{REJECTED}/{folder}/{stamp}-{name}"


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


# Retention (core/retention.py): what keeps published versions and the inputs of mixes explainable.
PUBLISHED_LOG = "_published"  # <prefix>/_published/<version>.json: this version was published once
INPUTS = "inputs.json"  # a mix version's pins, written before anything it pins is touched
SNAPSHOTS = "pinned"  # <asset>/<language>/<quality>/pinned/<sha256>.parquet: a one-file input as a mix read it
PROMPTS = "prompts"  # <cache root>/prompts/<sha>.yaml: every prompt file that made a row, by its SHA-256


def published_marker(prefix: str, version: str) -> str:
    return f"{prefix}/{PUBLISHED_LOG}/{version}.json"


SENSOR_MEMORY = "_sensor/published"  # <sha256>.bin: the drops the drop sensor knows are published (its cursor names one)


def sensor_memory_key(sha256: str) -> str:
    """Content-addressed (the SHA-256 of the bytes), so a file is never rewritten with other content: a cursor
    naming an older one still finds what it named until `synth-cpt gc` removes it."""
    return f"{SENSOR_MEMORY}/{sha256}.bin"


def snapshot_key(partition_prefix: str, sha256: str) -> str:
    """Where the bytes of a one-file partition (e.g. quality_subsets) are kept once a mix pinned them."""
    return f"{partition_prefix}/{SNAPSHOTS}/{sha256}.parquet"
