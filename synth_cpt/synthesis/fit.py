"""Prompts that must fit the engine: the largest request of every routed prompt, against the context.

A request is its rendered template (system + user, every input a one-character placeholder, so a
`{% if context %}` block is counted, and entity names at their longest) + the chunk it carries
(`chunking.max_input_tokens`, and `context_tokens` for an autoregressive style) + what it may write
(`output.max_tokens`); the judge's request holds a source chunk and its rewritten chunk, so it is the
judge's template + the style's input limit + the style's max_tokens + the judge's max_tokens. One
that cannot fit `generation.max_model_len` would fail (or be cut) on every long document, hours into
a run; here it fails when the Definitions load, naming the file and the numbers.

The templates are counted by the generator's tokenizer when it is at hand without loading the model
(`generation.tokenizer`, or the model folder's tokenizer.json), else by UTF-8 bytes, an upper bound
for the byte-level tokenizers of chat models; `CHAT_TEMPLATE_TOKENS` is a margin for what the chat
template adds (role markers, a default system line).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from synth_cpt.core.config import EMBEDDED_MODEL, GenerationConfig
from synth_cpt.synthesis.chunking import Count
from synth_cpt.synthesis.entigraph import MAX_ENTITY_CHARS
from synth_cpt.synthesis.prompts import Prompt, PromptError

CHAT_TEMPLATE_TOKENS = 64


def utf8_bytes(texts: list[str]) -> list[int]:
    """A conservative token count: a byte-level tokenizer never makes more tokens than bytes."""
    return [len(t.encode("utf-8")) for t in texts]


@dataclass(frozen=True)
class RequestSize:
    """The largest request of one prompt (or of the judge of one style), in tokens, part by part."""

    prompt: Prompt
    template: int
    input: int
    context: int
    output: int
    judged: Prompt | None = None  # the style whose rewrites this judge request checks

    @property
    def total(self) -> int:
        return self.template + CHAT_TEMPLATE_TOKENS + self.input + self.context + self.output

    def describe(self, context_size: int) -> str:
        what = f"prompt {self.prompt.path}" + (f" judging {self.judged.path}" if self.judged else "")
        if self.judged:
            c, o = self.judged.spec.chunking.max_input_tokens, self.judged.spec.output.max_tokens
            inputs = f"source chunk {c} + rewritten chunk {o}"
        else:
            inputs = f"input {self.input}"
        parts = f"template {self.template} + chat template {CHAT_TEMPLATE_TOKENS} + {inputs}"
        parts += f" + context {self.context}" if self.context else ""
        return f"{what}: largest request {self.total} tokens ({parts} + output {self.output}) > the engine's context {context_size}"


# Every input present (conditional blocks take their longer branch), each a placeholder: what an input
# holds is bounded by the input limit; entity names are not, so they are counted at their longest (a triple's).
_PLACEHOLDERS = {
    "text": "x", "context": "x", "title": "x", "summary": "x", "source": "x", "rewrite": "x",
    "entities": ["x" * MAX_ENTITY_CHARS] * 3,
}  # fmt: skip


def template_tokens(prompt: Prompt, languages: list[str], count: Count) -> int:
    """The rendered system + user messages with every input a placeholder, in the longest of `languages`."""
    sizes = [sum(count([m["content"] for m in prompt.messages(language, **_PLACEHOLDERS)])) for language in languages]
    return max(sizes, default=0)


def request_size(prompt: Prompt, languages: list[str], count: Count) -> RequestSize:
    c = prompt.spec.chunking
    return RequestSize(
        prompt, template_tokens(prompt, languages, count), c.max_input_tokens, c.context_tokens if c.autoregressive else 0,
        prompt.spec.output.max_tokens,
    )  # fmt: skip


def judge_size(judge: Prompt, style: Prompt, languages: list[str], count: Count) -> RequestSize:
    """The judge's request for one chunk of `style`: the source chunk, its rewrite, and the verdict."""
    return RequestSize(
        judge, template_tokens(judge, languages, count), style.spec.chunking.max_input_tokens + style.spec.output.max_tokens, 0,
        judge.spec.output.max_tokens, judged=style,
    )  # fmt: skip


@lru_cache(maxsize=4)
def _tokenizer_count(path: str, size: int, mtime: float) -> Count:
    from synth_cpt.corpus.tokenizer import TokenCounter  # loaded only when a tokenizer file is at hand

    return TokenCounter(Path(path).read_bytes(), name=path).count


def _model_folder(generation: GenerationConfig, storage_root: str) -> Path | None:
    """The local folder of the configured model, without loading, converting or hashing anything."""
    if generation.backend != "vllm":
        return None
    if generation.model == EMBEDDED_MODEL:
        from synth_cpt.generation.embedded import NAME, models_dir

        folder = models_dir(storage_root) / NAME
    else:
        folder = Path(generation.model).expanduser()
    return folder if folder.is_dir() else None


def template_counter(generation: GenerationConfig, storage_root: str) -> tuple[Count, str]:
    """The generator's tokenizer if a file of it is at hand (cheap: no model load), else UTF-8 bytes; and its name."""
    candidates = [Path(generation.tokenizer).expanduser()] if generation.tokenizer else []
    folder = _model_folder(generation, storage_root)
    if folder is not None:
        candidates.append(folder / "tokenizer.json")
    for path in candidates:
        if path.is_file():
            stat = path.stat()
            return _tokenizer_count(str(path), stat.st_size, stat.st_mtime), str(path)
    return utf8_bytes, "UTF-8 bytes (no generator tokenizer file at hand)"


def engine_context(generation: GenerationConfig, storage_root: str) -> tuple[int | None, str]:
    """The engine's context in tokens and where it comes from: `max_model_len`, else the model folder's
    config.json `max_position_embeddings`; None (with why) when neither is known here."""
    if generation.max_model_len is not None:
        return generation.max_model_len, "generation.max_model_len"
    folder = _model_folder(generation, storage_root)
    config = folder / "config.json" if folder is not None else None
    if config is not None and config.is_file():
        value = json.loads(config.read_text()).get("max_position_embeddings")
        if isinstance(value, int):
            return value, f"max_position_embeddings of {config}"
    return None, f"not checked: generation.max_model_len is null and {generation.model!r} is not a local model folder with a config.json"


def request_sizes(
    styles: list[Prompt], others: list[Prompt], judges: dict[str, Prompt], languages: list[str], count: Count
) -> list[RequestSize]:
    """The largest request of each routed style and other prompt, and of the judge of each judged style."""
    sizes = [request_size(p, languages, count) for p in [*styles, *others]]
    return sizes + [judge_size(judges[s.name], s, languages, count) for s in styles if s.name in judges]


def check_fit(sizes: list[RequestSize], context_size: int | None) -> None:
    """Raises naming every prompt whose largest request exceeds the engine's context."""
    if context_size is None:
        return
    over = [s.describe(context_size) for s in sizes if s.total > context_size]
    if over:
        raise PromptError(
            "requests that cannot fit the engine (lower the prompt's max_input_tokens or max_tokens, or raise generation.max_model_len): "
            + "; ".join(over)
        )
