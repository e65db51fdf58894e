"""The target tokenizer of either kind (SentencePiece `.model`, Hugging Face `tokenizer.json`): kind by
content, exact counts, the published asset's kind and hash, and `.bin` shards in the target's ids.

Nothing is downloaded: the Hugging Face tokenizers are trained here with the `tokenizers` library, the
SentencePiece one with `corpus.tokenizer.train_model`. Expected ids always come from a tokenizer loaded
independently from the file (`tokenizers.Tokenizer.from_file`), never from the code under test.
"""

import hashlib
import json
import re

import numpy as np
import polars as pl
import pytest
import yaml
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from synth_cpt.core.layout import TOKENIZER_HF_CONFIG, TOKENIZER_HF_MODEL, TOKENIZER_INFO, TOKENIZER_MODEL
from synth_cpt.core.publish import CandidateRejected
from synth_cpt.core.storage import LocalStorage
from synth_cpt.corpus.tokenizer import (
    HUGGINGFACE,
    SENTENCEPIECE,
    NotATokenizer,
    TokenCounter,
    build_tokenizer,
    detect_kind,
    published_tokenizer,
    train_model,
)
from synth_cpt.mix.shards import decode_token_shard, token_dtype, write_shard

from .conftest import EN_TEXT, PT_TEXT, make_config

TEXTS = [PT_TEXT, EN_TEXT, "Olá, mundo! Ação, coração e pão. 🙂", "x"]


