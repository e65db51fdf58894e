"""The one prompt loader: `prompts/<kind>/<name>.yaml` -> validated prompts -> chat requests.

A prompt file is the whole recipe of one generation step: its templates (per language), sampling,
how documents are chunked for it and what its output must look like. Its SHA-256 (of the file's
bytes) is `prompt_sha`, stored with every generation and every synthetic row, so editing a file
makes new requests and leaves the old rows traceable to the old text. A bad file fails at load
with the file and the field named, never in the middle of a run.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import jinja2
import jinja2.meta
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from synth_cpt.generation.requests import ChatRequest, Sampling
from synth_cpt.generation.structured import unbounded_parts

PROMPTS_ENV = "SYNTH_CPT_PROMPTS"
PROMPTS_PACKAGE = "synth_cpt_prompts"  # the top-level prompts/ folder, shipped as a package (pyproject package-dir)
KINDS = ("rewrite", "entigraph", "judge")
SOURCE = "source"  # output language: the document's own
# The variables each kind's templates may use (anything else is a typo caught at load).
VARIABLES = {
    "rewrite": {"text", "context", "language", "language_name", "title"},
    "entigraph": {"text", "entities", "summary", "language", "language_name", "title"},
    "judge": {"source", "rewrite", "language", "language_name"},
}
LANGUAGE_NAMES = {
    "pt": "Portuguese", "en": "English", "es": "Spanish", "fr": "French", "de": "German", "it": "Italian",
    "nl": "Dutch", "ca": "Catalan", "gl": "Galician", "ro": "Romanian", "pl": "Polish",
}  # fmt: skip
SAMPLING_FIELDS = {"temperature", "top_p", "stop", "speculative", "repetition_penalty", "min_p", "presence_penalty", "frequency_penalty"}
_ENV = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=False, autoescape=False)


class PromptError(ValueError):
    """A prompt file that cannot be used: names the file and the field."""


def prompts_dir() -> Path:
    """$SYNTH_CPT_PROMPTS, else the prompt library installed with synth-cpt. pyproject ships the top-level
    prompts/ folder as the package `synth_cpt_prompts`, so importlib finds it in the tree for an editable
    install and in site-packages for a wheel: the same bytes, so the same prompt_sha. A folder named by
    $SYNTH_CPT_PROMPTS that is not there is an error, never a silent fallback to other prompts."""
    if os.environ.get(PROMPTS_ENV):
        path = Path(os.environ[PROMPTS_ENV])
        if path.is_dir():
            return path
        raise PromptError(f"no prompt library: ${PROMPTS_ENV} names {path}, which is not a folder (unset it to use the installed prompts)")
    spec = importlib.util.find_spec(PROMPTS_PACKAGE)
    if spec is not None and spec.submodule_search_locations is not None:
        # absolute paths only: an editable install adds a placeholder entry that is not a folder
        tried = [Path(p) for p in spec.submodule_search_locations if Path(p).is_absolute()]
    else:
        tried = [Path(p, PROMPTS_PACKAGE) for p in sys.path if p and Path(p).is_dir()]
    for path in tried:
        if path.is_dir():
            return path
    raise PromptError(
        f"no prompt library: ${PROMPTS_ENV} is not set and the package {PROMPTS_PACKAGE} (the prompts installed with synth-cpt) "
        f"was not found; tried {', '.join(map(str, tried)) or 'nothing'}. Reinstall synth-cpt or set ${PROMPTS_ENV}"
    )


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ChunkingSpec(_Strict):
    max_input_tokens: int = Field(300, ge=16, description="tokens of source text per request (the generator's tokenizer)")
    split: Literal["sentences", "lines"] = "sentences"
    autoregressive: bool = Field(False, description="chunk k's request carries the rewritten chunks before it (Kimi K2)")
    context_tokens: int = Field(0, ge=0, description="preceding rewritten text carried when autoregressive (generator's tokens)")
    on_failed_chunk: Literal["reject_document", "drop_chunk"] = Field(
        "reject_document",
        description="a chunk whose request failed or whose output was rejected: reject the whole document, or drop that chunk "
        "and re-join the others (Nemotron-CC segments); a document with no chunk kept is rejected",
    )

    @model_validator(mode="after")
    def _context(self) -> ChunkingSpec:
        if self.autoregressive and self.on_failed_chunk == "drop_chunk":
            raise ValueError(
                "autoregressive chunking cannot drop chunks (on_failed_chunk: drop_chunk): each chunk's request carries the ones before it"
            )
        if self.autoregressive and self.context_tokens == 0:
            raise ValueError("autoregressive chunking needs context_tokens > 0")
        if not self.autoregressive and self.context_tokens:
            raise ValueError("context_tokens is only used with autoregressive: true")
        return self


class OutputSpec(_Strict):
    max_tokens: int = Field(512, ge=1, description="generation limit of one request")
    strip_preambles: bool = True
    preambles: tuple[str, ...] = Field((), description="extra lead-ins to strip (regular expressions, matched at the start)")
    answer_after: tuple[str, ...] = Field(
        (), description="markers before the kept text: everything up to the last one is dropped (a reasoning step)"
    )
    shape: Literal["text", "qa", "list"] = "text"
    keep_source: bool = Field(False, description="the row's text is the source followed by the output (Nemotron diverse QA)")
    min_tokens: int = Field(8, ge=0, description="fewest tokens of an accepted output (whole document)")
    max_total_tokens: int | None = Field(None, ge=1, description="most tokens of an accepted output (whole document)")
    length_ratio: tuple[float, float] | None = Field((0.3, 3.0), description="output/source tokens, inclusive bounds")
    allow_truncated: bool = False
    min_number_coverage: float = Field(0.0, ge=0.0, le=1.0, description="share of the source's numbers the output keeps")
    min_entity_coverage: float = Field(0.0, ge=0.0, le=1.0, description="share of the source's named entities the output keeps")
    max_copy_similarity: float | None = Field(0.9, gt=0.0, le=1.0, description="word 4-gram Jaccard above which it is a copy")

    @field_validator("preambles")
    @classmethod
    def _patterns(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for pattern in v:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"{pattern!r} is not a regular expression: {exc}") from None
        return v

    @model_validator(mode="after")
    def _token_bounds(self) -> OutputSpec:
        if self.max_total_tokens is not None and self.min_tokens > self.max_total_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) is above max_total_tokens ({self.max_total_tokens})")
        return self

    @field_validator("length_ratio")
    @classmethod
    def _ratio(cls, v: tuple[float, float] | None) -> tuple[float, float] | None:
        if v is not None and not 0 <= v[0] <= v[1]:
            raise ValueError("length_ratio must be [low, high] with 0 <= low <= high")
        return v


Template = str | dict[str, str]


class PromptFile(_Strict):
    name: str
    kind: Literal["rewrite", "entigraph", "judge"]
    description: str
    buckets: tuple[str, ...] = Field((), description="quality buckets the style is routed to unless the config says otherwise")
    language: str = Field(SOURCE, description="'source' (the document's language) or a language code")
    system: Template = ""
    user: Template
    sampling: dict[str, Any] = Field(default_factory=dict)
    chunking: ChunkingSpec = Field(default_factory=ChunkingSpec)
    output: OutputSpec = Field(default_factory=OutputSpec)
    json_schema: dict[str, Any] | None = Field(None, alias="schema")
    judge: bool = Field(
        False, description="the LLM judge (prompts/judge/fidelity.yaml) verifies this style even when synthesis.judge is off"
    )

    @model_validator(mode="after")
    def _judge(self) -> PromptFile:
        if self.judge and self.kind != "rewrite":
            raise ValueError("judge: true is only for rewrite styles")
        return self

    @field_validator("sampling")
    @classmethod
    def _sampling(cls, v: dict[str, Any]) -> dict[str, Any]:
        if "max_tokens" in v:
            raise ValueError("set the generation limit in output.max_tokens, not in sampling")
        unknown = sorted(set(v) - SAMPLING_FIELDS)
        if unknown:
            raise ValueError(f"unknown fields {unknown} (sampling takes {sorted(SAMPLING_FIELDS)})")
        Sampling.from_dict(v)
        return v

    @field_validator("json_schema")
    @classmethod
    def _schema(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v is not None and unbounded_parts(v):
            raise ValueError("unbounded, so decoding may never end: " + "; ".join(unbounded_parts(v)[:3]))
        return v


@dataclass(frozen=True)
class Prompt:
    """A loaded prompt file: renders requests for a document in a language."""

    spec: PromptFile
    sha: str
    path: str
    raw: bytes = field(default=b"", repr=False, compare=False)  # the file's bytes as loaded (what `sha` hashes; archived with it)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def kind(self) -> str:
        return self.spec.kind

    @property
    def id(self) -> str:
        return f"{self.kind}/{self.name}"

    def output_language(self, document_language: str) -> str:
        return document_language if self.spec.language == SOURCE else self.spec.language

    def missing_languages(self, languages: list[str]) -> list[str]:
        """Of `languages`, those some template of this prompt cannot render."""
        templates = [t for t in (self.spec.system, self.spec.user) if isinstance(t, dict) and "default" not in t]
        return [lang for lang in languages if any(lang not in t for t in templates)]

    def _template(self, field: str, language: str) -> str:
        value = getattr(self.spec, field)
        if isinstance(value, str):
            return value
        if language in value:
            return value[language]
        if "default" in value:
            return value["default"]
        raise PromptError(f"prompt {self.path}: {field} has no template for language {language!r} (has {sorted(value)})")

    def messages(self, language: str, **variables: Any) -> list[dict[str, str]]:
        out_language = self.output_language(language)
        values = {"language": out_language, "language_name": LANGUAGE_NAMES.get(out_language, out_language), **variables}
        system = _ENV.from_string(self._template("system", language)).render(**values).strip()
        user = _ENV.from_string(self._template("user", language)).render(**values).strip()
        return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]

    def sampling(self, seed: int = 0) -> Sampling:
        return Sampling.from_dict({**self.spec.sampling, "max_tokens": self.spec.output.max_tokens, "seed": seed})

    def request(self, language: str, seed: int = 0, **variables: Any) -> ChatRequest:
        return ChatRequest.chat(
            self.messages(language, **variables), self.sampling(seed), prompt_name=self.id, prompt_sha=self.sha,
            json_schema=self.spec.json_schema,
        )  # fmt: skip


def _check_templates(spec: PromptFile, path: Path) -> None:
    allowed = VARIABLES[spec.kind]
    for part in ("system", "user"):
        value = getattr(spec, part)
        for language, text in value.items() if isinstance(value, dict) else [("", value)]:
            where = f"{part}.{language}" if language else part
            try:
                names = jinja2.meta.find_undeclared_variables(_ENV.parse(text))
            except jinja2.TemplateSyntaxError as exc:
                raise PromptError(f"prompt {path}: {where}: Jinja2 syntax error on line {exc.lineno}: {exc.message}") from None
            unknown = sorted(names - allowed)
            if unknown:
                raise PromptError(f"prompt {path}: {where}: unknown variables {unknown} (a {spec.kind} prompt has {sorted(allowed)})")


def parse_prompt(raw: bytes, path: Path) -> Prompt:
    try:
        data = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise PromptError(f"prompt {path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise PromptError(f"prompt {path}: the top level must be a mapping")
    data.setdefault("kind", path.parent.name)
    try:
        spec = PromptFile.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '(top level)'}: {e['msg']}" for e in exc.errors())
        raise PromptError(f"prompt {path}: {problems}") from None
    if spec.name != path.stem:
        raise PromptError(f"prompt {path}: name: {spec.name!r} must equal the file name {path.stem!r}")
    if spec.kind != path.parent.name:
        raise PromptError(f"prompt {path}: kind: {spec.kind!r} must equal its folder {path.parent.name!r}")
    _check_templates(spec, path)
    return Prompt(spec=spec, sha=hashlib.sha256(raw).hexdigest(), path=str(path), raw=raw)


def load_prompt(kind: str, name: str, root: Path | None = None) -> Prompt:
    path = (root or prompts_dir()) / kind / f"{name}.yaml"
    if not path.is_file():
        available = ", ".join(list_prompts(kind, root)) or "none"
        raise PromptError(f"prompt {kind}/{name} not found at {path} (available: {available})")
    return parse_prompt(path.read_bytes(), path)


def list_prompts(kind: str, root: Path | None = None) -> list[str]:
    return sorted(p.stem for p in ((root or prompts_dir()) / kind).glob("*.yaml"))


JUDGE = "fidelity"


def judge_for(style: Prompt, configured: Prompt | None) -> Prompt | None:
    """The judge that verifies `style`'s rewrites: the configured one (synthesis.judge), else, for a style
    whose file says `judge: true`, prompts/judge/fidelity.yaml of the style's own library; else none."""
    if configured is not None or not style.spec.judge:
        return configured
    return load_prompt("judge", JUDGE, Path(style.path).parents[1])


def load_kind(kind: str, root: Path | None = None) -> dict[str, Prompt]:
    """Every prompt of a kind, validated (the first bad file stops the load)."""
    return {name: load_prompt(kind, name, root) for name in list_prompts(kind, root)}
