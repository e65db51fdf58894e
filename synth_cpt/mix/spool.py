"""The texts (and token ids) of a mix's components, spooled to a local work folder as they are read.

Why: a mix's rows come out in one seeded shuffle of every component, so a shard needs texts from
anywhere in its inputs. Reading each component once, in bounded batches, into flat local files (a
text's UTF-8 bytes; its doc_id and synth_id bytes side by side; with `.bin` shards its ids as uint32)
lets a shard (and the repeats table) gather exactly its rows with positioned reads: memory holds a
batch or a shard, never a component's strings. Per row only numbers stay in memory: where its text,
ids and doc_id/synth_id bytes are, its token count, and its lineage class (an index into the few distinct
(drop, drop version, prompt, model, has doc_id, has synth_id) a component has), from which the pins,
the manifest's lists, the suite's null checks and a row's drop_id and drop_version are made. The
lineage is spooled and split back with numpy (no per-row Python but one positioned read); texts are
counted and encoded ENCODE_ROWS at a time. The files go with the build's work folder.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

if TYPE_CHECKING:
    from synth_cpt.corpus.tokenizer import TokenCounter

ID_DTYPE = np.dtype("<u4")  # every vocabulary's ids fit; a shard narrows them to its own dtype
ENCODE_ROWS = 256  # texts encoded at once: a batch's ids as Python lists are ~40 bytes an id
LINEAGE = ("synth_id", "doc_id", "drop_id", "drop_version")  # what a shard row carries of its lineage (a repeats row: the ids)
CLASS = ("drop_id", "drop_version", "prompt_sha", "model_fingerprint", "has_doc_id", "has_synth_id")  # a lineage class's fields


@dataclass(frozen=True)
class Spooled:
    """One component's rows in the spool, in file order: where each text's bytes are, its token count,
    (when ids are spooled) where its ids start, where its doc_id (then its synth_id) bytes are and how
    many, and its lineage class."""

    text_start: np.ndarray
    text_bytes: np.ndarray
    n_tokens: np.ndarray
    ids_start: np.ndarray | None
    lineage_start: np.ndarray
    doc_id_bytes: np.ndarray  # int32
    synth_id_bytes: np.ndarray  # int32
    lineage_class: np.ndarray  # int32 indices into TextSpool.classes

    def lineage_of(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """What `TextSpool.lineage` gathers the lineage of `rows` from."""
        return self.lineage_start[rows], self.doc_id_bytes[rows], self.synth_id_bytes[rows], self.lineage_class[rows]

    @property
    def rows(self) -> int:
        return int(self.n_tokens.size)


def _int64(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts).astype(np.int64, copy=False) if parts else np.zeros(0, dtype=np.int64)


def _int32(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts).astype(np.int32, copy=False) if parts else np.zeros(0, dtype=np.int32)


def _interleave(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """[first[0], second[0], first[1], second[1], ...]"""
    out = np.empty(first.size + second.size, dtype=np.result_type(first, second))
    out[0::2], out[1::2] = first, second
    return out


def _side_by_side(a: pa.Array, b: pa.Array) -> tuple[bytes, np.ndarray, np.ndarray]:
    """Two string arrays of one length as one byte string, row by row a's bytes then b's (nulls as
    empty), and each row's two lengths."""
    (a_off, a_data), (b_off, b_data) = (_string_buffers(x.fill_null("")) for x in (a, b))
    a_len, b_len = np.diff(a_off), np.diff(b_off)
    both = np.frombuffer(b"".join((a_data, b_data)), dtype=np.uint8)  # a's bytes, then b's
    lengths = _interleave(a_len, b_len)  # the pieces in the order they are written
    source = _interleave(a_off[:-1], b_off[:-1] + a_off[-1])  # where each piece is in `both`
    shift = np.repeat(source - (np.cumsum(lengths) - lengths), lengths)
    return both[np.arange(shift.size, dtype=np.int64) + shift].tobytes(), a_len, b_len


def _split_side_by_side(data: bytes, a_len: np.ndarray, b_len: np.ndarray) -> tuple[pa.Array, pa.Array]:
    """The inverse of `_side_by_side`: the two columns (no nulls yet) as large strings."""
    buf = np.frombuffer(data, dtype=np.uint8)
    is_a = np.repeat(np.tile(np.array([True, False]), a_len.size), _interleave(a_len, b_len))
    return _large_strings(buf[is_a].tobytes(), a_len), _large_strings(buf[~is_a].tobytes(), b_len)


