"""The target tokenizer behind every token count and `.bin` shard: a configured SentencePiece `.model`
or Hugging Face `tokenizer.json`, or a SentencePiece model trained here.

Why real tokens: budgets and chunk limits cut by character estimates are wrong by 20-40% across
languages (METHODS.md §7); every count in the pipeline comes from this one tokenizer, recorded by kind
and hash, so a budget means tokens of the model that will be trained on the mix.
"""

from __future__ import annotations

import codecs
import contextlib
import hashlib
import io
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import polars as pl
import sentencepiece as spm
from tokenizers import Tokenizer

from synth_cpt.core import publish
from synth_cpt.core.config import PipelineConfig
from synth_cpt.core.layout import TOKENIZER, TOKENIZER_HF_CONFIG, TOKENIZER_INFO, TOKENIZER_MODEL_FILES, version_prefix
from synth_cpt.core.publish import CandidateRejected
from synth_cpt.core.storage import Storage
from synth_cpt.core.validation import Outcome

SENTENCEPIECE = "sentencepiece"
HUGGINGFACE = "huggingface"
HF_CONFIG_NAME = "tokenizer_config.json"  # read from beside a configured tokenizer.json, as transformers does

# Fallbacks when neither tokenizer_config.json nor the post-processor names a token, tried in this order.
EOS_NAMES = ("</s>", "<|endoftext|>", "<|im_end|>", "<|end_of_text|>", "<eos>")
BOS_NAMES = ("<s>", "<|begin_of_text|>", "<bos>")


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


class NotATokenizer(ValueError):
    """A tokenizer file that is neither a SentencePiece model nor a Hugging Face tokenizer.json."""


def _json_like(data: bytes) -> bool:
    return data.removeprefix(codecs.BOM_UTF8).lstrip()[:1] == b"{"


def sniff_kind(data: bytes) -> str:
    """The kind a file's content claims: a JSON object is a Hugging Face tokenizer.json, anything else is
    taken for a SentencePiece protobuf. Never raises: loading it (`detect_kind`, `check_model`) says whether
    it really is one. Parsed, not only its first byte: a protobuf may begin with a newline byte and `{`."""
    if _json_like(data):
        try:
            return HUGGINGFACE if isinstance(json.loads(data.decode("utf-8-sig")), dict) else SENTENCEPIECE
        except ValueError:  # UnicodeDecodeError is one
            pass
    return SENTENCEPIECE


def detect_kind(data: bytes, name: str = "the tokenizer file") -> str:
    """`sentencepiece` or `huggingface`, by content (the suffix of a file says nothing reliable); raises
    NotATokenizer naming `name` for anything else."""
    return TokenCounter(data, name=name).kind


class _SentencePiece:
    def __init__(self, model: bytes, name: str) -> None:
        try:
            self.processor = spm.SentencePieceProcessor(model_proto=model)
        except Exception as exc:
            why = "starts like JSON but does not parse as JSON, and " if _json_like(model) else ""
            raise NotATokenizer(
                f"{name} {why}is neither a SentencePiece model (protobuf) nor a Hugging Face tokenizer.json (JSON): {type(exc).__name__}: {exc}"
            ) from exc
        if self.processor.get_piece_size() == 0:  # empty bytes load as an empty processor
            raise NotATokenizer(f"{name} is empty: neither a SentencePiece model nor a Hugging Face tokenizer.json")
        self.vocab_size = self.processor.get_piece_size()
        self.bos_id = self.processor.bos_id() if self.processor.bos_id() >= 0 else None
        self.eos_id = self.processor.eos_id() if self.processor.eos_id() >= 0 else None

    def encode(self, texts: list[str]) -> list[list[int]]:
        return self.processor.encode(texts, num_threads=2)

    def decode(self, ids: list[int]) -> str:
        return self.processor.decode(ids)


