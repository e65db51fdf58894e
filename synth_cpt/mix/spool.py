"""The texts (and token ids) of a mix's components, spooled to a local work folder as they are read.

Why: a mix's rows come out in one seeded shuffle of every component, so a shard needs texts from
anywhere in its inputs. Reading each component once, in bounded batches, into flat local files (a
text's UTF-8 bytes; its lineage strings as one small JSON record; with `.bin` shards its ids as uint32)
lets a shard (and the repeats table) gather exactly its rows with positioned reads: memory holds a
batch or a shard, never a component's strings. Per row only numbers stay in memory: where its text,
lineage and ids are, its token count, and its lineage class (an index into the few distinct
(drop, drop version, prompt, model, has doc_id, has synth_id) a component has), from which the pins,
the manifest's lists and the suite's null checks are made. The files go with the build's work folder.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import polars as pl
import pyarrow as pa

if TYPE_CHECKING:
    from synth_cpt.corpus.tokenizer import TokenCounter

ID_DTYPE = np.dtype("<u4")  # every vocabulary's ids fit; a shard narrows them to its own dtype
ENCODE_ROWS = 256  # texts encoded at once: a batch's ids as Python lists are ~40 bytes an id
LINEAGE = ("synth_id", "doc_id", "drop_id", "drop_version")  # what a shard row (and a repeats row) carries of its lineage
CLASS = ("drop_id", "drop_version", "prompt_sha", "model_fingerprint", "has_doc_id", "has_synth_id")  # a lineage class's fields


@dataclass(frozen=True)
class Spooled:
    """One component's rows in the spool, in file order: where each text's bytes are, its token count,
    (when ids are spooled) where its ids start, where its lineage record is, and its lineage class."""

    text_start: np.ndarray
    text_bytes: np.ndarray
    n_tokens: np.ndarray
    ids_start: np.ndarray | None
    lineage_start: np.ndarray
    lineage_bytes: np.ndarray
    lineage_class: np.ndarray  # int32 indices into TextSpool.classes

    @property
    def rows(self) -> int:
        return int(self.n_tokens.size)


def _int64(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts).astype(np.int64, copy=False) if parts else np.zeros(0, dtype=np.int64)


def _string_buffers(texts: pa.Array) -> tuple[np.ndarray, memoryview]:
    """A string array's offsets (n + 1, relative to its first text) and its bytes, without copying them."""
    if not (pa.types.is_string(texts.type) or pa.types.is_large_string(texts.type)):
        texts = texts.cast(pa.large_string())
    width = np.int64 if pa.types.is_large_string(texts.type) else np.int32
    _, offsets_buffer, data = texts.buffers()
    offsets = np.frombuffer(offsets_buffer, dtype=width)[texts.offset : texts.offset + len(texts) + 1].astype(np.int64)
    view = memoryview(data) if data is not None else memoryview(b"")
    return offsets - offsets[0], view[int(offsets[0]) : int(offsets[-1])]


