"""How long published versions live: until the user removes them with an explicit policy (`synth-cpt gc`).

Why: a shard someone trained on must stay explainable months and several re-mixes later, so
publishing never deletes a published version (core/publish.py). Removal is a plan made here and
carried out by `collect`: per output, the versions beyond the policy (`keep_last` newest, and/or
older than `older_than`), never the current one, never the one just superseded while a reader may
still be on it (CANDIDATE_GRACE), and never a version a retained mix version pins (its manifest's
`inputs`, also written first as `inputs.json` so a mix still being built pins too). Pinned inputs
wait for the mixes that use them: when the same plan removes those mix versions, it frees their
inputs too, and `collect` removes the mix versions first and keeps an input whose mix failed to go.
A mix made before pinning names no inputs: while it is retained, the synthesis versions and subset
snapshots of its `language|quality` (what it may have read) are kept unless forced.
Candidate files a killed write left (`.<name>.<id>.tmp`, hidden from every listing) go once untouched for
CANDIDATE_GRACE. Snapshots of one-file inputs that a mix pinned by content (`<asset>/<language>/<quality>/pinned/<sha>.parquet`)
go when no mix version pins them and they were written longer ago than CANDIDATE_GRACE (a build
rewrites its snapshot after its pins, so one being pinned right now is young); the pins are read
again just before they are removed.
The drop sensor's memory files (`_sensor/published/<sha256>.bin`, content-addressed: a new one whenever the set of
published drops changes) are a cache: all but the newest SENSOR_MEMORIES_KEPT go once older than CANDIDATE_GRACE
(a cursor naming one removed makes the sensor read every pointer once, and write it again).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

from synth_cpt.core.layout import (
    ENTIGRAPH_CORPUS,
    INPUTS,
    POINTER,
    QUALITY_SUBSETS,
    REJECTED,
    REWRITES,
    SENSOR_MEMORY,
    SNAPSHOTS,
    TRAINING_MIX,
    published_marker,
    version_prefix,
)
from synth_cpt.core.publish import (
    CANDIDATE_GRACE,
    LEGACY,
    published,
    published_versions,
    version_folders,
    version_stamp,
)
from synth_cpt.core.storage import FileInfo, Storage

ORPHANED_CANDIDATE = "a candidate file a killed write left (never published, never read)"
MANIFEST = "manifest.json"  # a mix version's manifest (mix/build.py), whose `inputs` are its pins
# what a mix made before pinning may have read from its own language|quality (mix/build.py components)
MIX_READS = (REWRITES, ENTIGRAPH_CORPUS, f"{QUALITY_SUBSETS}/")
SENSOR_MEMORIES_KEPT = 3  # the newest memory files of the drop sensor (the one its cursor names is the newest it wrote)
OLD_SENSOR_MEMORY = "an old memory of the drop sensor (a newer one is in use)"


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
    # mix versions this plan also removes that pin it (or, made before pinning, may have read it): it goes only after they did
    pinned_by: tuple[str, ...] = ()
    candidate: bool = False  # a `.<name>.<id>.tmp` file a killed write left (never renamed into place, never read)
    sensor_memory: bool = False  # an old `_sensor/published/<sha256>.bin` (a cache: losing it costs one full tick)


@dataclass
class GcPlan:
    remove: list[Removal] = field(default_factory=list)
    pinned: list[tuple[str, list[str]]] = field(default_factory=list)  # (version folder kept, the mix versions pinning it)
    unpinned_mixes: list[str] = field(default_factory=list)  # retained mix versions made before pinning: their inputs are unknown
    # kept (or, forced, removed): an input a retained mix version made before pinning may have read, and those mix versions
    held_by_unpinned: list[tuple[str, list[str]]] = field(default_factory=list)
    forced: list[tuple[str, list[str]]] = field(default_factory=list)
    superseded_lately: list[str] = field(default_factory=list)  # kept: superseded within CANDIDATE_GRACE, a reader may be on it
    kept_snapshots: list[tuple[str, str]] = field(default_factory=list)  # (unpinned snapshot kept, why): young or of unknown age

    @property
    def files(self) -> int:
        return sum(r.files for r in self.remove)

    @property
    def bytes(self) -> int:
        return sum(r.bytes for r in self.remove)


@dataclass
class Collected:
    removed: list[Removal] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)  # one line per removal that failed or was skipped for a mix that failed
    kept: list[str] = field(default_factory=list)  # snapshots pinned (or rewritten) since the plan was made: not removed


def versioned_outputs(storage: Storage, keys: list[str] | None = None) -> list[str]:
    """Every output published as versions behind a pointer (`<prefix>/current.json`)."""
    keys = storage.list("") if keys is None else keys
    return sorted(k.removesuffix(f"/{POINTER}") for k in keys if k.endswith(f"/{POINTER}") and not k.startswith(f"{REJECTED}/"))


def mix_pins(storage: Storage, mix_prefix: str, version: str) -> list[dict] | None:
    """The inputs a mix version pinned (`prefix` of each), or None for a mix made before pinning."""
    folder = version_prefix(mix_prefix, version)
    for name, pick in ((INPUTS, lambda d: d), (MANIFEST, lambda d: d.get("inputs"))):
        if storage.exists(f"{folder}/{name}"):
            found = pick(storage.read_json(f"{folder}/{name}"))
            if found is not None:
                return list(found)
    return None


def _partition(key: str) -> tuple[str, str]:
    """The `language|quality` of a key `<asset>/<language>/<quality>/...`."""
    parts = key.split("/")
    return parts[1], parts[2]


def _may_be_read_by_a_mix(key: str) -> bool:
    return key.startswith(MIX_READS)


def _size(storage: Storage, key: str) -> tuple[int, int]:
    try:
        listing = storage.files(key)
    except FileNotFoundError:
        return 0, 0
    return len(listing.files), sum(f.size for f in listing.files)


def _written_at(storage: Storage, key: str) -> tuple[datetime | None, int]:
    """When a file was last written (None where the storage does not say) and its size."""
    try:
        found = [f for f in storage.files(key.rsplit("/", 1)[0], recursive=False).files if f.key == key]
    except FileNotFoundError:
        return None, 0
    if not found:
        return None, 0
    at = datetime.fromtimestamp(found[0].modified_ns / 1e9, timezone.utc) if found[0].modified_ns else None
    return at, found[0].size


def _snapshot_too_young(storage: Storage, key: str, now: datetime) -> str | None:
    """Why an unpinned snapshot must stay for now (None: it may go): a build pins before it (re)writes
    its snapshot, so a snapshot written within CANDIDATE_GRACE may belong to a mix being built."""
    at, _ = _written_at(storage, key)
    if at is None:
        return "its age is unknown here (a mix being built may pin it)"
    if at > now - CANDIDATE_GRACE:
        return f"written less than {CANDIDATE_GRACE} ago (a mix being built may pin it)"
    return None


def _candidate_written_lately(storage: Storage, key: str, now: datetime) -> bool:
    """Whether the candidate `key` changed within CANDIDATE_GRACE (read again just before it is removed: a slow
    writer may have touched it since the plan). A candidate already gone counts as not written lately."""
    found = [f for f in storage.candidates(key.rsplit("/", 1)[0] if "/" in key else "") if f.key == key]
    return bool(found) and datetime.fromtimestamp(found[0].modified_ns / 1e9, timezone.utc) > now - CANDIDATE_GRACE


def _published_at(storage: Storage, prefix: str, version: str) -> datetime | None:
    """When `version` was published (its marker), else when it was made."""
    marker = published_marker(prefix, version)
    if storage.exists(marker):
        stamp = storage.read_json(marker).get("published_at")
        if stamp and (at := version_stamp(stamp)) is not None:
            return at
    return version_stamp(version)


def plan_gc(storage: Storage, policy: Policy, only: tuple[str, ...] = (), now: datetime | None = None, force: bool = False) -> GcPlan:
    """What `policy` frees (nothing is removed here). `only`: outputs whose prefix starts with one of these.
    `force`: also what retained mix versions made before pinning may have read (they lose their explanation)."""
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
    pins: dict[str, list[str]] = {}  # input -> the retained mix versions pinning it
    unpinned: dict[tuple[str, str], list[str]] = {}  # language|quality -> retained mix versions made before pinning
    for prefix, v in retained_mixes:
        found = mix_pins(storage, prefix, v)
        if found is None:
            plan.unpinned_mixes.append(version_prefix(prefix, v))
            unpinned.setdefault(_partition(prefix), []).append(version_prefix(prefix, v))
            continue
        for entry in found:
            pins.setdefault(entry["prefix"], []).append(version_prefix(prefix, v))
    going: dict[str, list[str]] = {}  # input -> the doomed mix versions pinning it
    going_unpinned: dict[tuple[str, str], list[str]] = {}  # language|quality -> doomed mix versions made before pinning
    for folder, (prefix, v, _) in doomed.items():
        if prefix.startswith(TRAINING_MIX):
            found = mix_pins(storage, prefix, v)
            if found is None:
                going_unpinned.setdefault(_partition(prefix), []).append(folder)
            for entry in found or []:
                going.setdefault(entry["prefix"], []).append(folder)

    def removable(key: str) -> tuple[bool, tuple[str, ...]]:
        """Whether `key` may go (else it is recorded as kept), and the doomed mix versions it must wait for."""
        if key in pins:
            plan.pinned.append((key, sorted(pins[key])))
            return False, ()
        wait = set(going.get(key, []))
        if _may_be_read_by_a_mix(key):
            wait |= set(going_unpinned.get(_partition(key), []))
            if held := unpinned.get(_partition(key)):
                (plan.forced if force else plan.held_by_unpinned).append((key, sorted(held)))
                if not force:
                    return False, ()
        return True, tuple(sorted(wait))

    for folder, (prefix, v, why) in sorted(doomed.items()):
        ok, wait = removable(folder)
        if ok:
            files, size = _size(storage, folder)
            plan.remove.append(Removal(prefix, v, folder, files, size, why, wait))
    for key in keys:
        parts = key.split("/")
        if len(parts) == 5 and parts[3] == SNAPSHOTS and key.endswith(".parquet") and (only == () or key.startswith(only)):
            if key in pins:
                continue  # pinned snapshots are the norm: not listed
            if young := _snapshot_too_young(storage, key, now):
                plan.kept_snapshots.append((key, young))
                continue
            ok, wait = removable(key)
            if ok:
                plan.remove.append(
                    Removal("/".join(parts[:3]), "", key, 1, _written_at(storage, key)[1], "a snapshot no retained mix version pins", wait)
                )
    for info in _sensor_memories(storage)[:-SENSOR_MEMORIES_KEPT]:  # oldest first
        written = datetime.fromtimestamp(info.modified_ns / 1e9, timezone.utc) if info.modified_ns else None
        if (only == () or info.key.startswith(only)) and written is not None and written < grace:
            plan.remove.append(Removal(SENSOR_MEMORY, "", info.key, 1, info.size, OLD_SENSOR_MEMORY, sensor_memory=True))
    for info in storage.candidates():
        in_doomed = any(info.key.startswith(f"{folder}/") for folder in doomed)  # goes with its folder
        written = datetime.fromtimestamp(info.modified_ns / 1e9, timezone.utc)
        # a candidate being written keeps changing: one untouched for CANDIDATE_GRACE lost its writer
        if (only == () or info.key.startswith(only)) and not in_doomed and written < grace:
            where = info.key.rsplit("/", 1)[0] if "/" in info.key else ""
            plan.remove.append(Removal(where, "", info.key, 1, info.size, ORPHANED_CANDIDATE, candidate=True))
    return plan


def _sensor_memories(storage: Storage) -> list[FileInfo]:
    """The drop sensor's memory files, oldest written first."""
    try:
        found = storage.files(SENSOR_MEMORY, recursive=False).files
    except FileNotFoundError:
        return []
    return sorted(found, key=lambda f: (f.modified_ns, f.key))


