"""Rebuild the sample crawl drops shipped in synth_cpt/sample_corpus from Debian packages (bookworm).

Why: the demo and the end-to-end tests need real, permissively licensed text in two languages, in
every drop format the ingester reads, with a few broken records so quarantine is visible, and text of
both high and low quality so that every language|quality partition fills: documentation lands high,
fortune cookies (short quips, jokes, one-liners) mostly low. One drop carries classifier scores
(`edu`, `stem`) computed here by two small logistic-regression classifiers (see `score_heads`), so the
mapped-score path (`fields.scores`) runs in the demo too.

Usage (needs network access to a Debian mirror, not needed at run time):
    apt-get download gimp-help-pt-br gimp-help-en debian-edu-doc-pt-br debian-edu-doc-en \\
        fortunes-br fortunes debian-reference-pt-br scilab-doc-pt-br manpages-pt-br
    for f in *.deb; do dpkg-deb -x "$f" extracted; done
    PYTHONPATH=. python scripts/build_sample_corpus.py extracted synth_cpt/sample_corpus/drops

Versions used: gimp-help-* 2.10.34-2, debian-edu-doc-* 2.12.23~deb12u1, fortunes-br 20220821,
fortunes 1:1.99.1-7.3, debian-reference-pt-br 2.100, scilab-doc-pt-br 6.1.1+dfsg2-6,
manpages-pt-br 4.18.1-1. The output is deterministic: seeded sampling, sorted inputs, no timestamps
(gzip mtime 0), classifiers trained by a fixed number of full-batch steps from zero.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import random
import re
import sys
import zipfile
import zlib
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zstandard

BLOCK_TAGS = {"p", "div", "h1", "h2", "h3", "h4", "h5", "li", "tr", "br", "pre", "dt", "dd", "table", "title"}
SKIP_CLASSES = {"navheader", "navfooter", "toc", "list-of-figures", "list-of-tables", "list-of-examples"}


class _TextExtractor(HTMLParser):
    """Visible text of a DocBook page, navigation stripped, blocks on their own lines."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.title = ""
        self._in_title = False
        self._skip_depth = 0
        self._div_stack: list[bool] = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag == "title":
            self._in_title = True
        if tag == "div":
            classes = set((dict(attrs).get("class") or "").split())
            skip = bool(classes & SKIP_CLASSES)
            self._div_stack.append(skip)
            if skip:
                self._skip_depth += 1
        if tag in ("script", "style", "head"):
            self._skip_depth += 1
        if tag in BLOCK_TAGS:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag == "title":
            self._in_title = False
        if tag == "div" and self._div_stack and self._div_stack.pop():
            self._skip_depth -= 1
        if tag in ("script", "style", "head"):
            self._skip_depth -= 1
        if tag in BLOCK_TAGS:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if self._in_title:
            self.title += data
        elif self._skip_depth == 0:
            self.parts.append(data)

    def text(self) -> str:
        raw = "".join(self.parts)
        lines = [re.sub(r"[ \t\r\f\v]+", " ", line).strip() for line in raw.split("\n")]
        out: list[str] = []
        for line in lines:
            if line or (out and out[-1]):
                out.append(line)
        return "\n".join(out).strip()


def html_text(html: str) -> tuple[str, str]:
    parser = _TextExtractor()
    parser.feed(html)
    return parser.title.strip(), parser.text()


def gimp_records(root: Path, lang_dir: str, host_lang: str, limit: int, seed: int) -> list[dict]:
    pages = sorted((root / "usr/share/gimp/2.0/help" / lang_dir).glob("*.html"))
    random.Random(seed).shuffle(pages)
    records = []
    for page in pages:
        title, text = html_text(page.read_text(encoding="utf-8"))
        if len(text) < 400 or len(text) > 6000:
            continue
        url = f"https://docs.gimp.org/2.10/{host_lang}/{page.name}"
        records.append({"id": hashlib.sha1(url.encode()).hexdigest()[:16], "url": url, "title": title, "text": text})
        if len(records) >= limit:
            break
    return records