def bpe_tokenizer(special_tokens: list[str], template: str | None = None) -> Tokenizer:
    """A small byte-level BPE (decodes back to the exact text), trained on the test sentences."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=special_tokens, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator([PT_TEXT, EN_TEXT] * 5, trainer)
    if template:
        tok.post_processor = processors.TemplateProcessing(
            single=template, special_tokens=[(t, tok.token_to_id(t)) for t in special_tokens]
        )
    return tok


def save(tok: Tokenizer, path) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return path.read_bytes()


@pytest.fixture(scope="module")
def sp_model() -> bytes:
    return train_model([PT_TEXT, EN_TEXT] * 30, vocab_size=400, seed=1, character_coverage=1.0)


@pytest.fixture
def hf_file(tmp_path):
    """A tokenizer.json with `<s>`/`</s>` that its post-processor adds around every sequence."""
    path = tmp_path / "target" / "tokenizer.json"
    save(bpe_tokenizer(["<s>", "</s>"], "<s> $A </s>"), path)
    return path


# -- which kind a file is ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("junk", "says"),
    [
        (b"not a tokenizer at all", "junk.bin is neither a SentencePiece model (protobuf) nor a Hugging Face tokenizer.json (JSON): "),
        (b"", "junk.bin is empty: neither a SentencePiece model nor a Hugging Face tokenizer.json"),
        (b'{"eos_token": "</s>"}', "junk.bin is JSON without a tokenizer `model`: not a Hugging Face tokenizer.json"),
        (b'{"model": ', "junk.bin starts like JSON but does not parse as JSON, and is neither a SentencePiece model"),
    ],
)
def test_what_is_no_tokenizer_is_refused_saying_what_it_is(junk, says):
    with pytest.raises(NotATokenizer, match="^/somewhere/" + re.escape(says)):
        detect_kind(junk, "/somewhere/junk.bin")


def test_the_kind_is_told_by_content_not_by_suffix(tmp_path, sp_model, hf_file):
    swapped_sp, swapped_hf = tmp_path / "really-sentencepiece.json", tmp_path / "really-hf.model"
    swapped_sp.write_bytes(sp_model)
    swapped_hf.write_bytes(hf_file.read_bytes())
    assert detect_kind(swapped_sp.read_bytes(), str(swapped_sp)) == SENTENCEPIECE
    assert detect_kind(swapped_hf.read_bytes(), str(swapped_hf)) == HUGGINGFACE
    assert TokenCounter(swapped_hf.read_bytes()).kind == HUGGINGFACE and TokenCounter(sp_model).kind == SENTENCEPIECE


def test_a_configured_file_that_is_no_tokenizer_is_rejected_naming_it(tmp_path):
    (tmp_path / "tokenizer.json").write_text(json.dumps({"eos_token": "</s>"}))  # a tokenizer_config.json under the wrong name
    cfg = make_config(tmp_path, tokenizer={"model_file": str(tmp_path / "tokenizer.json")})
    with pytest.raises(CandidateRejected, match=r"model does not load \(.*tokenizer\.json\).*not a Hugging Face tokenizer\.json"):
        build_tokenizer(LocalStorage(tmp_path / "home"), cfg, [])
    assert not (tmp_path / "home" / "tokenizer" / "current.json").exists()
    (kept,) = (tmp_path / "home" / "_rejected" / "tokenizer" / "v").iterdir()
    assert (kept / TOKENIZER_HF_MODEL).read_bytes() == (tmp_path / "tokenizer.json").read_bytes(), "kept, under its kind's name"


# -- counts ----------------------------------------------------------------------------------------------


def test_counts_are_the_tokenizers_own_without_special_tokens(hf_file):
    reference = Tokenizer.from_file(str(hf_file))
    counter = TokenCounter(hf_file.read_bytes())
    expected = [len(reference.encode(t, add_special_tokens=False).ids) for t in TEXTS]
    assert counter.count(TEXTS) == expected
    assert counter.encode(TEXTS) == [reference.encode(t, add_special_tokens=False).ids for t in TEXTS]
    assert expected != [len(reference.encode(t).ids) for t in TEXTS], "the post-processor adds <s> </s>: the test tells them apart"
    assert counter.count([]) == [] and counter.encode([]) == []


def test_a_truncation_set_in_the_file_does_not_cut_counts(tmp_path):
    tok = bpe_tokenizer(["</s>"])
    full = [len(tok.encode(t, add_special_tokens=False).ids) for t in TEXTS]
    tok.enable_truncation(max_length=4)
    counter = TokenCounter(save(tok, tmp_path / "tokenizer.json"))
    assert max(full) > 4 and counter.count(TEXTS) == full


# -- BOS and EOS -----------------------------------------------------------------------------------------


def test_bos_and_eos_come_from_config_then_post_processor_then_well_known_names(tmp_path, hf_file):
    framed = TokenCounter(hf_file.read_bytes())
    reference = Tokenizer.from_file(str(hf_file))
    assert (framed.bos_id, framed.eos_id) == (reference.token_to_id("<s>"), reference.token_to_id("</s>"))

    # Qwen style: no BOS, two EOS candidates; the well-known names are tried in their documented order
    qwen = bpe_tokenizer(["<|endoftext|>", "<|im_end|>"])
    counter = TokenCounter(save(qwen, tmp_path / "qwen" / "tokenizer.json"))
    assert counter.bos_id is None and counter.eos_id == qwen.token_to_id("<|endoftext|>")

    # tokenizer_config.json beside it wins (an instruct model's eos); `null` there means no BOS even if `<s>` exists
    config = json.dumps({"eos_token": {"content": "<|im_end|>"}, "bos_token": None}).encode()
    both = bpe_tokenizer(["<s>", "<|endoftext|>", "<|im_end|>"])
    counter = TokenCounter(save(both, tmp_path / "both" / "tokenizer.json"), config)
    assert counter.bos_id is None and counter.eos_id == both.token_to_id("<|im_end|>")
    with pytest.raises(NotATokenizer, match="eos_token '<missing>'"):
        TokenCounter(save(both, tmp_path / "both" / "tokenizer.json"), json.dumps({"eos_token": "<missing>"}).encode())

    # Llama 3 style: the post-processor puts <|begin_of_text|> first, EOS comes from the names
    llama = bpe_tokenizer(["<|begin_of_text|>", "<|end_of_text|>"], "<|begin_of_text|> $A")
    llama.post_processor = processors.Sequence([processors.ByteLevel(trim_offsets=False), llama.post_processor])
    counter = TokenCounter(save(llama, tmp_path / "llama" / "tokenizer.json"))
    assert counter.bos_id == llama.token_to_id("<|begin_of_text|>") and counter.eos_id == llama.token_to_id("<|end_of_text|>")


# -- the published tokenizer asset -----------------------------------------------------------------------


def test_the_published_tokenizer_records_its_kind_and_file_sha256(tmp_path, hf_file, sp_model):
    storage = LocalStorage(tmp_path / "home")
    (hf_file.parent / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>", "bos_token": None}))
    info = build_tokenizer(storage, make_config(tmp_path, tokenizer={"model_file": str(hf_file)}), [])
    expected_sha = hashlib.sha256(hf_file.read_bytes()).hexdigest()
    pointer = published_tokenizer(storage)
    assert info["kind"] == pointer["info"]["kind"] == HUGGINGFACE
    assert info["sha256"] == pointer["info"]["sha256"] == expected_sha
    folder = tmp_path / "home" / pointer["prefix"]
    assert (folder / TOKENIZER_HF_MODEL).read_bytes() == hf_file.read_bytes(), "published under its own name, tokenizer.json"
    assert (folder / TOKENIZER_HF_CONFIG).read_bytes() == (hf_file.parent / "tokenizer_config.json").read_bytes()
    assert json.loads((folder / TOKENIZER_INFO).read_text())["kind"] == HUGGINGFACE
    assert info["uri"].endswith(TOKENIZER_HF_MODEL)
    reader = TokenCounter.from_storage(storage)
    assert (reader.kind, reader.sha256, reader.bos_id) == (HUGGINGFACE, expected_sha, None), "the config beside it travelled with it"
    assert reader.count(TEXTS) == [len(Tokenizer.from_file(str(hf_file)).encode(t, add_special_tokens=False).ids) for t in TEXTS]

    (tmp_path / "t.model").write_bytes(sp_model)
    info = build_tokenizer(storage, make_config(tmp_path, tokenizer={"model_file": str(tmp_path / "t.model")}), [])
    pointer = published_tokenizer(storage)
    assert info["kind"] == pointer["info"]["kind"] == SENTENCEPIECE and info["sha256"] == hashlib.sha256(sp_model).hexdigest()
    assert (tmp_path / "home" / pointer["prefix"] / TOKENIZER_MODEL).read_bytes() == sp_model
    assert TokenCounter.from_storage(storage).kind == SENTENCEPIECE


def test_a_version_published_before_kinds_is_read_as_sentencepiece(tmp_path, sp_model):
    from synth_cpt.core import publish
    from synth_cpt.core.layout import TOKENIZER, version_prefix

    storage = LocalStorage(tmp_path / "home")
    version = publish.new_version()
    storage.write_bytes(f"{version_prefix(TOKENIZER, version)}/{TOKENIZER_MODEL}", sp_model)
    publish.publish_version(storage, TOKENIZER, version, {"info": {"source": "trained", "sha256": hashlib.sha256(sp_model).hexdigest()}})
    reader = TokenCounter.from_storage(storage)
    assert reader.kind == SENTENCEPIECE and reader.sha256 == hashlib.sha256(sp_model).hexdigest()


def test_the_tokenizer_asset_metadata_has_kind_and_sha256(tmp_path, monkeypatch, hf_file):
    from dagster import AssetKey, DagsterInstance

    cfg = tmp_path / "pipeline-target-tokenizer.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "storage_root": str(tmp_path / "home"),
                "drops": {"location": str(tmp_path / "drops"), "settle_seconds": 0},
                "tokenizer": {"model_file": str(hf_file)},
            }
        )
    )
    monkeypatch.setenv("SYNTH_CPT_CONFIG", str(cfg))
    monkeypatch.delenv("SYNTH_CPT_HOME", raising=False)
    monkeypatch.delenv("SYNTH_CPT_DROPS", raising=False)
    from synth_cpt.defs.definitions import build_definitions

    defs = build_definitions()
    with DagsterInstance.ephemeral() as instance:
        assert defs.resolve_job_def("tokenizer_job").execute_in_process(instance=instance).success
        event = instance.get_latest_materialization_event(AssetKey("tokenizer"))
    metadata = {k: v.value for k, v in event.asset_materialization.metadata.items()}
    reference = Tokenizer.from_file(str(hf_file))
    assert metadata["kind"] == HUGGINGFACE and metadata["sha256"] == hashlib.sha256(hf_file.read_bytes()).hexdigest()
    assert (metadata["bos_id"], metadata["eos_id"]) == (reference.token_to_id("<s>"), reference.token_to_id("</s>"))


# -- .bin token shards -----------------------------------------------------------------------------------


def read_bin(folder, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    return np.fromfile(folder / "shard-00000.bin", dtype=dtype), np.fromfile(folder / "shard-00000.idx", dtype="<i8")


def test_a_bin_shard_holds_the_target_ids_framed_by_its_bos_and_eos(tmp_path, hf_file):
    reference = Tokenizer.from_file(str(hf_file))
    bos, eos = reference.token_to_id("<s>"), reference.token_to_id("</s>")
    counter = TokenCounter(hf_file.read_bytes())
    storage = LocalStorage(tmp_path / "home")
    write_shard(storage, "mix", 0, pl.DataFrame({"text": TEXTS}), "tokens", counter)
    tokens, offsets = read_bin(tmp_path / "home" / "mix", "<u2")
    docs = [[bos, *reference.encode(t, add_special_tokens=False).ids, eos] for t in TEXTS]
    assert tokens.tolist() == [t for doc in docs for t in doc]
    assert offsets.tolist() == np.cumsum([0, *map(len, docs)]).tolist()
    assert decode_token_shard(tmp_path / "home" / "mix" / "shard-00000.bin", counter) == TEXTS, "byte-level BPE decodes back exactly"


def test_a_tokenizer_without_bos_writes_ids_then_eos(tmp_path):
    qwen = bpe_tokenizer(["<|endoftext|>", "<|im_end|>"])
    path = tmp_path / "tokenizer.json"
    counter = TokenCounter(save(qwen, path))
    reference = Tokenizer.from_file(str(path))
    storage = LocalStorage(tmp_path / "home")
    write_shard(storage, "mix", 0, pl.DataFrame({"text": TEXTS}), "tokens", counter)
    tokens, _ = read_bin(tmp_path / "home" / "mix", "<u2")
    eos = reference.token_to_id("<|endoftext|>")
    assert tokens.tolist() == [t for text in TEXTS for t in (*reference.encode(text, add_special_tokens=False).ids, eos)]
    assert decode_token_shard(tmp_path / "home" / "mix" / "shard-00000.bin", counter) == TEXTS


def test_a_sentencepiece_shard_is_framed_the_same_way(tmp_path, sp_model):
    import sentencepiece as spm

    reference = spm.SentencePieceProcessor(model_proto=sp_model)
    counter = TokenCounter(sp_model)
    write_shard(LocalStorage(tmp_path / "home"), "mix", 0, pl.DataFrame({"text": TEXTS}), "tokens", counter)
    tokens, _ = read_bin(tmp_path / "home" / "mix", "<u2")
    bos, eos = reference.bos_id(), reference.eos_id()
    assert bos >= 0 and bos != eos
    assert tokens.tolist() == [t for text in TEXTS for t in (bos, *reference.encode(text), eos)]
    assert decode_token_shard(tmp_path / "home" / "mix" / "shard-00000.bin", counter) == [
        reference.decode(reference.encode(t)) for t in TEXTS
    ]


def test_a_vocabulary_over_65535_ids_writes_uint32(tmp_path):
    words = {"[UNK]": 0, **{f"w{i}": i for i in range(1, 70_000)}}
    tok = Tokenizer(models.WordLevel(words, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["</s>"])
    counter = TokenCounter(save(tok, tmp_path / "tokenizer.json"))
    assert counter.vocab_size == 70_001 and token_dtype(counter.vocab_size) == np.dtype("<u4")
    texts = ["w69999 w1 w65536", "w7"]
    write_shard(LocalStorage(tmp_path / "home"), "mix", 0, pl.DataFrame({"text": texts}), "tokens", counter)
    tokens, offsets = read_bin(tmp_path / "home" / "mix", "<u4")
    assert tokens.tolist() == [69999, 1, 65536, 70000, 7, 70000] and offsets.tolist() == [0, 4, 6]
    assert decode_token_shard(tmp_path / "home" / "mix" / "shard-00000.bin", counter) == texts


def test_the_largest_id_decides_the_vocabulary_size_not_the_number_of_tokens(tmp_path):
    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1, "b": 70_000}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["</s>"])
    counter = TokenCounter(save(tok, tmp_path / "tokenizer.json"))
    assert tok.get_vocab_size() < 10 and counter.vocab_size == 70_001
    write_shard(LocalStorage(tmp_path / "home"), "mix", 0, pl.DataFrame({"text": ["a b"]}), "tokens", counter)
    assert read_bin(tmp_path / "home" / "mix", "<u4")[0].tolist() == [1, 70_000, counter.eos_id]


def test_a_mix_built_with_a_tokenizer_json_counts_and_shards_in_its_ids(tmp_path, hf_file):
    from synth_cpt.mix.build import MANIFEST, build_mix

    from .test_mix_build import corpus, recipe

    counter = TokenCounter(hf_file.read_bytes())
    reference = Tokenizer.from_file(str(hf_file))
    storage, _, _ = corpus(tmp_path)
    result = build_mix(storage, "demo", recipe(target_tokens=1600, shard_tokens=600), "pt", "high", counter)
    assert result.outcome.success, result.outcome.failures
    folder = tmp_path / "home" / result.pointer["prefix"]
    manifest = json.loads((folder / MANIFEST).read_text())
    assert manifest["tokenizer_sha"] == hashlib.sha256(hf_file.read_bytes()).hexdigest()
    assert manifest["token_shards"] == {"tokenizer_kind": HUGGINGFACE, "vocab_size": counter.vocab_size, "dtype": "uint16",
                                        "bos_id": reference.token_to_id("<s>"), "eos_id": reference.token_to_id("</s>")}  # fmt: skip
    assert len(manifest["shards"]) > 1, "several shards, each checked below"
    assert sum(e["tokens"] for e in manifest["shards"]) == manifest["tokens"]
    for k in range(len(manifest["shards"])):
        frame = pl.read_parquet(folder / f"shard-{k:05d}.parquet")
        counted = [len(reference.encode(t, add_special_tokens=False).ids) for t in frame["text"]]
        assert frame["n_tokens"].to_list() == counted
        assert manifest["shards"][k]["tokens"] == sum(counted), "the manifest's figure is the reference tokenizer's"
        assert decode_token_shard(folder / f"shard-{k:05d}.bin", counter) == frame["text"].to_list()
