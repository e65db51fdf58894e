"""How long published versions live: until the user removes them with an explicit policy (`synth-cpt gc`).

Why: a shard someone trained on must stay explainable months and several re-mixes later, so
publishing never deletes a published version (core/publish.py). Removal is a plan made here and
carried out by `collect`: per output, the versions beyond the policy (`keep_last` newest, and/or
older than `older_than`), never the current one, never the one just superseded while a reader may
still be on it (CANDIDATE_GRACE), and never a version a retained mix version pins (its manifest's
`inputs`, also written first as `inputs.json` so a mix still being built pins too). Pinned inputs
wait for the mixes that use them: remove the mix versions, and the next gc frees their inputs.
Snapshots of one-file inputs that a mix pinned by content (`<asset>/<language>/<quality>/pinned/<sha>.parquet`)
go when no retained mix version pins them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

from synth_cpt.core.layout import INPUTS, POINTER, REJECTED, SNAPSHOTS, TRAINING_MIX, published_marker, version_prefix
from synth_cpt.core.publish import (
    CANDIDATE_GRACE,
    LEGACY,
    published,
    published_versions,
    version_folders,
    version_stamp,
)
from synth_cpt.core.storage import Storage


@dataclass(frozen=True)
class Policy:
    keep_last: int | None = None  # per output, the newest N published versions (the current always kept)
    older_than: timedelta | None = None  # only versions made longer ago than this

    def __post_init__(self) -> None:
        if self.keep_last is None and self.older_than is None:
            raise ValueError("name a policy: keep_last and/or older_than (nothing is removed by default)")
        if self.keep_last is not None and self.keep_last < 1:
            raise ValueError("keep_last must be at least 1 (the current version is always kept)")


@dataclass(frozen=True)
class Removal:
    prefix: str  # the output (e.g. rewrites_easy/pt/high) or the snapshot's key
    version: str  # "" for a snapshot
    key: str  # the folder (or file) removed
    files: int
    bytes: int
    why: str


@dataclass
class GcPlan:
    remove: list[Removal] = field(default_factory=list)
    pinned: list[tuple[str, list[str]]] = field(default_factory=list)  # (version folder kept, the mix versions pinning it)
    unpinned_mixes: list[str] = field(default_factory=list)  # mix versions made before pinning: their inputs are unknown
    superseded_lately: list[str] = field(default_factory=list)  # kept: superseded within CANDIDATE_GRACE, a reader may be on it

    @property
    def files(self) -> int:
        return sum(r.files for r in self.remove)

    @property
    def bytes(self) -> int:
        return sum(r.bytes for r in self.remove)


def versioned_outputs(storage: Storage, keys: list[str] | None = None) -> list[str]:
    """Every output published as versions behind a pointer (`<prefix>/current.json`)."""
    keys = storage.list("") if keys is None else keys
    return sorted(k.removesuffix(f"/{POINTER}") for k in keys if k.endswith(f"/{POINTER}") and not k.startswith(f"{REJECTED}/"))


def mix_pins(storage: Storage, mix_prefix: str, version: str) -> list[dict] | None:
    """The inputs a mix version pinned (`prefix` of each), or None for a mix made before pinning."""
    folder = version_prefix(mix_prefix, version)
    for name, pick in ((INPUTS, lambda d: d), ("manifest.json", lambda d: d.get("inputs"))):
        if storage.exists(f"{folder}/{name}"):
            found = pick(storage.read_json(f"{folder}/{name}"))
            if found is not None:
                return list(found)
    return None


def _size(storage: Storage, key: str) -> tuple[int, int]:
    try:
        listing = storage.files(key)
    except FileNotFoundError:
        return 0, 0
    return len(listing.files), sum(f.size for f in listing.files)


def _published_at(storage: Storage, prefix: str, version: str) -> datetime | None:
    """When `version` was published (its marker), else when it was made."""
    marker = published_marker(prefix, version)
    if storage.exists(marker):
        stamp = storage.read_json(marker).get("published_at")
        if stamp and (at := version_stamp(stamp)) is not None:
            return at
    return version_stamp(version)


def plan_gc(storage: Storage, policy: Policy, only: tuple[str, ...] = (), now: datetime | None = None) -> GcPlan:
    """What `policy` frees (nothing is removed here). `only`: outputs whose prefix starts with one of these."""
    now = now or datetime.now(timezone.utc)
    keys = storage.list("")
    grace = now - CANDIDATE_GRACE
    plan = GcPlan()
    doomed: dict[str, tuple[str, str, str]] = {}  # version folder -> (output, version, why)
    retained_mixes: list[tuple[str, str]] = []
    for prefix in versioned_outputs(storage, keys):
        pointer = published(storage, prefix)
        current = pointer["version"] if pointer and pointer["version"] != LEGACY else None
        kept = published_versions(storage, prefix, keys)  # oldest first
        wanted = only == () or prefix.startswith(only)
        newest = set(kept[-policy.keep_last :]) if policy.keep_last else set()
        # the version just superseded stays while a reader may still be on it
        just_before = kept[kept.index(current) - 1] if current in kept and kept.index(current) > 0 else None
        current_at = _published_at(storage, prefix, current) if current else None
        for v in version_folders(storage, prefix, keys):
            made = version_stamp(v)
            if v not in kept:  # never published: a crashed or superseded candidate once past the grace
                if wanted and made is not None and made < grace:
                    doomed[version_prefix(prefix, v)] = (prefix, v, "never published (a crashed or superseded candidate)")
                elif prefix.startswith(TRAINING_MIX):
                    retained_mixes.append((prefix, v))  # a mix being built pins what it reads
                continue
            beyond = policy.keep_last is None or v not in newest
            old = policy.older_than is None or (made is not None and made < now - policy.older_than)
            fresh_predecessor = v == just_before and (current_at is None or current_at > grace)
            if wanted and v != current and beyond and old and fresh_predecessor:
                plan.superseded_lately.append(version_prefix(prefix, v))
            if wanted and v != current and beyond and old and not fresh_predecessor:
                reasons = [
                    f"beyond the newest {policy.keep_last}" if policy.keep_last else "",
                    f"older than {policy.older_than.total_seconds() / 86400:g} days" if policy.older_than else "",
                ]
                doomed[version_prefix(prefix, v)] = (prefix, v, " and ".join(r for r in reasons if r))
            elif prefix.startswith(TRAINING_MIX):
                retained_mixes.append((prefix, v))
    pins: dict[str, list[str]] = {}
    for prefix, v in retained_mixes:
        found = mix_pins(storage, prefix, v)
        if found is None:
            plan.unpinned_mixes.append(version_prefix(prefix, v))
            continue
        for entry in found:
            pins.setdefault(entry["prefix"], []).append(version_prefix(prefix, v))
    for folder, (prefix, v, why) in sorted(doomed.items()):
        if folder in pins:
            plan.pinned.append((folder, sorted(pins[folder])))
            continue
        files, size = _size(storage, folder)
        plan.remove.append(Removal(prefix, v, folder, files, size, why))
    for key in keys:
        parts = key.split("/")
        if len(parts) == 5 and parts[3] == SNAPSHOTS and key.endswith(".parquet") and key not in pins:
            if only == () or key.startswith(only):
                size = next((f.size for f in storage.files(key.rsplit("/", 1)[0], recursive=False).files if f.key == key), 0)
                plan.remove.append(Removal("/".join(parts[:3]), "", key, 1, size, "a snapshot no retained mix version pins"))
    return plan


def collect(storage: Storage, plan: GcPlan) -> list[str]:
    """Remove what `plan` names: each version folder, then its published marker. Returns the failures."""
    failures = []
    for r in plan.remove:
        try:
            if r.version:
                storage.delete_prefix(r.key)
                storage.delete(published_marker(r.prefix, r.version))
            else:
                storage.delete(r.key)
        except Exception as exc:  # one failed removal must not stop the others; each is named
            failures.append(f"{r.key}: {type(exc).__name__}: {exc}")
    return failures