class _HuggingFace:
    def __init__(self, model: bytes, config: bytes | None, name: str) -> None:
        text = model.decode("utf-8-sig")  # sniff_kind parsed it
        doc = json.loads(text)
        if "model" not in doc:
            raise NotATokenizer(f"{name} is JSON without a tokenizer `model`: not a Hugging Face tokenizer.json (a tokenizer_config.json?)")
        try:
            self.tokenizer = Tokenizer.from_str(text)
        except Exception as exc:
            raise NotATokenizer(f"{name} is JSON but does not load as a Hugging Face tokenizer.json: {exc}") from exc
        self.tokenizer.no_truncation()  # a count is of the whole text, whatever the file set up for inference
        self.tokenizer.no_padding()
        vocab = self.tokenizer.get_vocab(with_added_tokens=True)
        if not vocab:
            raise NotATokenizer(f"{name} is a Hugging Face tokenizer.json with an empty vocabulary")
        self.vocab_size = max(vocab.values()) + 1  # ids may be sparse: the largest decides
        try:
            settings = json.loads(config.decode("utf-8-sig")) if config else {}
        except ValueError as exc:
            raise NotATokenizer(f"the {HF_CONFIG_NAME} beside {name} is not JSON: {exc}") from exc
        settings = settings if isinstance(settings, dict) else {}
        before, after = _post_processor_tokens(doc)
        self.bos_id = self._special(settings, "bos_token", before, BOS_NAMES, name)
        self.eos_id = self._special(settings, "eos_token", after, EOS_NAMES, name)

    def _special(self, settings: dict, field: str, framing: str | None, names: tuple[str, ...], name: str) -> int | None:
        """tokenizer_config.json first (what transformers uses; `null` there means none), then the token the
        post-processor frames a sequence with, then the first well-known name the vocabulary has."""
        if field in settings:
            token = settings[field]
            token = token.get("content") if isinstance(token, dict) else token
            if token is None:
                return None
            found = self.tokenizer.token_to_id(token)
            if found is None:
                raise NotATokenizer(f"{HF_CONFIG_NAME} beside {name} names {field} {token!r}, which the tokenizer does not have")
            return found
        for token in (framing, *names):
            if token is not None and (found := self.tokenizer.token_to_id(token)) is not None:
                return found
        return None

    def encode(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch_fast(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)


def _post_processor_tokens(doc: dict) -> tuple[str | None, str | None]:
    """The special tokens a tokenizer.json's post-processor puts before and after a single sequence
    (`<s> $A </s>`, Llama 3's `<|begin_of_text|> $A`), looking into a Sequence of processors."""
    before = after = None
    stack: list[Any] = [doc.get("post_processor")]
    while stack:
        proc = stack.pop(0)
        if not isinstance(proc, dict):
            continue
        kind = proc.get("type")
        if kind == "Sequence":
            stack.extend(proc.get("processors") or [])
        elif kind in ("RobertaProcessing", "BertProcessing"):
            before = before or (proc.get("cls") or [None])[0]
            after = after or (proc.get("sep") or [None])[0]
        elif kind == "TemplateProcessing":
            seen_sequence = False
            for piece in proc.get("single") or []:
                if "Sequence" in piece:
                    seen_sequence = True
                elif "SpecialToken" in piece:
                    key = piece["SpecialToken"].get("id")
                    token = ((proc.get("special_tokens") or {}).get(key) or {}).get("tokens", [key])[0]
                    if not seen_sequence:
                        before = before or token
                    else:
                        after = token  # the last one after the text
    return before, after


class TokenCounter:
    """The target tokenizer, one interface whatever its kind: `count` for budgets, `encode`/`decode` and
    `bos_id`/`eos_id` (None when absent) for `.bin` shards, `kind` and `sha256` (of the model file) for
    lineage. Hugging Face tokenizers count without special tokens (`add_special_tokens=False`): a
    document's count is its text alone, as for SentencePiece."""

    def __init__(self, model: bytes, tokenizer_config: bytes | None = None, name: str = "the tokenizer file") -> None:
        """`model`: a SentencePiece model or a tokenizer.json, told apart by content; `tokenizer_config`:
        the tokenizer_config.json beside a tokenizer.json (its `bos_token`/`eos_token`), if any."""
        self.sha256 = sha256_hex(model)
        self.kind = sniff_kind(model)
        backend = _HuggingFace(model, tokenizer_config, name) if self.kind == HUGGINGFACE else _SentencePiece(model, name)
        self._backend = backend
        self.vocab_size: int = backend.vocab_size  # the largest id + 1: what decides uint16 or uint32 shards
        self.bos_id: int | None = backend.bos_id
        self.eos_id: int | None = backend.eos_id

    @classmethod
    def from_storage(cls, storage: Storage) -> "TokenCounter":
        """The published tokenizer, of whichever kind (versions published before kinds were SentencePiece)."""
        pointer = published_tokenizer(storage)
        model, config = _read_version(storage, pointer["prefix"], pointer["info"])
        return cls(model, config, name=storage.uri(pointer["prefix"], model_file(pointer["info"])))

    def count(self, texts: list[str]) -> list[int]:
        return [len(ids) for ids in self.encode(texts)]

    def encode(self, texts: list[str]) -> list[list[int]]:
        """The ids of each text, without special tokens."""
        return self._backend.encode(texts) if texts else []

    def decode(self, ids: list[int]) -> str:
        return self._backend.decode([int(i) for i in ids])


def model_file(info: dict) -> str:
    """The model file of a published version, named after its kind (a version without one is SentencePiece)."""
    return TOKENIZER_MODEL_FILES[info.get("kind", SENTENCEPIECE)]


def _read_version(storage: Storage, prefix: str, info: dict) -> tuple[bytes, bytes | None]:
    model = storage.read_bytes(f"{prefix}/{model_file(info)}")
    config = storage.read_bytes(f"{prefix}/{TOKENIZER_HF_CONFIG}") if info.get("tokenizer_config_sha256") else None
    return model, config


def published_tokenizer(storage: Storage) -> dict:
    """The pointer of the published tokenizer: its info and the `prefix` of its model file."""
    pointer = publish.published(storage, TOKENIZER, legacy_file=TOKENIZER_INFO)
    if pointer is None:
        raise FileNotFoundError(f"{storage.uri(TOKENIZER)} has no published tokenizer: materialize the `tokenizer` asset first")
    if pointer["version"] == publish.LEGACY:
        return {"version": publish.LEGACY, "prefix": TOKENIZER, "info": pointer["legacy_file"]}
    return pointer


def model_key(storage: Storage) -> str:
    pointer = published_tokenizer(storage)
    return f"{pointer['prefix']}/{model_file(pointer['info'])}"


def load_model_file(path: str, storage: Storage) -> bytes:
    """A configured `.model` or `tokenizer.json` from a local path or s3://. Not loaded here: whether it
    is a tokenizer is `check_model`'s to say, on the candidate."""
    if path.startswith("s3://"):
        from synth_cpt.core.storage import S3Storage

        bucket_root, _, key = path.rpartition("/")
        return S3Storage(bucket_root).read_bytes(key)
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"tokenizer.model_file {path} does not exist")
    return p.read_bytes()


