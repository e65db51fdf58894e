"""The prompt archive: every prompt file that made a row, kept by its SHA beside the generation cache.

Why: rows and generations name their prompt only by `prompt_sha` (SHA-256 of the file's bytes), and
prompt files get edited; an audit months later needs the exact text. `<cache root>/prompts/<sha>.yaml`
is content-addressed: written once, atomically, never changed, so archiving is idempotent and any run
(or a test) may call it as often as it likes.
"""

from __future__ import annotations

import hashlib
import re

from synth_cpt.core.layout import GENERATIONS, PROMPTS
from synth_cpt.core.storage import Storage

_SHA = re.compile(r"^[0-9a-f]{64}$")


def prompt_key(sha: str, root: str = GENERATIONS) -> str:
    if not _SHA.match(sha):
        raise ValueError(f"{sha!r} is not a prompt SHA (64 lower-case hex digits)")
    return f"{root}/{PROMPTS}/{sha}.yaml"


def archive_prompt(storage: Storage, sha: str, text: str | bytes, root: str = GENERATIONS) -> bool:
    """Keep a prompt file's bytes under its SHA; True when written now, False when already archived.
    The bytes must hash to `sha` (a file edited since it was loaded is refused, never stored under a
    SHA that is not its own)."""
    data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    actual = hashlib.sha256(data).hexdigest()
    if actual != sha:
        raise ValueError(f"prompt text hashes to {actual[:12]}, not {sha[:12]}: the file changed since it was loaded")
    key = prompt_key(sha, root)
    if storage.exists(key):
        return False
    storage.write_bytes(key, data)
    return True


def archived_prompt(storage: Storage, sha: str, root: str = GENERATIONS) -> str | None:
    """The exact text of the prompt file with this SHA, or None if it was never archived."""
    key = prompt_key(sha, root)
    if not storage.exists(key):
        return None
    return storage.read_bytes(key).decode("utf-8")