def edu_records(root: Path, pkg: str, language: str, limit: int) -> list[dict]:
    html = (root / f"usr/share/doc/{pkg}/debian-edu-bookworm-manual.html").read_text(encoding="utf-8")
    sections = re.split(r'(?=<div class="section">)', html)
    records = []
    for i, section in enumerate(sections[1:]):
        m = re.search(r'<h[2-4] class="title"[^>]*>(?:<a [^>]*></a>)?(.*?)</h[2-4]>', section, re.S)
        title = re.sub(r"<[^>]+>", "", m.group(1)).strip() if m else f"section {i}"
        _, text = html_text(section)
        if len(text) < 400:
            continue
        text = text[:8000]
        url = f"https://wiki.debian.org/DebianEdu/Documentation/Bookworm#s{i}"
        records.append({"id": f"edu-{language}-{i}", "url": url, "title": title, "text": text, "language": language})
        if len(records) >= limit:
            break
    return records


def broken_lines() -> list[bytes]:
    """One record per quarantine reason the ingester knows, so the demo shows each one."""
    return [
        b'{"id": "broken-json", "text": "unterminated',  # invalid JSON
        b'{"id": "broken-utf8", "text": "caf\xe9 sem UTF-8"}',  # invalid UTF-8 (latin-1 byte)
        b'["an", "array", "not", "an", "object"]',  # not an object
        b'{"id": "no-text", "url": "https://example.org/no-text"}',  # missing text
        b'{"id": "null-text", "text": null}',  # null text
        b'{"id": "empty-text", "text": "   \\n\\t  "}',  # empty after normalization
        b'{"id": "number-text", "text": 42}',  # not a string
        b'{"id": "no-language", "text": "a1 b2 c3 d4"}',  # language not detected
    ]


# ---------------------------------------------------------------------------------------------------
# Varied-quality drops: fortune cookies (mostly low) and one drop with classifier scores (both buckets)
# ---------------------------------------------------------------------------------------------------

FORTUNES = "usr/share/games/fortunes"
# English cookie files of the `fortunes` package used for the sample; the files on politics, drugs,
# ethnic and men-women jokes, ASCII art and the multilingual `translate-me` are left out on purpose.
EN_FORTUNE_FILES = (
    "art", "computers", "cookie", "debian", "definitions", "education", "food", "fortunes", "goedel",
    "humorists", "kids", "knghtbrd", "law", "linux", "linuxcookie", "literature", "love", "magic",
    "medicine", "miscellaneous", "news", "paradoxum", "people", "pets", "platitudes", "riddles",
    "science", "songs-poems", "sports", "startrek", "tao", "wisdom", "work", "zippy",
)  # fmt: skip
SCORE_SEED = 11  # sampling of the scored drop
SCORED_COUNTS = {"debian-reference": 40, "scilab": 40, "manpages": 25, "fortunes-br": 150}
L2, STEPS, STEP_SIZE, HASH_DIM = 1e-3, 2000, 2.0, 1 << 18


def fortune_cookies(root: Path, name: str) -> list[tuple[int, str]]:
    """(position in the file, text) of every cookie of a fortune file; cookies are separated by '%' lines."""
    raw = (root / FORTUNES / name).read_text(encoding="utf-8")
    cookies = [c.strip("\n") for c in re.split(r"(?m)^%\n", raw)]
    return [(i, c) for i, c in enumerate(cookies) if c.strip()]


def fortune_record(package: str, name: str, i: int, text: str) -> dict:
    return {"id": f"{package}/{name}/{i}", "url": f"file:///{FORTUNES}/{name}#cookie-{i}", "text": text}


def held_out(text: str) -> bool:
    """Half of every scored source trains the classifiers, the other half may be shipped: never both."""
    return hashlib.sha256(text.encode("utf-8")).digest()[0] % 2 == 1


def unique(items: list, key=lambda x: x) -> list:
    seen: set = set()
    return [x for x in items if not (key(x) in seen or seen.add(key(x)))]


