"""The SentencePiece tokenizer behind every token count: a configured model, or one trained here.

Why real tokens: budgets and chunk limits cut by character estimates are wrong by 20-40% across
languages (METHODS.md §7); every count in the pipeline comes from this one model, recorded by hash.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
from collections.abc import Callable
from pathlib import Path

import polars as pl
import sentencepiece as spm

from synth_cpt.core import publish
from synth_cpt.core.config import PipelineConfig
from synth_cpt.core.layout import TOKENIZER, TOKENIZER_INFO, TOKENIZER_MODEL, version_prefix
from synth_cpt.core.publish import CandidateRejected
from synth_cpt.core.storage import Storage
from synth_cpt.core.validation import Outcome


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def seeded_sample(frame: pl.DataFrame, n: int, seed: int) -> pl.DataFrame:
    """The `n` documents whose SHA-256 of (seed, doc_id) is smallest: the same sample whatever the row order."""
    keys = [hashlib.sha256(f"{seed}:{d}".encode()).hexdigest() for d in frame["doc_id"].to_list()]
    return frame.with_columns(_k=pl.Series(keys)).sort("_k").head(n).drop("_k")


def train_model(texts: list[str], vocab_size: int, seed: int, character_coverage: float) -> bytes:
    """Train a unigram SentencePiece model on `texts`; deterministic for the same input and seed."""
    lines = [line for text in texts for line in text.split("\n") if line.strip()]
    if not lines:
        raise ValueError("no text to train the tokenizer on: ingest a drop first, or set tokenizer.model_file")
    spm.set_random_generator_seed(seed)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="unigram",
        character_coverage=character_coverage,
        hard_vocab_limit=False,  # a small corpus yields a smaller vocabulary instead of an error
        num_threads=1,  # one thread keeps training deterministic
        byte_fallback=True,
        minloglevel=2,
    )
    return model.getvalue()


class TokenCounter:
    """Counts tokens with one SentencePiece model."""

    def __init__(self, model_bytes: bytes) -> None:
        self.sha256 = sha256_hex(model_bytes)
        self.processor = spm.SentencePieceProcessor(model_proto=model_bytes)

    @classmethod
    def from_storage(cls, storage: Storage) -> "TokenCounter":
        return cls(storage.read_bytes(model_key(storage)))

    @property
    def vocab_size(self) -> int:
        return self.processor.get_piece_size()

    def count(self, texts: list[str]) -> list[int]:
        if not texts:
            return []
        return [len(ids) for ids in self.processor.encode(texts, num_threads=2)]


def published_tokenizer(storage: Storage) -> dict:
    """The pointer of the published tokenizer: its info and the `prefix` of its model file."""
    pointer = publish.published(storage, TOKENIZER, legacy_file=TOKENIZER_INFO)
    if pointer is None:
        raise FileNotFoundError(f"{storage.uri(TOKENIZER)} has no published tokenizer: materialize the `tokenizer` asset first")
    if pointer["version"] == publish.LEGACY:
        return {"version": publish.LEGACY, "prefix": TOKENIZER, "info": pointer["legacy_file"]}
    return pointer


def model_key(storage: Storage) -> str:
    return f"{published_tokenizer(storage)['prefix']}/{TOKENIZER_MODEL}"


def load_model_file(path: str, storage: Storage) -> bytes:
    """A configured `.model` from a local path or from under the storage root (s3:// goes through storage)."""
    if path.startswith("s3://"):
        from synth_cpt.core.storage import S3Storage

        bucket_root, _, key = path.rpartition("/")
        return S3Storage(bucket_root).read_bytes(key)
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"tokenizer.model_file {path} does not exist")
    data = p.read_bytes()
    try:
        spm.SentencePieceProcessor(model_proto=data)
    except Exception as exc:
        raise ValueError(f"tokenizer.model_file {path} is not a SentencePiece model: {exc}") from None
    return data


def build_tokenizer(
    storage: Storage, config: PipelineConfig, corpus_files: list[str], validate: Callable[[bytes, dict], Outcome] | None = None
) -> dict:
    """Make the model, write it and its info as a new version, validate, then publish (the pointer,
    written last, carries the info): readers never pair a model with another model's info."""
    tc = config.tokenizer
    if tc.model_file:
        model = load_model_file(tc.model_file, storage)
        info = {"source": "model_file", "model_file": tc.model_file, "trained_on_documents": 0}
    else:
        with contextlib.ExitStack() as stack:
            paths = [str(stack.enter_context(storage.local_path(k))) for k in corpus_files]
            if paths:
                ids = pl.scan_parquet(paths).select("doc_id").unique().collect(engine="streaming")
            else:
                ids = pl.DataFrame(schema={"doc_id": pl.String})
            chosen = seeded_sample(ids, tc.sample_documents, config.seeds.tokenizer)
            # only the sampled texts are read: memory follows sample_documents, not the corpus
            sample = (
                pl.scan_parquet(paths).filter(pl.col("doc_id").is_in(chosen["doc_id"].implode())).select("doc_id", "text")
                .unique(subset="doc_id").sort("doc_id").collect(engine="streaming")
                if paths
                else pl.DataFrame(schema={"doc_id": pl.String, "text": pl.String})
            )  # fmt: skip
        model = train_model(sample["text"].to_list(), tc.vocab_size, config.seeds.tokenizer, tc.character_coverage)
        info = {
            "source": "trained",
            "trained_on_documents": sample.height,
            "corpus_documents": ids.height,
            "requested_vocab_size": tc.vocab_size,
            "seed": config.seeds.tokenizer,
        }
    counter = TokenCounter(model)
    info.update({"sha256": counter.sha256, "vocab_size": counter.vocab_size})
    version = publish.new_version()
    prefix = version_prefix(TOKENIZER, version)
    storage.write_bytes(f"{prefix}/{TOKENIZER_MODEL}", model)
    storage.write_json(f"{prefix}/{TOKENIZER_INFO}", info)
    outcome = validate(model, info) if validate is not None else None
    if outcome is not None:
        if not outcome.success:
            raise CandidateRejected(outcome, publish.reject_version(storage, TOKENIZER, version), "model_loads")
    publish.publish_version(storage, TOKENIZER, version, {"info": info})
    return {**info, "version": version, "uri": storage.uri(prefix, TOKENIZER_MODEL), "outcome": outcome}


def check_model(model: bytes, info: dict) -> Outcome:
    """The candidate model loads, tokenizes text of every script it will meet, and matches its info."""
    failures = []
    try:
        counter = TokenCounter(model)
    except Exception as exc:  # not a SentencePiece model at all
        return Outcome(False, [f"model does not load: {type(exc).__name__}: {exc}"], {"loads": {"success": False}})
    counts = counter.count(["Olá, mundo.", "Hello, world."])
    if counter.sha256 != info.get("sha256"):
        failures.append(f"sha256 {counter.sha256} differs from the info's {info.get('sha256')}")
    if counter.vocab_size != info.get("vocab_size"):
        failures.append(f"vocab_size {counter.vocab_size} differs from the info's {info.get('vocab_size')}")
    if min(counts) <= 0:
        failures.append("a sample text produced no tokens")
    details = {"loads": {"success": True}, "sha256": counter.sha256, "vocab_size": counter.vocab_size, "sample_tokens": counts}
    return Outcome(not failures, failures, details)
