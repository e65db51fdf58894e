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