class _ProseExtractor(_TextExtractor):
    """Like _TextExtractor, but source line wrapping inside a paragraph is not a line break (outside <pre>)."""

    def __init__(self) -> None:
        super().__init__()
        self._pre = 0

    def handle_starttag(self, tag: str, attrs: list) -> None:
        self._pre += tag == "pre"
        if tag in ("td", "th"):
            self.parts.append(" ")  # table cells of one row stay apart
        super().handle_starttag(tag, attrs)

    def handle_endtag(self, tag: str) -> None:
        self._pre -= tag == "pre" and self._pre > 0
        super().handle_endtag(tag)

    def handle_data(self, data: str) -> None:
        super().handle_data(data if self._pre else data.replace("\n", " "))


def prose_text(html: str) -> tuple[str, str]:
    parser = _ProseExtractor()
    parser.feed(html)
    return parser.title.strip(), parser.text()


def debian_reference_docs(root: Path) -> list[dict]:
    """Sections of the Portuguese Debian Reference (one section's own text, without its subsections)."""
    docs = []
    for chapter in sorted((root / "usr/share/debian-reference").glob("ch*.pt-br.html")):
        html = chapter.read_text(encoding="utf-8")
        for section in re.split(r'(?=<div class="section">)', html)[1:]:
            m = re.search(r'<h[2-5] class="title"><a id="([^"]+)"/>(.*?)</h[2-5]>', section, re.S)
            if not m:
                continue
            _, text = prose_text(section)
            if len(text) < 300:
                continue
            path = f"usr/share/debian-reference/{chapter.name}"
            title = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", "", m.group(2))).strip()
            anchor = m.group(1)
            docs.append(
                {
                    "id": f"debian-reference-pt-br/{chapter.stem}#{anchor}",
                    "url": f"file:///{path}#{anchor}",
                    "title": title,
                    "text": text[:8000],
                }
            )
    return docs


def scilab_docs(root: Path) -> list[dict]:
    """Reference pages of Scilab's help in Portuguese; pages left untranslated (most of them) are skipped."""
    from synth_cpt.text.langid import identify

    jar_path = "usr/share/scilab/modules/helptools/jar/scilab_pt_BR_help.jar"
    pages = []
    with zipfile.ZipFile(root / jar_path) as jar:
        for name in sorted(jar.namelist()):
            page = name.rsplit("/", 1)[-1]
            if not page.endswith(".html") or page.startswith("section_") or page == "index.html":
                continue
            html = jar.read(name).decode("utf-8")
            html = re.sub(r'<div class="manualnavbar">.*?</div>', "", html, flags=re.S)  # previous / up / next
            html = re.sub(r'<span class="path".*?</span>', "", html, flags=re.S)  # breadcrumbs
            title, text = prose_text(html)
            if len(text) >= 300:
                url = f"jar:file:///{jar_path}!/{name}"
                pages.append({"id": f"scilab-doc-pt-br/{page[:-5]}", "url": url, "title": title, "text": text[:8000]})
    codes, probs = identify([p["text"] for p in pages])
    return [p for p, c, pr in zip(pages, codes, probs, strict=True) if c == "pt" and pr >= 0.8]


_ROFF_CHARS = {
    "aq": "'", "dq": '"', "lq": "“", "rq": "”", "oq": "‘", "cq": "’", "bu": "•", "em": "—", "en": "–", "hy": "-",
    "ti": "~", "ha": "^", "co": "©", "rg": "®", "tm": "™", "de": "°", "mu": "×", "di": "÷", "<=": "≤", ">=": "≥",
    "rs": "\\", "ga": "`", "aa": "´", "pl": "+", "mi": "−", "eq": "=", "lh": "☜", "rh": "☞", "dg": "†", "->": "→",
}  # fmt: skip


_ROFF_STRINGS = {"(lq": "“", "(rq": "”", "R": "®", "(Tm": "™"}


