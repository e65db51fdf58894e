"""The one prompt loader: `prompts/<kind>/<name>.yaml` -> rendered chat requests.

A prompt file holds its system message, a Jinja2 template, the language it writes in and its
sampling parameters. Its SHA-256 (of the file's bytes) is `prompt_sha`, stored with every generation.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
import yaml

from synth_cpt.generation.requests import ChatRequest, Sampling

PROMPTS_ENV = "SYNTH_CPT_PROMPTS"
_ENV = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=False, autoescape=False)


def prompts_dir() -> Path:
    """$SYNTH_CPT_PROMPTS, else the repository's prompts/ folder next to the package."""
    if os.environ.get(PROMPTS_ENV):
        return Path(os.environ[PROMPTS_ENV])
    return Path(__file__).resolve().parents[1] / "prompts"


@dataclass(frozen=True)
class Prompt:
    name: str
    kind: str
    language: str
    system: str
    template: str
    sampling: Sampling
    sha: str
    path: str

    def request(self, seed: int = 0, **variables: Any) -> ChatRequest:
        user = _ENV.from_string(self.template).render(**variables)
        messages = ([{"role": "system", "content": self.system}] if self.system else []) + [{"role": "user", "content": user}]
        sampling = dataclasses.replace(self.sampling, seed=seed)
        return ChatRequest.chat(messages, sampling, prompt_name=f"{self.kind}/{self.name}", prompt_sha=self.sha)


def load_prompt(kind: str, name: str, root: Path | None = None) -> Prompt:
    path = (root or prompts_dir()) / kind / f"{name}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"prompt {kind}/{name} not found at {path}")
    raw = path.read_bytes()
    data = yaml.safe_load(raw)
    missing = [k for k in ("name", "template") if k not in data]
    if missing:
        raise ValueError(f"prompt {path}: missing {missing}")
    sampling = Sampling.from_dict(data.get("sampling"), where=f"prompt {path}: sampling")
    return Prompt(
        name=data["name"], kind=data.get("kind", kind), language=data.get("language", "same-as-source"),
        system=(data.get("system") or "").strip(), template=data["template"],
        sampling=sampling, sha=hashlib.sha256(raw).hexdigest(), path=str(path),
    )  # fmt: skip


def list_prompts(kind: str, root: Path | None = None) -> list[str]:
    return sorted(p.stem for p in ((root or prompts_dir()) / kind).glob("*.yaml"))