def pinned_now(storage: Storage) -> dict[str, list[str]]:
    """Every input pinned by a mix version folder stored right now (published, retained or being built)."""
    folders = set()
    for key in storage.list(""):
        parts = key.split("/")
        if len(parts) == 6 and parts[0].startswith(TRAINING_MIX) and parts[3] == "v" and parts[5] in (INPUTS, MANIFEST):
            folders.add(("/".join(parts[:3]), parts[4]))
    pins: dict[str, list[str]] = {}
    for mix_prefix, version in sorted(folders):
        try:
            found = mix_pins(storage, mix_prefix, version)
        except FileNotFoundError:  # removed meanwhile
            continue
        for entry in found or []:
            pins.setdefault(entry["prefix"], []).append(version_prefix(mix_prefix, version))
    return pins


def _order(r: Removal) -> tuple[int, str]:
    """Mix versions first (what they pin goes after them), then other versions, then snapshots, then candidates and
    the sensor's old memory files."""
    return (0 if r.version and r.prefix.startswith(TRAINING_MIX) else 1 if r.version else 3 if r.candidate or r.sensor_memory else 2, r.key)


def collect(storage: Storage, plan: GcPlan, now: datetime | None = None) -> Collected:
    """Remove what `plan` names: mix versions first, then the inputs they pinned, then snapshots (whose
    pins and age are read again just before). A version's published marker goes before its folder, so a
    crash leaves a never-published folder that later cleanup finishes, never a half-deleted "published"
    version. An input whose pinning mix version failed to go is kept and named."""
    done = Collected()
    failed_mixes: set[str] = set()
    pins_now: dict[str, list[str]] | None = None
    for r in sorted(plan.remove, key=_order):
        if blocked := sorted(failed_mixes.intersection(r.pinned_by)):
            done.failures.append(f"{r.key}: kept: {blocked[0]}, which pins it (or may have read it), was not removed")
            continue
        try:
            if r.version:
                storage.delete(published_marker(r.prefix, r.version))
                storage.delete_prefix(r.key)
            elif r.sensor_memory:
                at, _ = _written_at(storage, r.key)  # the sensor writes a set again when it comes back to it (or had lost it)
                if at is not None and at > (now or datetime.now(timezone.utc)) - CANDIDATE_GRACE:
                    done.kept.append(f"{r.key}: written again since the plan (the drop sensor's memory in use)")
                    continue
                storage.delete(r.key)
            elif r.candidate:
                if _candidate_written_lately(storage, r.key, now or datetime.now(timezone.utc)):
                    done.kept.append(f"{r.key}: written to since the plan (a write in progress)")
                    continue
                storage.delete(r.key)
            else:
                pins_now = pinned_now(storage) if pins_now is None else pins_now
                if by := pins_now.get(r.key):
                    done.kept.append(f"{r.key}: pinned meanwhile by {by[0]}")
                    continue
                if young := _snapshot_too_young(storage, r.key, now or datetime.now(timezone.utc)):
                    done.kept.append(f"{r.key}: {young}")
                    continue
                storage.delete(r.key)
            done.removed.append(r)
        except Exception as exc:  # one failed removal must not stop the others; each is named
            done.failures.append(f"{r.key}: {type(exc).__name__}: {exc}")
            if _order(r)[0] == 0:
                failed_mixes.add(r.key)
    return done