def roff_text(source: str) -> str:
    """The text of a man page's roff source: requests dropped, font changes and escapes resolved."""
    out: list[str] = []
    for line in source.split("\n"):
        if line.startswith(('.\\"', "'\\\"")) or line.strip() in (".", "'"):
            continue
        if line.startswith((".", "'")):
            m = re.match(r"[.']\s*(\w+)\s*(.*)", line)
            if not m:
                continue
            macro, arg = m.groups()
            args = [a or b for a, b in re.findall(r'"([^"]*)"|(\S+)', arg)]
            if macro in ("SH", "SS"):
                out += ["", " ".join(args), ""]
            elif macro in ("PP", "P", "LP", "TP", "IP", "HP", "sp", "br", "RS", "RE", "EX", "EE", "nf", "fi"):
                out.append("")
                if macro == "IP" and args:
                    out.append(args[0])
            elif macro in ("B", "I", "SM", "SB"):
                out.append(" ".join(args))
            elif macro in ("BR", "BI", "IB", "IR", "RB", "RI"):
                out.append("".join(args))
            continue  # any other request (.TH, .de, .if, .ds, ...) carries no running text
        out.append(line)
    text = "\n".join(out)
    text = re.sub(r"\\\*(?:\[[^\]]*\]|\(..|.)", lambda m: _ROFF_STRINGS.get(m.group(0)[2:], ""), text)
    text = re.sub(r"\\\[([^\]]*)\]", lambda m: _ROFF_CHARS.get(m.group(1), ""), text)
    text = re.sub(r"\\\((..)", lambda m: _ROFF_CHARS.get(m.group(1), ""), text)
    text = re.sub(r"\\f(?:\[[^\]]*\]|\(..|.)|\\s[+-]?\d|\\[&/,:%|^c]", "", text)  # fonts, sizes, zero-width
    text = text.replace("\\-", "-").replace("\\e", "\\").replace("\\ ", " ").replace("\\0", " ").replace("\\~", " ")
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def manpage_docs(root: Path) -> list[dict]:
    """Brazilian Portuguese man pages (never used to train the classifiers: they are scored unseen)."""
    docs = []
    for page in sorted((root / "usr/share/man/pt_BR").glob("man*/*.gz")):
        source = gzip.decompress(page.read_bytes()).decode("utf-8")
        if source.lstrip().startswith(".so"):
            continue  # an alias of another page
        text = roff_text(source)
        if len(text) >= 300:
            name = page.name.removesuffix(".gz")
            docs.append({"id": f"manpages-pt-br/{name}", "url": f"file:///{page.relative_to(root)}", "title": name, "text": text[:8000]})
    return unique(docs, key=lambda d: d["text"])  # iso_8859-1.7 and latin1.7 are the same page


def fortune_br_docs(root: Path) -> list[dict]:
    docs = [fortune_record("fortunes-br", "brasil", i, text) for i, text in fortune_cookies(root, "brasil")]
    return unique(docs, key=lambda d: d["text"])


# -- the classifiers -------------------------------------------------------------------------------


def features(text: str) -> tuple[np.ndarray, np.ndarray]:
    """Hashed bag of lower-cased word unigrams and bigrams (CRC-32 mod 2^18), log(1+count), L2-normalized."""
    words = re.findall(r"\w+", text.lower())
    grams = Counter(zlib.crc32(g.encode("utf-8")) % HASH_DIM for g in words + [f"{a} {b}" for a, b in zip(words, words[1:], strict=False)])
    idx = np.array(sorted(grams), dtype=np.int64)
    val = np.log1p(np.array([grams[i] for i in idx], dtype=np.float64))
    norm = float(np.sqrt(val @ val))
    return idx, val / norm if norm else val


class _Rows:
    """A sparse matrix as (row, column, value) triplets: enough for X @ w and X.T @ r with bincount."""

    def __init__(self, texts: list[str]) -> None:
        feats = [features(t) for t in texts]
        self.n = len(feats)
        self.col = np.concatenate([f[0] for f in feats]) if feats else np.zeros(0, np.int64)
        self.val = np.concatenate([f[1] for f in feats]) if feats else np.zeros(0)
        self.row = np.repeat(np.arange(self.n), [len(f[0]) for f in feats])

    def dot(self, w: np.ndarray) -> np.ndarray:
        return np.bincount(self.row, weights=self.val * w[self.col], minlength=self.n)

    def tdot(self, r: np.ndarray) -> np.ndarray:
        return np.bincount(self.col, weights=self.val * r[self.row], minlength=HASH_DIM)