def load_tokenizer_config(path: str) -> bytes | None:
    """The tokenizer_config.json beside a configured tokenizer.json, if there is one: it names the model's
    `bos_token`/`eos_token` (transformers reads them from there too)."""
    if path.startswith("s3://"):
        from synth_cpt.core.storage import S3Storage

        bucket_root = path.rpartition("/")[0]
        folder = S3Storage(bucket_root)
        return folder.read_bytes(HF_CONFIG_NAME) if folder.exists(HF_CONFIG_NAME) else None
    beside = Path(path).expanduser().with_name(HF_CONFIG_NAME)
    return beside.read_bytes() if beside.is_file() else None


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
    """The candidate as stored in its version folder: the model file (of the kind its info records) loads
    as that kind, tokenizes sample text, and matches the info written beside it (sha256; no more pieces
    than asked for). Everything is read back and loaded here, so a file that is no tokenizer, or one
    damaged on its way to storage, fails the check."""
    info = storage.read_json(f"{prefix}/{TOKENIZER_INFO}")
    model, config = _read_version(storage, prefix, info)
    sha = sha256_hex(model)
    failures = [] if sha == info.get("sha256") else [f"the stored model's sha256 {sha} differs from its info's {info.get('sha256')}"]
    if config is not None and sha256_hex(config) != info.get("tokenizer_config_sha256"):
        failures.append(f"the stored {HF_CONFIG_NAME} differs from the one its info records")
    what = info.get("model_file") or "the trained model"
    try:
        counter = TokenCounter(model, config, name=what)
    except Exception as exc:  # not a tokenizer at all, or a damaged one
        failures.append(f"model does not load ({what}): {type(exc).__name__}: {exc}")
        return Outcome(False, failures, {"loads": {"success": False}, "sha256": sha})
    if counter.kind != info.get("kind", SENTENCEPIECE):
        failures.append(f"the model is {counter.kind}, its info says {info.get('kind')}")
    counts = counter.count(SAMPLE_TEXTS)
    if min(counts) <= 0:
        failures.append("a sample text produced no tokens")
    requested = info.get("requested_vocab_size")
    if requested and counter.vocab_size > requested:
        failures.append(f"vocab_size {counter.vocab_size} is over the {requested} asked for")
    details = {
        "loads": {"success": True}, "kind": counter.kind, "sha256": sha, "vocab_size": counter.vocab_size,
        "bos_id": counter.bos_id, "eos_id": counter.eos_id, "sample_tokens": counts,
    }  # fmt: skip
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
    tokenizer_config = None
    if tc.model_file:
        model = load_model_file(tc.model_file, storage)
        info = {"source": "model_file", "model_file": tc.model_file, "trained_on_documents": 0}
        if sniff_kind(model) == HUGGINGFACE and (tokenizer_config := load_tokenizer_config(tc.model_file)) is not None:
            info["tokenizer_config_sha256"] = sha256_hex(tokenizer_config)
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
    info["kind"] = sniff_kind(model)  # names the file; check_model says whether it really is one
    info["sha256"] = sha256_hex(model)  # of the bytes made here: the check compares what storage holds
    version = publish.new_version()
    prefix = version_prefix(TOKENIZER, version)
    storage.write_bytes(f"{prefix}/{model_file(info)}", model)
    if tokenizer_config is not None:
        storage.write_bytes(f"{prefix}/{TOKENIZER_HF_CONFIG}", tokenizer_config)
    storage.write_json(f"{prefix}/{TOKENIZER_INFO}", info)
    outcome = validate(storage, prefix)
    if not outcome.success:
        raise CandidateRejected(outcome, publish.reject_version(storage, TOKENIZER, version), "model_loads")
    for measured in ("vocab_size", "bos_id", "eos_id"):
        info[measured] = outcome.details.get(measured)
    publish.publish_version(storage, TOKENIZER, version, {"info": info})
    in_force = published_tokenizer(storage)
    superseded_by = in_force["version"] if in_force["version"] != version else None
    uri = storage.uri(in_force["prefix"], model_file(in_force["info"]))
    return {**info, "version": version, "uri": uri, "outcome": outcome, "superseded_by": superseded_by}