class TextSpool:
    """Append-only text (and id) files under `folder`; `add` streams a component in, `texts`/`ids` gather rows back."""

    def __init__(self, folder: Path, with_ids: bool) -> None:
        self._texts = open(Path(folder, "texts.spool"), "w+b")  # noqa: SIM115 - closed by close()
        self._ids = open(Path(folder, "ids.spool"), "w+b") if with_ids else None  # noqa: SIM115
        self._lineage = open(Path(folder, "lineage.spool"), "w+b")  # noqa: SIM115
        self._text_end = self._ids_end = self._lineage_end = 0  # ids_end in ids
        self.classes: list[dict[str, object]] = []  # lineage class -> its CLASS fields
        self._class_of: dict[tuple, int] = {}
        self.batches: list[int] = []  # rows of every batch read (what a test checks is bounded)
        self.gathered: list[int] = []  # rows of every lineage gather (shards, repeats): bounded too

    def close(self) -> None:
        self._texts.close()
        self._lineage.close()
        if self._ids is not None:
            self._ids.close()

    def add(self, batches: Iterable[pa.RecordBatch], tokenizer: TokenCounter, lineage: Callable[[pl.DataFrame], pl.DataFrame]) -> Spooled:
        """Count (and with ids, encode) each batch's texts with the target tokenizer and append them, and
        its lineage (`lineage` makes a batch's LINEAGE and CLASS string columns, in that order)."""
        starts, sizes, counts, id_starts, line_starts, line_sizes, classes = [], [], [], [], [], [], []
        for batch in batches:
            self.batches.append(batch.num_rows)
            texts = batch.column(batch.schema.get_field_index("text"))
            n = self._count(texts, tokenizer, id_starts)
            offsets, data = _string_buffers(texts)
            starts.append(self._text_end + offsets[:-1])
            sizes.append(np.diff(offsets))
            self._texts.write(data)
            self._text_end += len(data)
            counts.append(n)
            records, codes = [], []
            for row in lineage(pl.from_arrow(batch)).iter_rows():  # type: ignore[arg-type]
                records.append(json.dumps(row[:4], ensure_ascii=False).encode())
                key = (*row[2:6], row[1] is not None, row[0] is not None)
                if (code := self._class_of.get(key)) is None:
                    code = self._class_of[key] = len(self.classes)
                    self.classes.append(dict(zip(CLASS, key, strict=True)))
                codes.append(code)
            lengths = np.fromiter(map(len, records), dtype=np.int64, count=len(records))
            line_starts.append(self._lineage_end + np.cumsum(lengths) - lengths)
            line_sizes.append(lengths)
            classes.append(np.asarray(codes, dtype=np.int32))
            self._lineage.write(b"".join(records))
            self._lineage_end += int(lengths.sum())
        for f in (self._texts, self._ids, self._lineage):
            if f is not None:
                f.flush()
        return Spooled(
            _int64(starts), _int64(sizes), _int64(counts), _int64(id_starts) if self._ids is not None else None,
            _int64(line_starts), _int64(line_sizes), np.concatenate(classes) if classes else np.zeros(0, dtype=np.int32),
        )  # fmt: skip

    def _count(self, texts: pa.Array, tokenizer: TokenCounter, id_starts: list[np.ndarray]) -> np.ndarray:
        """The batch's token counts (with ids, encoded and appended), ENCODE_ROWS texts at a time."""
        out = []
        for a in range(0, len(texts), ENCODE_ROWS):
            values = texts.slice(a, ENCODE_ROWS).to_pylist()
            if self._ids is None:
                out.append(np.asarray(tokenizer.count(values), dtype=np.int64))
                continue
            ids = tokenizer.encode(values)
            n = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
            flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=ID_DTYPE, count=int(n.sum()))
            id_starts.append(self._ids_end + np.cumsum(n) - n)
            self._ids.write(flat.tobytes())
            self._ids_end += flat.size
            out.append(n)
        return _int64(out)

    def lineage(self, starts: np.ndarray, sizes: np.ndarray) -> pl.DataFrame:
        """The LINEAGE columns of the rows at (start, size), in that order."""
        self.gathered.append(int(starts.size))
        fd = self._lineage.fileno()
        records = [os.pread(fd, n, s) for s, n in zip(starts.tolist(), sizes.tolist(), strict=True)]
        rows = json.loads(b"[" + b",".join(records) + b"]")
        if len(rows) != starts.size:
            raise OSError(f"the lineage spool returned {len(rows):,} records of {starts.size:,}")
        return pl.DataFrame(rows, schema=dict.fromkeys(LINEAGE, pl.String), orient="row")

    def texts(self, starts: np.ndarray, sizes: np.ndarray) -> pl.Series:
        """The texts at (start, size), in that order, as the `text` column of a shard."""
        fd = self._texts.fileno()
        data = b"".join(os.pread(fd, n, s) for s, n in zip(starts.tolist(), sizes.tolist(), strict=True))
        if len(data) != int(sizes.sum()):
            raise OSError(f"the text spool returned {len(data):,} bytes of {int(sizes.sum()):,}")
        offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        array = pa.LargeStringArray.from_buffers(len(sizes), pa.py_buffer(offsets), pa.py_buffer(data))
        array.validate(full=True)  # UTF-8 as read: a damaged spool fails here, not in a shard
        return pl.Series("text", array)

    def ids(self, starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
        """The ids of the rows at (first id, n_tokens), concatenated in that order."""
        if self._ids is None:
            raise ValueError("this spool was made without ids")
        fd, width = self._ids.fileno(), ID_DTYPE.itemsize
        data = b"".join(os.pread(fd, n * width, s * width) for s, n in zip(starts.tolist(), counts.tolist(), strict=True))
        flat = np.frombuffer(data, dtype=ID_DTYPE)
        if flat.size != int(counts.sum()):
            raise OSError(f"the id spool returned {flat.size:,} ids of {int(counts.sum()):,}")
        return flat
