"""Rebuild the sample crawl drops shipped in synth_cpt/sample_corpus from Debian documentation packages.

Why: the demo and the end-to-end tests need real, permissively licensed text in two languages, in
every drop format the ingester reads, with a few broken records so quarantine is visible.

Usage (needs network access to a Debian mirror, not needed at run time):
    apt-get download gimp-help-pt-br gimp-help-en debian-edu-doc-pt-br debian-edu-doc-en
    for f in *.deb; do dpkg-deb -x "$f" extracted; done
    python scripts/build_sample_corpus.py extracted synth_cpt/sample_corpus/drops
"""

from __future__ import annotations

import gzip
import hashlib
import json
import random
import re
import sys
from html.parser import HTMLParser
from pathlib import Path

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
    for p in sorted(out.iterdir()):
        print(f"{p.name}: {p.stat().st_size} bytes")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
