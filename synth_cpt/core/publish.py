"""Validate, then publish: how an output becomes the version readers see.

A one-file output (a corpus partition) is written to a candidate and renamed into place only after
its suite passed (`Storage.writing`). An output of several files (a drop's documents, quarantine and
manifest; the tokenizer's model and info) is written into a fresh version folder and made visible by
one pointer file written last: a crash at any point leaves the previous version whole. A candidate
that failed validation is kept under `_rejected/` for inspection, out of every reader's way.

Why published versions are never deleted here: people audit what they trained on months and several
re-mixes later, so every version that was ever published stays until the user removes it with an
explicit policy (`synth-cpt gc`, core/retention.py). Each publish leaves a marker
`<prefix>/_published/<version>.json` (written before the pointer, and removed again when the pointer
write fails), so a version folder without one is known never to have been published: a crashed or
superseded candidate, removed once older than CANDIDATE_GRACE. A crash between marker and pointer
errs on the safe side: the marked folder is kept like a published version until a policy removes it. A prefix with a pointer but no marker at all was published before markers existed
(when the current and the one before were kept unmarked): every folder up to the current is read as
published, and the next publish records that (`"recorded": "before markers"`) before it cleans anything.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from synth_cpt.core.layout import POINTER, PUBLISHED_LOG, REJECTED, published_marker, rejected_key, version_prefix
from synth_cpt.core.storage import Storage, utc_stamp

LEGACY = "legacy"  # the version name of an output written before versioned publishing (files beside the pointer)
# a version folder younger than this may be another run's candidate still being written: cleanup leaves it
CANDIDATE_GRACE = timedelta(hours=6)


def version_stamp(version: str) -> datetime | None:
    """When a version was made (its name starts with a `utc_stamp`), or None for a name that does not."""
    try:
        return datetime.strptime(version[:21], "%Y%m%dT%H%M%S%f").replace(tzinfo=timezone.utc)
    except ValueError:
        return None


class CandidateRejected(Exception):
    """A computed output failed its suite: it was not published (readers keep the previous good
    version) and the candidate was kept at `kept` for inspection."""

    def __init__(self, outcome: Any, kept: str, check_name: str = "") -> None:
        super().__init__("; ".join(outcome.failures)[:500])
        self.outcome = outcome
        self.kept = kept
        self.check_name = check_name


def new_version() -> str:
    """A version name that sorts by time and never collides."""
    return f"{utc_stamp()}-{uuid.uuid4().hex[:8]}"


def keep_rejected(storage: Storage, key: str, candidate: str | os.PathLike) -> str:
    """Copy a failed candidate file to `_rejected/<key>/<time>-<name>`; returns its URI."""
    target = rejected_key(key, utc_stamp())
    with storage.writing(target) as tmp:
        shutil.copyfile(candidate, tmp)
    return storage.uri(target)


def reject_version(storage: Storage, prefix: str, version: str) -> str:
    """Move a failed version folder under `_rejected/` (it was never pointed at); returns its URI."""
    source = version_prefix(prefix, version)  # version names are unique: the folder keeps its name
    for key in storage.list(source):
        storage.copy(key, f"{REJECTED}/{key}")
    storage.delete_prefix(source)
    return storage.uri(REJECTED, source)


def published(storage: Storage, prefix: str, legacy_file: str | None = None) -> dict | None:
    """The pointer of the version readers see under `prefix` (`version`, `prefix` of its files and
    what the publisher stored with it), or None. `legacy_file`: an output written before versioned
    publishing, whose files sit directly under `prefix`, is still in force."""
    key = f"{prefix}/{POINTER}"
    if storage.exists(key):
        return storage.read_json(key)
    if legacy_file and storage.exists(f"{prefix}/{legacy_file}"):
        return {"version": LEGACY, "prefix": prefix, "legacy_file": storage.read_json(f"{prefix}/{legacy_file}")}
    return None


def _under(storage: Storage, folder: str, keys: list[str] | None) -> list[str]:
    return storage.list(folder) if keys is None else [k for k in keys if k.startswith(f"{folder}/")]


def version_folders(storage: Storage, prefix: str, keys: list[str] | None = None) -> list[str]:
    """Every version folder under `prefix/v/` (published, retained, candidates), sorted (= by time).
    `keys`: a listing already made (of the root or `prefix`), to list nothing again."""
    base = f"{prefix}/v/"
    return sorted({k[len(base) :].split("/", 1)[0] for k in _under(storage, f"{prefix}/v", keys) if "/" in k[len(base) :]})


def _markers(storage: Storage, prefix: str, keys: list[str] | None = None) -> set[str]:
    return {k.rsplit("/", 1)[1].removesuffix(".json") for k in _under(storage, f"{prefix}/{PUBLISHED_LOG}", keys)}


def published_versions(storage: Storage, prefix: str, keys: list[str] | None = None) -> list[str]:
    """The versions of `prefix` that were published and are still stored (the current one included),
    oldest first: every version a reader, an audit or `synth-cpt lineage` may ask about. With a pointer
    and no marker at all (published before markers existed), every folder up to the current may have
    been published, so each counts as published: never delete what might have been."""
    logged = _markers(storage, prefix, keys)
    current = published(storage, prefix)
    folders = version_folders(storage, prefix, keys)
    if current is not None and current["version"] != LEGACY:
        if not logged:
            return [v for v in folders if v <= current["version"]]
        logged.add(current["version"])
    return [v for v in folders if v in logged]


def _unclaim(storage: Storage, prefix: str, version: str, marker: str, marked_before: bool) -> None:
    """After a failed pointer write, remove the marker just written: the version was never published, and a
    marker would make `published_versions` (and gc) keep and show it as published forever. The marker stays
    when it was there before (the version was published earlier) or when the pointer names the version after
    all (a write that failed on the way back): never unmark what readers may have seen. A marker that cannot
    be removed (or a crash here) errs on the safe side: the folder is kept as if published, until a policy
    removes it."""
    if marked_before:
        return
    with contextlib.suppress(Exception):
        current = published(storage, prefix)
        if current is None or current["version"] != version:
            storage.delete(marker)


def publish_version(storage: Storage, prefix: str, version: str, payload: dict) -> bool:
    """Make `version` the one readers see (a marker, then one atomic write of the pointer; a failed pointer
    write takes the new marker back, so a failed publish claims nothing). Published
    versions are kept (see the module docstring); only never-published folders older than
    CANDIDATE_GRACE go. Returns False when a newer version was published meanwhile (two runs of one
    output): that one stays in force, and the caller must say so."""
    current = published(storage, prefix)
    previous = current["version"] if current and current["version"] != LEGACY else None
    if previous is not None and previous > version:
        return False
    marked = _markers(storage, prefix)
    if previous is not None and not marked:  # published before markers existed: record them first
        for old in published_versions(storage, prefix):
            storage.write_json(published_marker(prefix, old), {"version": old, "recorded": "before markers", "recorded_at": utc_stamp()})
    marker = published_marker(prefix, version)
    storage.write_json(marker, {"version": version, "published_at": utc_stamp()})
    try:
        storage.write_json(f"{prefix}/{POINTER}", {**payload, "version": version, "prefix": version_prefix(prefix, version)})
    except BaseException:
        _unclaim(storage, prefix, version, marker, version in marked)
        raise
    # a folder never published and older than the grace is a crashed or superseded candidate; younger
    # ones (names sort by time) may be another run's candidate still being written and are left alone
    floor = utc_stamp(datetime.now(timezone.utc) - CANDIDATE_GRACE)
    logged = _markers(storage, prefix)
    for old in version_folders(storage, prefix):
        if old < floor and old not in logged and old not in (version, previous):
            storage.delete_prefix(version_prefix(prefix, old))
    return True


@dataclass(frozen=True)
class Published:
    """One published partition of a versioned output."""

    asset: str
    language: str
    quality: str
    prefix: str  # the version folder


def published_partitions(storage: Storage, asset_prefix: str) -> list[Published]:
    """Every `<asset>/<language>/<quality>/current.json` of assets whose name starts with `asset_prefix`."""
    found = []
    for key in storage.list(""):
        parts = key.split("/")
        if len(parts) == 4 and parts[3] == POINTER and parts[0].startswith(asset_prefix):
            pointer = storage.read_json(key)
            found.append(Published(parts[0], parts[1], parts[2], pointer["prefix"]))
    return sorted(found, key=lambda p: (p.asset, p.language, p.quality))
