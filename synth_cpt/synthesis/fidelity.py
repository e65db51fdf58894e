"""Post-processing and the fidelity gate of a generated text: each rule rejects with its own reason.

WRAP drops lead-ins ("Here's a paraphrase:") before the first colon or blank line and discards
outputs that still carry such boilerplate; Kimi K2 filters rephrasings that drift from their source.
Here every rule is cheap and deterministic, so a rerun rejects exactly the same rows; the optional
LLM judge (prompts/judge/fidelity.yaml) runs after them, on what they let through.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

# Reason codes, in the order the rules run (the first failing one is the row's reason).
EMPTY = "empty"
NO_ANSWER = "no_answer_marker"
TRUNCATED = "truncated"
REFUSAL = "refusal"
PREAMBLE = "preamble"
SHAPE = "shape"
WRONG_LANGUAGE = "wrong_language"
TOO_SHORT = "too_short"
TOO_LONG = "too_long"
LENGTH_RATIO = "length_ratio"
NUMBERS = "number_coverage"
ENTITIES = "entity_coverage"
COPY = "copy"
JUDGE = "judge_unfaithful"
FAILED = "generation_failed"  # a request of the document failed (error or unusable output): rejected whole
NO_CHUNK_KEPT = "no_chunk_kept"  # on_failed_chunk: drop_chunk dropped every chunk of the document

# Lead-ins of an assistant before the text it was asked for, in the languages we ship. A lead-in is
# stripped only when it has one of three forms, so that text which merely opens with the same word
# ("Certo dia, o rei partiu", "Segue-se a fase dois: a colheita", "Claro está que...") stays whole:
# - an interjection closed by punctuation: "Claro!", "Sure.", "Certo:" (or by a comma before an announcement);
# - an announcement that names what follows and ends with a colon: "Aqui está o texto reescrito:",
#   "Here is a paraphrase of the passage:", "Segue a versão simplificada:";
# - a label: "Texto reescrito:", "Rewritten text:", "Paráfrase:".
_INTERJECTION = r"(?:sure|certainly|of course|okay|ok|absolutely|claro|com certeza|certo|perfeito|[óo]timo|pois n[ãa]o)"
_OUTPUT_NOUN = (
    r"(?:text|texto|version|vers[ãa]o|rewrite|reescrita|paraphrase|par[áa]frase|summary|resumo|passage|passagem|trecho|"
    r"list|lista|questions|perguntas|rewritten|reescrit[oa]|simplified|simplificad[oa]|article|artigo|explanation|explica[çc][ãa]o)"
)
_ANNOUNCE = (
    r"(?:here(?:'s| is| are)|below (?:is|are)|i(?: have|'ve) (?:rewritten|rephrased|simplified|paraphrased)|"
    r"aqui (?:est[áa]|v[ãa]o|segue|seguem)|abaixo (?:est[áa]|segue|seguem)|segue|seguem|eis)\b"
    r"(?=[^\n:]{0,120}?\b" + _OUTPUT_NOUN + r"\b)[^\n:]{0,160}:"
)
_LABEL = (
    r"(?:(?:the |a |an |o |a |uma? )?(?:rewritten|rephrased|paraphrased|simplified|revised|reescrit[oa]|parafrasead[oa]|simplificad[oa]|revisad[oa])\s+)?"
    r"(?:text|texto|version|vers[ãa]o|rewrite|reescrita|paraphrase|par[áa]frase|passage|passagem)"
    r"(?:\s+(?:rewritten|reescrit[oa]|simplificad[oa]|revisad[oa]|parafrasead[oa]))?\s*:"
)
_LEAD = r"^\s*[*#>\s]*"
PREAMBLE_RE = re.compile(
    _LEAD + r"(?:" + _INTERJECTION + r"\s*(?:[!.:]+|,(?=\s*" + _ANNOUNCE + r"))|" + _ANNOUNCE + r"|" + _LABEL + r")[*\s]*", re.I
)
_RESIDUE_RE = re.compile(
    r"\b(?:here(?:'s| is) (?:a|the) (?:paraphrase|rewrite|rewritten)|aqui est[áa] (?:o|a|uma) (?:texto|vers[ãa]o|par[áa]frase|reescrita))",
    re.I,
)
# A refusal is the answer's opening, and names the task it declines ("Não posso reescrever", "I can't
# help"), so text that opens with "Não consigo imaginar..." is not taken for one.
_DECLINED = (
    r"(?:help|assist|do|rewrite|rephrase|comply|fulfil+|provide|complete|create|generate|process|continue|"
    r"ajudar|fazer|reescrever|parafrasear|cumprir|atender|realizar|fornecer|completar|criar|gerar|processar|continuar)"
)
_REFUSAL_RE = re.compile(
    r"^\W*(?:i(?:'m| am) sorry|i apologi[sz]e|as an ai\b|unfortunately,? i\b|"
    r"i (?:can(?:no|')t|cannot|won't|am unable to|'m unable to|am not able to|'m not able to) " + _DECLINED + r"|"
    r"desculpe|sinto muito|lamento|infelizmente,? (?:n[ãa]o|eu)\b|"
    r"(?:eu )?n[ãa]o (?:posso|consigo|sou capaz de|tenho como) " + _DECLINED + r"|como (?:um )?(?:modelo|assistente|ia)\b)",
    re.I,
)
_QA_Q = re.compile(r"^\s*(?:[-*\d.)\s]*)(?:question|pergunta|q|p)\s*\d*\s*[:.)]", re.I | re.M)
_QA_A = re.compile(r"^\s*(?:[-*\d.)\s]*)(?:answer|resposta|a|r)\s*\d*\s*[:.)]", re.I | re.M)
_LIST_ITEM = re.compile(r"^\s*(?:[-*•]|\d+[.)])\s+\S", re.M)
# Numbers by the conventions of their language: a decimal comma and thousands dots ("1.234,5") in the
# languages that write them so, a decimal point and thousands commas ("1,234.5") otherwise. A separator
# that does not fit the language's grouping ends the number ("1.5" in Portuguese is 1 and 5).
DECIMAL_COMMA = frozenset({"pt", "es", "fr", "de", "it", "nl", "ca", "gl", "ro", "pl"})
_NUMBER_COMMA = re.compile(r"(?<!\d)(?:\d{1,3}(?:\.\d{3}(?!\d))+|\d+)(?:,\d+)?")
_NUMBER_POINT = re.compile(r"(?<!\d)(?:\d{1,3}(?:,\d{3}(?!\d))+|\d+)(?:\.\d+)?")
_WORD = re.compile(r"\w+", re.U)
_CAPITALIZED = re.compile(r"(?<![\w.])([A-ZÀ-Þ][\w-]*(?:\s+(?:d[aeo]s?|of|de)?\s*[A-ZÀ-Þ][\w-]*)*)", re.U)


def strip_preamble(text: str, extra: tuple[str, ...] = ()) -> str:
    """The text without an assistant's lead-in ("Here is a paraphrase:", "Aqui está o texto:", "Claro!")."""
    out = text.lstrip()
    for pattern in extra:
        match = re.match(pattern, out, re.I)
        if match:
            out = out[match.end() :].lstrip()
    for _ in range(3):  # "Claro! Aqui está o texto reescrito:" is two lead-ins
        match = PREAMBLE_RE.match(out)
        if not match or match.end() >= len(out.rstrip()):
            break
        out = out[match.end() :].lstrip()
    return out.strip()


