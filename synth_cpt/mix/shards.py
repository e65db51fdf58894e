"""Shard writers of a training mix: Parquet, JSONL.zst and tokenized `.bin` + `.idx`, and a reader back.

- Parquet (the default): loadable by `datasets.load_dataset("parquet", data_files=...)`, polars, DuckDB.
- JSONL.zst: one JSON object per row, zstd-compressed.
- tokens: the nanoGPT/Megatron memmap layout, in the ids of the target tokenizer (the published
  `tokenizer`, SentencePiece or Hugging Face). `shard-NNNNN.bin` is every row as `[BOS] ids EOS`:
  the text's ids (no special tokens added), then the tokenizer's EOS; BOS comes first iff the
  tokenizer has a BOS id distinct from its EOS (Llama and Gemma tokenizers and the SentencePiece
  model trained here have one; Qwen and GPT-2 style ones do not), so one rule gives each model
  family what it was trained with. Ids are
  little-endian `uint16` when every id fits (vocab_size <= 65,535) and `uint32` otherwise (Qwen's
  151k); `shard-NNNNN.idx` is little-endian `int64`: the offset of each document's first token, then
  the total length (n + 1 values), so document i is `bin[idx[i]:idx[i+1]]`, its BOS and EOS
  included. `numpy.memmap` reads both; `token_layout` says which dtype and ids a mix used.
  A document's `n_tokens` counts its text's ids only; what a `.bin` holds is `tokens_in_file` (every id
  written, BOS and EOS included), which is what a manifest states for it.
"""

from __future__ import annotations

import io
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl
import zstandard

from synth_cpt.core.storage import Storage

if TYPE_CHECKING:
    from synth_cpt.corpus.tokenizer import TokenCounter

EXTENSIONS = {"parquet": "parquet", "jsonl.zst": "jsonl.zst", "tokens": "bin"}


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest dtype that holds every id of a vocabulary of `vocab_size` (largest id + 1)."""
    return np.dtype("<u2") if vocab_size <= 65535 else np.dtype("<u4")


def document_bos(tokenizer: TokenCounter) -> int | None:
    """The BOS written before each document: the tokenizer's, when it has one distinct from its EOS."""
    return tokenizer.bos_id if tokenizer.bos_id is not None and tokenizer.bos_id != tokenizer.eos_id else None


def token_layout(tokenizer: TokenCounter) -> dict[str, Any]:
    """What a reader of `.bin` shards needs to know besides the files (recorded in a mix's manifest)."""
    return {"tokenizer_kind": tokenizer.kind, "vocab_size": tokenizer.vocab_size, "dtype": token_dtype(tokenizer.vocab_size).name,
            "bos_id": document_bos(tokenizer), "eos_id": tokenizer.eos_id}  # fmt: skip


def shard_name(index: int, fmt: str) -> str:
    return f"shard-{index:05d}.{EXTENSIONS[fmt]}"


@dataclass(frozen=True)
class WrittenShard:
    """The keys one shard format was written to, and for `.bin` the ids it holds (BOS and EOS included)."""

    keys: list[str] = field(default_factory=list)
    tokens_in_file: int | None = None


def frame_documents(ids: np.ndarray, lengths: np.ndarray, bos: int | None, eos: int) -> tuple[np.ndarray, np.ndarray]:
    """(every id of a `.bin` shard as int64, its `.idx` offsets): each document's `ids` (concatenated,
    `lengths` each) framed as `[BOS] ids EOS`."""
    head = 0 if bos is None else 1
    sizes = lengths.astype(np.int64) + head + 1
    index_values = np.concatenate([[0], np.cumsum(sizes)]).astype("<i8")
    flat = np.full(int(index_values[-1]), eos, dtype=np.int64)
    starts = index_values[:-1]
    if head:
        flat[starts] = bos
    before = np.cumsum(lengths) - lengths  # ids of the documents before each one
    flat[np.arange(ids.size, dtype=np.int64) + np.repeat(starts + head - before, lengths)] = ids
    return flat, index_values


