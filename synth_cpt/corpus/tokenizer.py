"""The SentencePiece tokenizer behind every token count: a configured model, or one trained here.

Why real tokens: budgets and chunk limits cut by character estimates are wrong by 20-40% across
languages (METHODS.md §7); every count in the pipeline comes from this one model, recorded by hash.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
from collections.abc import Callable, Iterator
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
    """A configured `.model` from a local path or from under the storage root (s3:// goes through
    storage). Not loaded here: whether it is a model is `check_model`'s to say, on the candidate."""
    if path.startswith("s3://"):
        from synth_cpt.core.storage import S3Storage

        bucket_root, _, key = path.rpartition("/")
        return S3Storage(bucket_root).read_bytes(key)
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"tokenizer.model_file {path} does not exist")
    return p.read_bytes()


def _batches(storage: Storage, keys: list[str], columns: list[str]) -> Iterator[pl.DataFrame]:
    """`columns` of every file, batch by batch: ranged reads of those column chunks only (on S3 too,
    never a whole download), one file open at a time."""
    for key in keys:
        with contextlib.closing(storage.parquet_file(key)) as pf:
            for batch in pf.iter_batches(columns=columns):
                yield pl.DataFrame(batch)


def training_sample(storage: Storage, corpus_files: list[str], n: int, seed: int) -> tuple[pl.DataFrame, int]:
    """The seeded sample of `n` documents (doc_id, text, by doc_id) and the corpus' document count.
    Two column reads: every doc_id, then the texts of the chosen ones (memory follows `n`, not the corpus)."""
    ids = pl.concat([pl.DataFrame(schema={"doc_id": pl.String}), *_batches(storage, corpus_files, ["doc_id"])]).unique()
    wanted = seeded_sample(ids, n, seed)["doc_id"].implode()
    texts = [b.filter(pl.col("doc_id").is_in(wanted)) for b in _batches(storage, corpus_files, ["doc_id", "text"])]
    empty = pl.DataFrame(schema={"doc_id": pl.String, "text": pl.String})
    return pl.concat([empty, *texts]).unique(subset="doc_id", keep="first").sort("doc_id"), ids.height


SAMPLE_TEXTS = ["Olá, mundo.", "Hello, world."]  # text of every script the model will meet


def check_model(storage: Storage, prefix: str) -> Outcome:
    """The candidate as stored in its version folder: the model file loads, tokenizes sample text, and
    matches the info written beside it (sha256; no more pieces than asked for). Everything is read back
    and loaded here, so a model that is no model, or one damaged on its way to storage, fails the check."""
    model = storage.read_bytes(f"{prefix}/{TOKENIZER_MODEL}")
    info = storage.read_json(f"{prefix}/{TOKENIZER_INFO}")
    sha = sha256_hex(model)
    failures = [] if sha == info.get("sha256") else [f"the stored model's sha256 {sha} differs from its info's {info.get('sha256')}"]
    try:
        counter = TokenCounter(model)
    except Exception as exc:  # not a SentencePiece model at all
        what = info.get("model_file") or "the trained model"
        failures.append(f"model does not load ({what}): {type(exc).__name__}: {exc}")
        return Outcome(False, failures, {"loads": {"success": False}, "sha256": sha})
    counts = counter.count(SAMPLE_TEXTS)
    if min(counts) <= 0:
        failures.append("a sample text produced no tokens")
    requested = info.get("requested_vocab_size")
    if requested and counter.vocab_size > requested:
        failures.append(f"vocab_size {counter.vocab_size} is over the {requested} asked for")
    details = {"loads": {"success": True}, "sha256": sha, "vocab_size": counter.vocab_size, "sample_tokens": counts}
    return Outcome(not failures, failures, details)


def build_tokenizer(
    storage: Storage, config: PipelineConfig, corpus_files: list[str], validate: Callable[[Storage, str], Outcome] = check_model
) -> dict:
    """Make the model, write it and its info as a new version, validate what was written
    (`validate(storage, version_prefix)`; CandidateRejected keeps it under _rejected/), then publish: the
    pointer, written last, carries the info and the vocabulary size the check measured, so readers never
    pair a model with another model's info. When another run published a newer version meanwhile, that
    one stays in force: `superseded_by` names it and `uri` is its model."""
    tc = config.tokenizer
    if tc.model_file:
        model = load_model_file(tc.model_file, storage)
        info = {"source": "model_file", "model_file": tc.model_file, "trained_on_documents": 0}
    else:
        sample, corpus_documents = training_sample(storage, corpus_files, tc.sample_documents, config.seeds.tokenizer)
        model = train_model(sample["text"].to_list(), tc.vocab_size, config.seeds.tokenizer, tc.character_coverage)
        info = {
            "source": "trained",
            "trained_on_documents": sample.height,
            "corpus_documents": corpus_documents,
            "requested_vocab_size": tc.vocab_size,
            "seed": config.seeds.tokenizer,
        }
    info["sha256"] = sha256_hex(model)  # of the bytes made here: the check compares what storage holds
    version = publish.new_version()
    prefix = version_prefix(TOKENIZER, version)
    storage.write_bytes(f"{prefix}/{TOKENIZER_MODEL}", model)
    storage.write_json(f"{prefix}/{TOKENIZER_INFO}", info)
    outcome = validate(storage, prefix)
    if not outcome.success:
        raise CandidateRejected(outcome, publish.reject_version(storage, TOKENIZER, version), "model_loads")
    info["vocab_size"] = outcome.details.get("vocab_size")
    publish.publish_version(storage, TOKENIZER, version, {"info": info})
    in_force = published_tokenizer(storage)
    superseded_by = in_force["version"] if in_force["version"] != version else None
    uri = storage.uri(in_force["prefix"], TOKENIZER_MODEL)
    return {**info, "version": version, "uri": uri, "outcome": outcome, "superseded_by": superseded_by}