def after_marker(text: str, markers: tuple[str, ...]) -> str | None:
    """What follows the last of `markers` (a reasoning step before it is dropped); None if none occurs."""
    best = -1
    for marker in markers:
        at = text.rfind(marker)
        if at >= 0:
            best = max(best, at + len(marker))
    return None if best < 0 else text[best:].strip()


def is_refusal(text: str) -> bool:
    return bool(_REFUSAL_RE.match(text))


def has_preamble_residue(text: str) -> bool:
    return bool(_RESIDUE_RE.search(text[:300]))


def has_shape(text: str, shape: str) -> bool:
    if shape == "qa":
        return bool(_QA_Q.search(text)) and bool(_QA_A.search(text))
    if shape == "list":
        return len(_LIST_ITEM.findall(text)) >= 2
    return True


def numbers(text: str, language: str) -> set[Decimal]:
    """The numbers of a text by value, read by its language's conventions: in Portuguese "3,5" is 3.5 and
    "1.234" is 1234, in English "3.5" is 3.5 and "1,234" is 1234; so "3,50" matches "3,5", and "3,5" never
    matches "35"."""
    if language in DECIMAL_COMMA:
        pattern, thousands, decimal = _NUMBER_COMMA, ".", ","
    else:
        pattern, thousands, decimal = _NUMBER_POINT, ",", "."
    return {Decimal(n.replace(thousands, "").replace(decimal, ".")) for n in pattern.findall(text)}


def _fold(text: str) -> str:
    return "".join(c for c in unicodedata.normalize("NFKD", text.casefold()) if not unicodedata.combining(c))


def named_entities(text: str) -> set[str]:
    """Capitalized words and names not at the start of a sentence (a cheap, language-agnostic proxy)."""
    found: set[str] = set()
    for match in _CAPITALIZED.finditer(text):
        start = match.start()
        before = text[:start].rstrip()
        if not before or before[-1] in ".!?:\n\"'«“":
            continue  # sentence-initial: capitalized for grammar, not because it is a name
        name = match.group(1).strip()
        if len(name) >= 2:
            found.add(_fold(name))
    return found


def coverage(source: set[Any], found: set[Any] | str) -> float | None:
    """Share of `source` items found in the output (None when the source has none): `found` is the
    output's own set (numbers: "15" is not covered by "1500"), or its text, searched for each item
    as whole words after folding ("Ana" is not found in "banana")."""
    if not source:
        return None
    if isinstance(found, set):
        return len(source & found) / len(source)
    haystack = _fold(found)
    hits = sum(1 for item in source if re.search(r"(?<!\w)" + re.escape(item) + r"(?!\w)", haystack))
    return hits / len(source)


