"""Shard writers of a training mix: Parquet, JSONL.zst and tokenized `.bin` + `.idx`, and a reader back.

- Parquet (the default): loadable by `datasets.load_dataset("parquet", data_files=...)`, polars, DuckDB.
- JSONL.zst: one JSON object per row, zstd-compressed.
- tokens: the nanoGPT/Megatron memmap layout. `shard-NNNNN.bin` is every row's token ids followed by
  EOS, as little-endian `uint16` (vocabularies up to 65,535) or `uint32`; `shard-NNNNN.idx` is
  little-endian `int64`: the offset of each document's first token, then the total length (n + 1
  values), so document i is `bin[idx[i]:idx[i+1]]`, its EOS included. `numpy.memmap` reads both.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import zstandard

from synth_cpt.core.storage import Storage

EXTENSIONS = {"parquet": "parquet", "jsonl.zst": "jsonl.zst", "tokens": "bin"}


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 65535 else np.dtype("<u4")


def shard_name(index: int, fmt: str) -> str:
    return f"shard-{index:05d}.{EXTENSIONS[fmt]}"


def write_shard(storage: Storage, folder: str, index: int, rows: pl.DataFrame, fmt: str, tokenizer: Any | None = None) -> list[str]:
    """Write one shard in one format; returns the keys written (atomically, each)."""
    key = f"{folder}/{shard_name(index, fmt)}"
    if fmt == "parquet":
        storage.write_parquet(key, rows)
        return [key]
    if fmt == "jsonl.zst":
        buffer = io.BytesIO()
        rows.write_ndjson(buffer)
        storage.write_bytes(key, zstandard.ZstdCompressor(level=3).compress(buffer.getvalue()))
        return [key]
    if fmt == "tokens":
        if tokenizer is None:
            raise ValueError("the tokens format needs the project tokenizer")
        eos = tokenizer.processor.eos_id()
        if eos < 0:
            raise ValueError("the tokenizer has no EOS id: the tokens format separates documents with EOS")
        ids = tokenizer.processor.encode(rows["text"].to_list(), num_threads=2)
        lengths = np.fromiter((len(d) + 1 for d in ids), dtype=np.int64, count=len(ids))
        index_values = np.concatenate([[0], np.cumsum(lengths)]).astype("<i8")
        flat = np.fromiter((t for doc in ids for t in (*doc, eos)), dtype=token_dtype(tokenizer.vocab_size), count=int(lengths.sum()))
        idx_key = key.removesuffix(".bin") + ".idx"
        storage.write_bytes(key, flat.tobytes())
        storage.write_bytes(idx_key, index_values.tobytes())
        return [key, idx_key]
    raise ValueError(f"unknown shard format {fmt!r}")


def read_token_shard(bin_path: str | Path, vocab_size: int) -> list[np.ndarray]:
    """The documents of a `.bin` shard (memory-mapped), each ending with its EOS."""
    bin_path = Path(bin_path)
    tokens = np.memmap(bin_path, dtype=token_dtype(vocab_size), mode="r")
    offsets = np.fromfile(bin_path.with_suffix(".idx"), dtype="<i8")
    if offsets[-1] != len(tokens):
        raise ValueError(f"{bin_path}: the index says {offsets[-1]} tokens, the file holds {len(tokens)}")
    return [tokens[a:b] for a, b in zip(offsets[:-1], offsets[1:], strict=True)]


def decode_token_shard(bin_path: str | Path, tokenizer: Any) -> list[str]:
    """A tokens shard decoded back to its texts (EOS dropped)."""
    eos = tokenizer.processor.eos_id()
    return [tokenizer.processor.decode([int(t) for t in doc if t != eos]) for doc in read_token_shard(bin_path, tokenizer.vocab_size)]


def read_jsonl_zst(data: bytes) -> list[dict[str, Any]]:
    return [json.loads(line) for line in zstandard.ZstdDecompressor().decompress(data).decode("utf-8").splitlines() if line]