def _large_strings(data: bytes, lengths: np.ndarray) -> pa.Array:
    """`data` cut into strings of `lengths` bytes, checked as UTF-8: a damaged spool fails here, not in a shard."""
    offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int64)
    array = pa.LargeStringArray.from_buffers(lengths.size, pa.py_buffer(offsets), pa.py_buffer(data))
    array.validate(full=True)
    return array


def _read_at(f, starts: np.ndarray, sizes: np.ndarray, what: str) -> bytes:
    """The bytes at (start, size) of the open file `f`, concatenated in that order."""
    fd = f.fileno()
    data = b"".join(os.pread(fd, n, s) for s, n in zip(starts.tolist(), sizes.tolist(), strict=True))
    if len(data) != int(sizes.sum()):
        raise OSError(f"the {what} spool returned {len(data):,} bytes of {int(sizes.sum()):,}")
    return data


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
        its lineage (`lineage` makes a batch's LINEAGE columns, prompt_sha and model_fingerprint; whether
        doc_id and synth_id are null is part of the row's class)."""
        starts, sizes, counts, id_starts, line_starts, doc_sizes, synth_sizes, classes = [], [], [], [], [], [], [], []
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
            frame = lineage(pl.from_arrow(batch))  # type: ignore[arg-type]
            records, doc_n, synth_n = _side_by_side(frame["doc_id"].to_arrow(), frame["synth_id"].to_arrow())
            line_starts.append(self._lineage_end + np.cumsum(doc_n + synth_n) - (doc_n + synth_n))
            doc_sizes.append(doc_n)
            synth_sizes.append(synth_n)
            classes.append(self._classes(frame))
            self._lineage.write(records)
            self._lineage_end += len(records)
        for f in (self._texts, self._ids, self._lineage):
            if f is not None:
                f.flush()
        return Spooled(
            _int64(starts), _int64(sizes), _int64(counts), _int64(id_starts) if self._ids is not None else None,
            _int64(line_starts), _int32(doc_sizes), _int32(synth_sizes), _int32(classes),
        )  # fmt: skip

    def _classes(self, frame: pl.DataFrame) -> np.ndarray:
        """Each row's lineage class, new classes numbered as first seen."""
        keys = frame.select(
            *CLASS[:4], has_doc_id=pl.col("doc_id").is_not_null(), has_synth_id=pl.col("synth_id").is_not_null()
        ).with_columns(pl.col(c).cast(pl.String) for c in CLASS[:4])
        seen = keys.unique(maintain_order=True)
        codes = []
        for key in seen.iter_rows():
            if (code := self._class_of.get(key)) is None:
                code = self._class_of[key] = len(self.classes)
                self.classes.append(dict(zip(CLASS, key, strict=True)))
            codes.append(code)
        coded = keys.with_row_index("row").join(
            seen.with_columns(code=pl.Series(codes, dtype=pl.Int32)), on=list(CLASS), how="left", nulls_equal=True
        )
        return coded.sort("row")["code"].to_numpy().astype(np.int32, copy=False)

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

    def lineage(self, starts: np.ndarray, doc_sizes: np.ndarray, synth_sizes: np.ndarray, classes: np.ndarray) -> pl.DataFrame:
        """The LINEAGE columns of the rows at (start, doc_id bytes, synth_id bytes, class) (`Spooled.lineage_of`), in that order."""
        self.gathered.append(int(starts.size))
        data = _read_at(self._lineage, starts, doc_sizes.astype(np.int64) + synth_sizes, "lineage")
        doc_ids, synth_ids = _split_side_by_side(data, doc_sizes, synth_sizes)
        codes = pa.array(classes, pa.int32())

        def of_class(field: str) -> pa.Array:
            return pa.array([c[field] for c in self.classes], pa.large_string()).take(codes)

        def valid(field: str) -> pa.Array:
            return pa.array([bool(c[field]) for c in self.classes], pa.bool_()).take(codes)

        return pl.DataFrame(
            {
                "synth_id": pc.if_else(valid("has_synth_id"), synth_ids, None),
                "doc_id": pc.if_else(valid("has_doc_id"), doc_ids, None),
                "drop_id": of_class("drop_id"),
                "drop_version": of_class("drop_version"),
            }
        ).select(LINEAGE)

    def texts(self, starts: np.ndarray, sizes: np.ndarray) -> pl.Series:
        """The texts at (start, size), in that order, as the `text` column of a shard."""
        return pl.Series("text", _large_strings(_read_at(self._texts, starts, sizes, "text"), sizes))

    def ids(self, starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
        """The ids of the rows at (first id, n_tokens), concatenated in that order."""
        if self._ids is None:
            raise ValueError("this spool was made without ids")
        width = ID_DTYPE.itemsize
        return np.frombuffer(_read_at(self._ids, starts * width, counts * width, "id"), dtype=ID_DTYPE)