def train_logistic(positives: list[str], negatives: list[str]) -> tuple[tuple[np.ndarray, float], float]:
    """L2-regularized logistic regression, the two classes weighted to equal total weight (prior 0.5),
    fitted by STEPS full-batch gradient steps from zero: deterministic, and converged (the final
    gradient norm is returned and reported; doubling STEPS moves no shipped score by more than 0.01)."""
    X = _Rows(positives + negatives)
    y = np.array([1.0] * len(positives) + [0.0] * len(negatives))
    weight = np.where(y == 1, 0.5 / len(positives), 0.5 / len(negatives))
    w, b = np.zeros(HASH_DIM), 0.0
    for _ in range(STEPS):
        r = (1.0 / (1.0 + np.exp(-(X.dot(w) + b))) - y) * weight
        w -= STEP_SIZE * (X.tdot(r) + L2 * w)
        b -= STEP_SIZE * float(r.sum())
    r = (1.0 / (1.0 + np.exp(-(X.dot(w) + b))) - y) * weight
    grad = np.concatenate([X.tdot(r) + L2 * w, [r.sum()]])
    return (w, b), float(np.sqrt(grad @ grad))


def probability(model: tuple[np.ndarray, float], texts: list[str]) -> np.ndarray:
    w, b = model
    return 1.0 / (1.0 + np.exp(-(_Rows(texts).dot(w) + b)))


def score_heads(sources: dict[str, list[dict]]) -> tuple[dict[str, tuple], dict[str, str]]:
    """Train the `edu` and `stem` heads on the training half of each source. Score = 5 x P(positive).

    edu:  Debian Reference sections (a manual that teaches) vs fortune cookies.
    stem: Scilab help pages (numerical mathematics) vs fortune cookies and Debian Reference sections.
    Returns the models and a held-out accuracy line per head."""
    train = {k: [d["text"] for d in v if not held_out(d["text"])] for k, v in sources.items() if k != "manpages"}
    test = {k: [d["text"] for d in v if held_out(d["text"])] for k, v in sources.items() if k != "manpages"}
    heads = {
        "edu": (["debian-reference"], ["fortunes-br"]),
        "stem": (["scilab"], ["fortunes-br", "debian-reference"]),
    }
    models, report = {}, {}
    for head, (pos, neg) in heads.items():
        models[head], grad_norm = train_logistic(sum((train[k] for k in pos), []), sum((train[k] for k in neg), []))
        acc = []
        for k in pos + neg:
            p = probability(models[head], test[k])
            hits = (p > 0.5) if k in pos else (p <= 0.5)
            acc.append(f"{k} {hits.mean():.1%} of {len(p)}")
        n_train = sum(len(train[k]) for k in pos + neg)
        report[head] = f"{head}: trained on {n_train} texts (gradient norm {grad_norm:.1e}); held-out accuracy: " + ", ".join(acc)
    return models, report


def scored_records(root: Path) -> tuple[list[dict], dict[str, str], list[str]]:
    """The scored drop: held-out documents of each source (and unseen man pages), with edu and stem."""
    from synth_cpt.text.langid import identify

    sources = {
        "debian-reference": debian_reference_docs(root),
        "scilab": scilab_docs(root),
        "manpages": manpage_docs(root),
        "fortunes-br": fortune_br_docs(root),
    }
    models, report = score_heads(sources)
    rng = random.Random(SCORE_SEED)
    chosen, shipped_fortunes = [], []
    for key, count in SCORED_COUNTS.items():
        pool = [d for d in sources[key] if key == "manpages" or held_out(d["text"])]
        codes, probs = identify([d["text"] for d in pool])
        pool = [d for d, c, p in zip(pool, codes, probs, strict=True) if c == "pt" and p >= 0.4]  # the drop says language "pt"
        rng.shuffle(pool)
        chosen += pool[:count]
        if key == "fortunes-br":
            shipped_fortunes = [d["text"] for d in pool[:count]]
    texts = [d["text"] for d in chosen]
    scores = {head: probability(model, texts) for head, model in models.items()}
    records = []
    for k, d in enumerate(chosen):
        rec = {**d, "title": d.get("title"), "language": "pt"}
        rec.update({head: round(5.0 * float(scores[head][k]), 2) for head in models})
        records.append(rec)
    records.sort(key=lambda r: hashlib.sha256(f"{SCORE_SEED}:{r['id']}".encode()).hexdigest())  # sources interleaved
    return records, report, shipped_fortunes