def write_shard(
    storage: Storage,
    folder: str,
    index: int,
    rows: pl.DataFrame,
    fmt: str,
    tokenizer: TokenCounter | None = None,
    ids: tuple[np.ndarray, np.ndarray] | None = None,
) -> WrittenShard:
    """Write one shard in one format (each file atomically). `ids`: the rows' ids already encoded by
    `tokenizer` (concatenated, and their lengths), so a `.bin` shard need not encode its texts again."""
    key = f"{folder}/{shard_name(index, fmt)}"
    if fmt == "parquet":
        storage.write_parquet(key, rows)
        return WrittenShard([key])
    if fmt == "jsonl.zst":
        buffer = io.BytesIO()
        rows.write_ndjson(buffer)
        storage.write_bytes(key, zstandard.ZstdCompressor(level=3).compress(buffer.getvalue()))
        return WrittenShard([key])
    if fmt == "tokens":
        if tokenizer is None:
            raise ValueError("the tokens format needs the target tokenizer")
        eos = tokenizer.eos_id
        if eos is None:
            raise ValueError(f"the {tokenizer.kind} tokenizer has no EOS id: the tokens format separates documents with EOS")
        if ids is None:
            encoded = tokenizer.encode(rows["text"].to_list())
            lengths = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))
            ids = (np.fromiter(itertools.chain.from_iterable(encoded), dtype=np.int64, count=int(lengths.sum())), lengths)
        flat, index_values = frame_documents(ids[0], ids[1], document_bos(tokenizer), eos)
        dtype = token_dtype(tokenizer.vocab_size)
        if flat.size and (flat.min() < 0 or flat.max() > np.iinfo(dtype).max):  # never wrap an id around silently
            raise ValueError(f"token id {int(flat.max())} does not fit {dtype.name} (vocab_size {tokenizer.vocab_size})")
        flat = flat.astype(dtype)
        idx_key = key.removesuffix(".bin") + ".idx"
        storage.write_bytes(key, flat.tobytes())
        storage.write_bytes(idx_key, index_values.tobytes())
        return WrittenShard([key, idx_key], int(flat.size))
    raise ValueError(f"unknown shard format {fmt!r}")


def read_token_shard(bin_path: str | Path, vocab_size: int) -> list[np.ndarray]:
    """The documents of a `.bin` shard (memory-mapped), each with its BOS (if written) and EOS."""
    bin_path = Path(bin_path)
    tokens = np.memmap(bin_path, dtype=token_dtype(vocab_size), mode="r")
    offsets = np.fromfile(bin_path.with_suffix(".idx"), dtype="<i8")
    if offsets[-1] != len(tokens):
        raise ValueError(f"{bin_path}: the index says {offsets[-1]} tokens, the file holds {len(tokens)}")
    return [tokens[a:b] for a, b in zip(offsets[:-1], offsets[1:], strict=True)]


def decode_token_shard(bin_path: str | Path, tokenizer: TokenCounter) -> list[str]:
    """A tokens shard decoded back to its texts with the tokenizer that wrote it, of either kind: the
    framing BOS and final EOS dropped where present (shards written before BOS framing have none), the
    text's own ids kept as they are."""
    bos, eos = document_bos(tokenizer), tokenizer.eos_id
    texts = []
    for doc in read_token_shard(bin_path, tokenizer.vocab_size):
        ids = [int(t) for t in doc]
        if bos is not None and ids[:1] == [bos]:
            ids = ids[1:]
        if ids[-1:] == [eos]:
            ids = ids[:-1]
        texts.append(tokenizer.decode(ids))
    return texts


def read_jsonl_zst(data: bytes) -> list[dict[str, Any]]:
    return [json.loads(line) for line in zstandard.ZstdDecompressor().decompress(data).decode("utf-8").splitlines() if line]
