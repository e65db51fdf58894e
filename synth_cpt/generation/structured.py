"""Structured (JSON) output: parse, repair what is safely repairable, reject the rest with a reason.

Repairs, in order: a Markdown code fence around the JSON; prose before the first `{` or after the
matching `}`; trailing commas before `}` or `]`. Nothing that changes content (quotes, truncation) is
guessed. The result must then validate against the request's JSON schema.
"""

from __future__ import annotations

import json
import re
from typing import Any

import jsonschema

_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.S)
_TRAILING_COMMA = re.compile(r",\s*([}\]])")


def _outer_object(text: str) -> str | None:
    start = text.find("{")
    if start < 0:
        return None
    depth, in_str, esc = 0, False, False
    for i in range(start, len(text)):
        ch = text[i]
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
        elif ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[start : i + 1]
    return None


def parse_json_output(text: str | None, schema: dict[str, Any] | None) -> tuple[Any, str | None]:
    """(parsed value, None) or (None, reason it was rejected)."""
    if text is None:
        return None, "no output"
    candidates = [text]
    fenced = _FENCE.search(text)
    if fenced:
        candidates.append(fenced.group(1))
    obj_text = _outer_object(text)
    if obj_text:
        candidates.append(obj_text)
        candidates.append(_TRAILING_COMMA.sub(r"\1", obj_text))
    value, error = None, "no JSON object found"
    for cand in candidates:
        try:
            value = json.loads(cand)
            error = None
            break
        except json.JSONDecodeError as exc:
            error = f"invalid JSON: {exc.msg} at char {exc.pos}"
    if error is not None:
        return None, error
    if schema is not None:
        try:
            jsonschema.validate(value, schema)
        except jsonschema.ValidationError as exc:
            path = "/".join(str(p) for p in exc.absolute_path) or "(root)"
            return None, f"schema violation at {path}: {exc.message[:200]}"
    return value, None


def output_rejection(request: Any, gen: Any) -> str | None:
    """Why a finished structured generation cannot be used (None: usable, or not structured).

    A JSON answer cut at `max_tokens` is `truncated`, whatever the parser would say about the half
    it got: the fix is a bound in the schema or a larger budget, not a repair."""
    if not request.json_schema:
        return None
    if gen.finish_reason == "length":
        return f"truncated: stopped at max_tokens={request.sampling.max_tokens} before the JSON was complete"
    _, reason = parse_json_output(gen.text, request.schema)
    return reason


def unbounded_parts(schema: Any, path: str = "$") -> list[str]:
    """Where a JSON schema lets constrained decoding run forever: strings without `maxLength`
    (or `enum`/`const`/`pattern`), arrays without `maxItems`, objects open to extra properties."""
    found: list[str] = []
    if not isinstance(schema, dict):
        return found
    kinds = schema.get("type")
    kinds = kinds if isinstance(kinds, list) else [kinds]
    if "string" in kinds and not any(k in schema for k in ("maxLength", "enum", "const", "pattern")):
        found.append(f"{path} (string) has no maxLength")
    if "array" in kinds:
        if "maxItems" not in schema:
            found.append(f"{path} (array) has no maxItems")
        found += unbounded_parts(schema.get("items"), f"{path}[]")
    if "object" in kinds:
        if schema.get("additionalProperties", True) is not False and schema.get("properties"):
            found.append(f"{path} (object) allows additionalProperties")
        for name, sub in (schema.get("properties") or {}).items():
            found += unbounded_parts(sub, f"{path}.{name}")
    for key in ("anyOf", "oneOf", "allOf"):
        for i, sub in enumerate(schema.get(key) or []):
            found += unbounded_parts(sub, f"{path}.{key}[{i}]")
    return found