def pt_fortune_records(root: Path, exclude: list[str], limit: int, seed: int) -> list[dict]:
    """Held-out fortunes-br cookies that are not in the scored drop, in file order."""
    excluded = set(exclude)
    pool = [d for d in fortune_br_docs(root) if held_out(d["text"]) and d["text"] not in excluded]
    random.Random(seed).shuffle(pool)
    return sorted(pool[:limit], key=lambda d: int(d["id"].rsplit("/", 1)[1]))


def en_fortune_records(root: Path, limit: int, seed: int) -> list[dict]:
    pool = [fortune_record("fortunes", name, i, text) for name in EN_FORTUNE_FILES for i, text in fortune_cookies(root, name)]
    pool = unique(pool, key=lambda d: d["text"])
    random.Random(seed).shuffle(pool)
    order = {name: n for n, name in enumerate(EN_FORTUNE_FILES)}
    return sorted(pool[:limit], key=lambda d: (order[d["id"].split("/")[1]], int(d["id"].rsplit("/", 1)[1])))


def write_jsonl_gz(path: Path, records: list[dict]) -> None:
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=9, mtime=0) as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False).encode() + b"\n")


def varied_quality_drops(root: Path, out: Path) -> None:
    scored, report, shipped = scored_records(root)
    for line in report.values():
        print(line)
    table = pa.Table.from_pylist(scored, schema=pa.schema([
        ("id", pa.string()), ("url", pa.string()), ("title", pa.string()), ("text", pa.string()),
        ("language", pa.string()), ("edu", pa.float64()), ("stem", pa.float64()),
    ]))  # fmt: skip
    pq.write_table(table, out / "2026-11-04_pt_scored.parquet", compression="zstd")

    write_jsonl_gz(out / "2026-11-03_pt_fortunes-br.jsonl.gz", pt_fortune_records(root, shipped, limit=400, seed=3))

    payload = b"".join(json.dumps(r, ensure_ascii=False).encode() + b"\n" for r in en_fortune_records(root, limit=500, seed=4))
    (out / "2026-11-03_en_fortunes.jsonl.zst").write_bytes(zstandard.ZstdCompressor(level=19).compress(payload))


def main(src: str, dst: str) -> None:
    root, out = Path(src), Path(dst)
    out.mkdir(parents=True, exist_ok=True)

    pt_gimp = gimp_records(root, "pt_BR", "pt_BR", limit=300, seed=1)
    with open(out / "2026-11-01_pt_gimp-help.jsonl.gz", "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=9, mtime=0) as f:
        for rec in pt_gimp:
            f.write(json.dumps(rec, ensure_ascii=False).encode() + b"\n")

    pt_edu = edu_records(root, "debian-edu-doc-pt-br", "pt", limit=60)
    lines = [json.dumps(r, ensure_ascii=False).encode() for r in pt_edu]
    for k, bad in enumerate(broken_lines()):
        lines.insert(3 + 5 * k, bad)
    lines.insert(10, json.dumps(pt_edu[0], ensure_ascii=False).encode())  # an exact duplicate inside the drop
    (out / "2026-11-02_pt_debian-edu.jsonl").write_bytes(b"\n".join(lines) + b"\n")

    en_gimp = gimp_records(root, "en", "en", limit=300, seed=2)
    payload = b"".join(json.dumps(r, ensure_ascii=False).encode() + b"\n" for r in en_gimp)
    (out / "2026-11-01_en_gimp-help.jsonl.zst").write_bytes(zstandard.ZstdCompressor(level=19).compress(payload))

    en_edu = edu_records(root, "debian-edu-doc-en", "en", limit=60)
    table = pa.Table.from_pylist(en_edu)
    pq.write_table(table, out / "2026-11-02_en_debian-edu.parquet", compression="zstd")

    varied_quality_drops(root, out)
    for p in sorted(out.iterdir()):
        print(f"{p.name}: {p.stat().st_size} bytes")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
