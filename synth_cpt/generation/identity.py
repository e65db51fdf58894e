"""What a model folder is, by content: SHA-256 of every file that changes what the model writes.

Two checkpoints of one architecture have the same file names and sizes, so only the bytes tell them
apart; the tokenizer and the chat template change the prompt the weights see, so they count too.
A weight file is read once: its hash is remembered by (path, size, mtime_ns, ctime_ns, inode) in a
small JSON memo, in the model folder when it is writable, else under ~/.cache/synth-cpt/hashes.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

MEMO = ".synth_cpt_hashes.json"
MEMO_VERSION = 1
# Weights (with the index of a sharded checkpoint), then tokenizer, chat template and model config.
WEIGHTS = ("*.safetensors", "*.bin", "*.pt", "*.gguf")
PATTERNS = (
    *WEIGHTS, "*.index.json",
    "tokenizer*", "special_tokens_map.json", "added_tokens.json", "chat_template*", "*.tiktoken", "tekken.json",
    "vocab*", "merges*", "config.json", "generation_config.json", "params.json",
)  # fmt: skip
# Trainer state saved beside the weights of a checkpoint: it never reaches the model, and it is large.
IGNORED = ("training_args.bin", "optimizer.pt", "scheduler.pt")
# A file modified this close to its hashing may change again within one timestamp tick: not memoized.
RACY_NS = 2_000_000_000


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes: the only place this module reads model files."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(8 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def identity_files(folder: Path) -> list[Path]:
    """The files of `folder` (top level, symlinks followed as in a Hugging Face snapshot) that take part in the identity."""
    return sorted(
        p for p in folder.iterdir()
        if p.name not in IGNORED and any(fnmatch.fnmatch(p.name, pat) for pat in PATTERNS) and p.is_file()
    )  # fmt: skip


def memo_paths(folder: Path) -> list[Path]:
    """Where the memo may live: the model folder first, then a per-folder file in the user's cache."""
    key = hashlib.sha256(str(folder).encode()).hexdigest()[:24]
    return [folder / MEMO, Path.home() / ".cache" / "synth-cpt" / "hashes" / f"{key}.json"]


def _stamp(st: os.stat_result) -> dict[str, int]:
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns, "ino": st.st_ino}


def _load_memo(folder: Path) -> dict[str, dict[str, Any]]:
    entries: dict[str, dict[str, Any]] = {}
    for path in reversed(memo_paths(folder)):  # the folder's memo wins
        with contextlib.suppress(OSError, ValueError, TypeError, AttributeError):
            data = json.loads(path.read_text())
            if data.get("version") == MEMO_VERSION:
                entries.update(data["files"])
    return entries


def _write_memo(folder: Path, entries: dict[str, dict[str, Any]]) -> Path | None:
    """Atomically (temp file + os.replace) at the first place that takes it; None if none does (hashed again next time)."""
    text = json.dumps({"version": MEMO_VERSION, "files": entries}, indent=1, sort_keys=True)
    for path in memo_paths(folder):
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(text)
            os.replace(tmp, path)
            return path
        except OSError:
            with contextlib.suppress(OSError):
                tmp.unlink()
    return None


def model_identity(folder: str | Path, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """{"digest": one SHA-256 over all files, "files": {name: sha256}} of a local model folder.

    Unchanged files are not read again: their hashes come from the memo (see the module docstring).
    """
    folder = Path(folder).absolute()
    files = identity_files(folder)
    if not any(fnmatch.fnmatch(p.name, pat) for p in files for pat in WEIGHTS):
        raise ValueError(f"{folder}: no weight files (*.safetensors, *.bin, *.pt, *.gguf) to identify the model by")
    memo = _load_memo(folder)
    entries: dict[str, dict[str, Any]] = {}
    hashes: dict[str, str] = {}
    changed = False
    for path in files:
        key = str(path)
        stamp = _stamp(path.stat())
        known = memo.get(key)
        if known and {k: known.get(k) for k in stamp} == stamp and known.get("sha256"):
            sha = known["sha256"]
        else:
            if log and stamp["size"] > 1 << 30:
                log(f"hashing {path.name} ({stamp['size'] / 1e9:.1f} GB) once to identify the model")
            started = time.time_ns()
            sha = file_sha256(path)
            changed = True
            if stamp != _stamp(path.stat()):
                raise RuntimeError(f"{path} changed while it was being hashed")
            if stamp["mtime_ns"] > started - RACY_NS:
                hashes[path.name] = sha
                continue  # too fresh to trust its timestamps: hashed again on the next call
        entries[key] = {**stamp, "sha256": sha}
        hashes[path.name] = sha
    if changed:
        _write_memo(folder, entries)
    digest = hashlib.sha256(json.dumps(hashes, sort_keys=True).encode()).hexdigest()
    return {"digest": digest, "files": hashes}
