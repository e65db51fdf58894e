"""Secrets never leave the process in text: whatever a server, a library or an exception says is passed
through `redact` before it becomes a failure reason, metadata or a log line.

A key reaches synth-cpt only through the environment (`generation.api_key_env`, the AWS variables); a
server that echoes the Authorization header in an error body, or an exception that repeats a URL with
credentials in it, would otherwise carry it into the cache, the run's events and the UI.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping

MASK = "***"
# Always secret, whatever their value looks like; any other variable whose name ends like a credential
# is treated the same once its value is long enough to be one.
KNOWN = ("OPENAI_API_KEY", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")
_SECRET_NAME = re.compile(r"(KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIALS?)$", re.IGNORECASE)
_MIN_LENGTH = 8  # shorter values ("1", "true", a region) are too common to mask in text
# the userinfo of a URL (user:password@, or a token alone: https://TOKEN@host), up to its last @ before the host
_URL_CREDENTIALS = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)[^/\s?#]*@", re.IGNORECASE)


_declared: set[str] = set()


def declare(name: str) -> None:
    """A variable this process reads a key from (e.g. the configured `api_key_env`), whatever it is called."""
    _declared.add(name)


def secret_values(extra_names: Iterable[str] = (), environ: Mapping[str, str] | None = None) -> list[str]:
    """The values of the environment's secret variables, longest first (so a key that contains another is masked whole)."""
    env = os.environ if environ is None else environ
    names = set(KNOWN) | _declared | set(extra_names) | {n for n in env if _SECRET_NAME.search(n)}
    values = {env[n] for n in names if n in env and len(env[n]) >= _MIN_LENGTH}
    return sorted(values, key=len, reverse=True)


def redact(text: str, extra_names: Iterable[str] = (), environ: Mapping[str, str] | None = None) -> str:
    """`text` with every secret value from the environment and every URL password replaced by ***."""
    for value in secret_values(extra_names, environ):
        text = text.replace(value, MASK)
    return _URL_CREDENTIALS.sub(lambda m: f"{m['scheme']}{MASK}@", text)
