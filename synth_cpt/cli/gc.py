"""`synth-cpt gc`: remove old versions of outputs under an explicit policy (nothing is removed by itself)."""

from __future__ import annotations

import argparse
from datetime import timedelta

from rich.table import Table

from synth_cpt.cli.common import say, terminal
from synth_cpt.core.config import load_config


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return str(n)


def cmd_gc(args: argparse.Namespace) -> int:
    """Plan what the policy frees, print it, and (unless --dry-run) remove it. 0: done (or nothing to do),
    1: some removals failed (named), 2: no policy or a bad one."""
    from synth_cpt.core.publish import CANDIDATE_GRACE
    from synth_cpt.core.retention import Policy, collect, plan_gc
    from synth_cpt.core.storage import open_storage

    try:
        policy = Policy(keep_last=args.keep_last, older_than=None if args.older_than is None else timedelta(days=args.older_than))
    except ValueError as exc:
        say(f"synth-cpt gc: {exc}; e.g. `synth-cpt gc --keep-last 3 --dry-run`")
        return 2
    config = load_config(args.config) if args.config else load_config()
    storage = open_storage(config.storage_uri())
    plan = plan_gc(storage, policy, only=tuple(args.asset or ()), force=args.force)
    console = terminal()
    verb = "would free" if args.dry_run else "freed"
    if plan.remove:
        table = Table(title=f"synth-cpt gc: what it {verb} under {storage.uri()}")
        for col in ("output", "version", "files", "bytes", "why"):
            table.add_column(col, overflow="fold", justify="right" if col in ("files", "bytes") else "left")
        for r in plan.remove:
            table.add_row(r.prefix, r.version or r.key.rsplit("/", 1)[1], f"{r.files:,}", _size(r.bytes), r.why)
        console.print(table)
    for folder, by in plan.pinned:
        say(f"kept {folder}: pinned by {len(by)} retained mix version(s), e.g. {by[0]} (remove those first)")
    for folder in plan.superseded_lately:
        say(f"kept {folder}: superseded less than {CANDIDATE_GRACE} ago, a reader may still be on it (the next gc may free it)")
    for key, why in plan.kept_snapshots:
        say(f"kept {key}: {why}")
    for folder, by in plan.held_by_unpinned:
        say(f"kept {folder}: {len(by)} retained mix version(s) made before inputs were pinned may have read it, e.g. {by[0]} "
            "(remove those first, or pass --force)")  # fmt: skip
    for folder, by in plan.forced:
        say(f"--force: {'would remove' if args.dry_run else 'removing'} {folder}, which {len(by)} retained mix version(s) made before "
            f"inputs were pinned may have read, e.g. {by[0]} (they can no longer be traced through it)")  # fmt: skip
    if plan.unpinned_mixes and not plan.held_by_unpinned and not plan.forced:
        say(f"{len(plan.unpinned_mixes)} retained mix version(s) were made before inputs were pinned: what they may have read is kept")
    done = collect(storage, plan) if not args.dry_run else None
    removed = plan.remove if done is None else done.removed
    versions = sum(1 for r in removed if r.version)
    candidates = sum(1 for r in removed if r.candidate)
    memories = sum(1 for r in removed if r.sensor_memory)
    files, size = sum(r.files for r in removed), sum(r.bytes for r in removed)
    say(f"synth-cpt gc: {verb} {versions:,} version(s), {len(removed) - versions - candidates - memories:,} snapshot(s), "
        f"{memories:,} old sensor memory file(s) and {candidates:,} candidate file(s) killed writes left: {files:,} files, "
        f"{_size(size)} ({size:,} bytes)" + (" (dry run: nothing removed)" if args.dry_run else ""))  # fmt: skip
    for line in done.kept if done else []:
        say(f"  kept: {line}")
    for f in done.failures if done else []:
        say(f"  not removed: {f}")
    return 1 if done and done.failures else 0


def register(sub: argparse._SubParsersAction) -> None:
    gc = sub.add_parser(
        "gc", help="remove old versions of outputs under an explicit policy (the current version and pinned inputs are always kept)"
    )
    gc.add_argument("--keep-last", type=int, metavar="N", help="per output, keep the newest N published versions (the current always kept)")
    gc.add_argument("--older-than", type=float, metavar="DAYS", help="remove only versions made more than DAYS days ago")
    gc.add_argument("--asset", action="append", help="only outputs whose folder starts with this, e.g. training_mix_demo (repeat)")
    gc.add_argument("--force", action="store_true", help="also remove inputs that retained mix versions made before pinning may have read")
    gc.add_argument("--dry-run", action="store_true", help="print what would be freed, remove nothing")
    gc.set_defaults(func=cmd_gc)