def _shingles(text: str, n: int = 4) -> set[tuple[str, ...]]:
    words = _WORD.findall(text.casefold())
    if len(words) < n:
        return {tuple(words)} if words else set()
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def copy_similarity(source: str, output: str) -> float:
    """Jaccard similarity of word 4-grams: 1.0 for a verbatim copy, near 0 for a real rewrite."""
    a, b = _shingles(source), _shingles(output)
    if not a or not b:
        return 0.0
    return len(a & b) / len(a | b)


@dataclass
class Verdict:
    text: str
    reason_code: str | None = None
    reason: str = ""
    figures: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.reason_code is None

    def reject(self, code: str, reason: str) -> Verdict:
        self.reason_code, self.reason = code, reason
        return self


def clean_piece(text: str | None, finish_reason: str | None, output: Any) -> Verdict:
    """One generation's text, post-processed, or its rejection (rules that look at a single answer)."""
    if text is None or not text.strip():
        return Verdict("").reject(EMPTY, "the model returned no text")
    raw = text
    if output.answer_after:
        after = after_marker(raw, output.answer_after)
        if after is None:
            return Verdict(raw).reject(NO_ANSWER, f"none of the markers {list(output.answer_after)} occurs")
        raw = after
    out = strip_preamble(raw, output.preambles) if output.strip_preambles else raw.strip()
    verdict = Verdict(out)
    if finish_reason == "length" and not output.allow_truncated:
        return verdict.reject(TRUNCATED, f"stopped at max_tokens={output.max_tokens} (the style does not keep truncated outputs)")
    if not out:
        return verdict.reject(EMPTY, "nothing left after the lead-in was stripped")
    if is_refusal(out):
        return verdict.reject(REFUSAL, f"the model declined: {out[:80]!r}")
    if output.strip_preambles and has_preamble_residue(out):
        return verdict.reject(PREAMBLE, f"assistant boilerplate remains: {out[:80]!r}")
    return verdict


Identify = Callable[[list[str]], tuple[list[str], list[float]]]


@dataclass(frozen=True)
class GateContext:
    """What the document-level rules need besides the texts: token counts and language id. `count` is the
    target tokenizer's: min_tokens, max_total_tokens and length_ratio measure the output as training data
    (the generator's own limit is the request's max_tokens, which the engine enforces), and the figures
    become the row's n_tokens and source_tokens."""

    count: Callable[[list[str]], list[int]]
    identify: Identify
    min_language_confidence: float = 0.5


def check_document(
    source: str, output_text: str, expected_language: str, output: Any, ctx: GateContext, source_language: str | None = None
) -> Verdict:
    """The document-level rules over a whole (re-joined) output; figures are kept for the row. Numbers are
    read by each text's language (`source_language`, default the output's)."""
    verdict = Verdict(output_text)
    src_tokens, out_tokens = ctx.count([source, output_text])
    ratio = out_tokens / src_tokens if src_tokens else 0.0
    num_cov = coverage(numbers(source, source_language or expected_language), numbers(output_text, expected_language))
    ent_cov = coverage(named_entities(source), output_text)
    similarity = copy_similarity(source, output_text)
    languages, scores = ctx.identify([output_text])
    verdict.figures = {
        "source_tokens": src_tokens, "n_tokens": out_tokens, "length_ratio": round(ratio, 4),
        "number_coverage": None if num_cov is None else round(num_cov, 4),
        "entity_coverage": None if ent_cov is None else round(ent_cov, 4),
        "copy_similarity": round(similarity, 4), "detected_language": languages[0], "language_score": scores[0],
    }  # fmt: skip
    if not has_shape(output_text, output.shape):
        return verdict.reject(SHAPE, f"does not have the required {output.shape} shape")
    if languages[0] != expected_language and scores[0] >= ctx.min_language_confidence:
        return verdict.reject(WRONG_LANGUAGE, f"written in {languages[0]!r} ({scores[0]:.2f}), expected {expected_language!r}")
    if out_tokens < output.min_tokens:
        return verdict.reject(TOO_SHORT, f"{out_tokens} tokens, the style needs at least {output.min_tokens}")
    if output.max_total_tokens is not None and out_tokens > output.max_total_tokens:
        return verdict.reject(TOO_LONG, f"{out_tokens} tokens, the style allows at most {output.max_total_tokens}")
    if output.length_ratio is not None and not output.length_ratio[0] <= ratio <= output.length_ratio[1]:
        low, high = output.length_ratio
        return verdict.reject(LENGTH_RATIO, f"output/source tokens {ratio:.2f} outside [{low}, {high}]")
    if num_cov is not None and num_cov < output.min_number_coverage:
        return verdict.reject(NUMBERS, f"keeps {num_cov:.0%} of the source's numbers, the style needs {output.min_number_coverage:.0%}")
    if ent_cov is not None and ent_cov < output.min_entity_coverage:
        return verdict.reject(ENTITIES, f"keeps {ent_cov:.0%} of the source's names, the style needs {output.min_entity_coverage:.0%}")
    if output.max_copy_similarity is not None and similarity > output.max_copy_similarity:
        return verdict.reject(COPY, f"near-verbatim copy of the source (4-gram similarity {similarity:.2f})")
    return verdict
