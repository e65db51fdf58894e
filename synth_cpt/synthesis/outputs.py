"""Synthesis outputs as published versions: `<asset>/<language>/<quality>/v/<version>/*.parquet` behind
`current.json`. A partition's rows and rejects (or summaries and entities) change together, so they
are one version and one pointer; a reader never pairs the rows of one run with another's rejects.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import polars as pl

from synth_cpt.core import publish
from synth_cpt.core.layout import partition_prefix, version_prefix
from synth_cpt.core.storage import Storage
from synth_cpt.core.validation import Outcome


def publish_tables(
    storage: Storage,
    asset: str,
    language: str,
    quality: str,
    tables: Mapping[str, pl.DataFrame],
    outcomes: Mapping[str, Outcome],
    manifest: dict[str, Any],
) -> dict[str, Any]:
    """Write `tables` (file name -> frame) as a new version; publish it only if every outcome passed,
    else keep it under `_rejected/` and raise `CandidateRejected` naming the first failed check.
    Returns the pointer now in force (another run's newer version wins over this one)."""
    prefix = partition_prefix(asset, language, quality)
    version = publish.new_version()
    folder = version_prefix(prefix, version)
    for name, frame in tables.items():
        storage.write_parquet(f"{folder}/{name}", frame)
    failed = [(check, outcome) for check, outcome in outcomes.items() if not outcome.success]
    if failed:
        kept = publish.reject_version(storage, prefix, version)
        check, outcome = failed[0]
        raise publish.CandidateRejected(outcome, kept, check)
    publish.publish_version(storage, prefix, version, {"asset": asset, "files": sorted(tables), "manifest": manifest})
    pointer = publish.published(storage, prefix)
    assert pointer is not None  # just written (or a newer one)
    return pointer


def published_table(storage: Storage, asset: str, language: str, quality: str, name: str) -> pl.DataFrame | None:
    """A file of the version in force, or None if the partition was never published."""
    pointer = publish.published(storage, partition_prefix(asset, language, quality))
    if pointer is None:
        return None
    return storage.read_parquet(f"{pointer['prefix']}/{name}")
