"""Building a training mix from published outputs: manifests agree with shards, every format reads back."""

import json

import polars as pl
import pytest

from synth_cpt.core.config import MixComponent, MixRecipe
from synth_cpt.core.layout import partition_file
from synth_cpt.core.storage import LocalStorage
from synth_cpt.core.validation import Outcome
from synth_cpt.corpus.tokenizer import TokenCounter, train_model
from synth_cpt.mix.build import MANIFEST, REPEATS, build_mix
from synth_cpt.mix.plan import MixShortfall
from synth_cpt.mix.shards import decode_token_shard, read_jsonl_zst
from synth_cpt.synthesis.outputs import publish_tables

from .conftest import EN_TEXT, PT_TEXT


@pytest.fixture(scope="module")
def tokenizer():
    return TokenCounter(train_model([PT_TEXT, EN_TEXT] * 30, vocab_size=400, seed=1, character_coverage=1.0))


def corpus(tmp_path, n_synthetic: int = 12):
    storage = LocalStorage(tmp_path / "home")
    originals = pl.DataFrame(
        {"doc_id": [f"d{i}" for i in range(10)], "drop_id": ["drop-a"] * 5 + ["drop-b"] * 5,
         "text": [f"Documento {i}. " + PT_TEXT[: 60 + 20 * i] for i in range(10)], "language": ["pt"] * 10, "quality": ["high"] * 10}  # fmt: skip
    )
    storage.write_parquet(partition_file("quality_subsets", "pt", "high"), originals)
    rows = pl.DataFrame(
        {"synth_id": [f"s{i}" for i in range(n_synthetic)], "doc_id": [f"d{i % 10}" for i in range(n_synthetic)],
         "drop_id": ["drop-a"] * n_synthetic, "text": [f"Reescrita {i}: " + PT_TEXT[: 100 + 10 * i] for i in range(n_synthetic)],
         "prompt_sha": ["p-easy"] * n_synthetic, "model_fingerprint": ["fp"] * n_synthetic}  # fmt: skip
    )
    publish_tables(storage, "rewrites_easy", "pt", "high", {"rows.parquet": rows}, {"ok": Outcome(True)}, {})
    return storage, originals, rows


def recipe(**kw):
    base = dict(components=(MixComponent(source="originals", max_epochs=3), MixComponent(source="rewrite:easy", ratio=1)),
                target_tokens=900, shard_tokens=250, formats=("parquet", "jsonl.zst", "tokens"), seed=7)  # fmt: skip
    return MixRecipe(**{**base, **kw})


def test_mix_meets_targets_and_its_manifest_agrees_with_its_shards(tmp_path, tokenizer):
    storage, originals, rows = corpus(tmp_path)
    result = build_mix(storage, "demo", recipe(), "pt", "high", tokenizer)
    assert result.outcome.success, result.outcome.failures
    folder = tmp_path / "home" / result.pointer["prefix"]
    manifest = json.loads((folder / MANIFEST).read_text())
    shards = sorted(folder.glob("shard-*.parquet"))
    assert len(shards) == len(manifest["shards"]) >= 2
    frames = [pl.read_parquet(p) for p in shards]
    for entry, frame in zip(manifest["shards"], frames, strict=True):
        assert entry["documents"] == frame.height and entry["tokens"] == frame["n_tokens"].sum()
        got = {r["origin"]: (r["documents"], r["tokens"]) for r in frame.group_by("origin").agg(pl.len().alias("documents"), pl.col("n_tokens").sum().alias("tokens")).to_dicts()}
        assert got == {o: (v["documents"], v["tokens"]) for o, v in entry["by_origin"].items()}
        assert entry["tokens"] <= 250 or entry["documents"] == 1
    everything = pl.concat(frames)
    assert everything["n_tokens"].to_list() == tokenizer.count(everything["text"].to_list()), "counted with the project tokenizer"
    for origin, target in {"original": 450, "rewrite:easy": 450}.items():
        tokens = manifest["by_origin"][origin]["tokens"]
        biggest = max(tokenizer.count((originals if origin == "original" else rows)["text"].to_list()))
        assert target - biggest < tokens <= target, (origin, tokens)
    assert manifest["drops"] == ["drop-a", "drop-b"] and manifest["prompt_shas"] == ["p-easy"] and manifest["tokenizer_sha"] == tokenizer.sha256
    repeats = pl.read_parquet(folder / REPEATS)
    assert repeats.filter(pl.col("origin") == "original")["repeats"].max() <= 3
    assert repeats["repeats"].sum() == everything.height
    # the other formats hold the same rows in the same order
    for k, frame in enumerate(frames):
        assert [r["text"] for r in read_jsonl_zst((folder / f"shard-{k:05d}.jsonl.zst").read_bytes())] == frame["text"].to_list()
        assert decode_token_shard(folder / f"shard-{k:05d}.bin", tokenizer) == [tokenizer.decode(ids) for ids in tokenizer.encode(frame["text"].to_list())]
    # the same inputs and seed make the same mix
    again = build_mix(storage, "demo", recipe(), "pt", "high", tokenizer)
    assert pl.read_parquet(tmp_path / "home" / again.pointer["prefix"] / "shard-00000.parquet").equals(frames[0])


def test_a_mix_that_cannot_be_made_says_so_before_writing(tmp_path, tokenizer):
    storage, _, _ = corpus(tmp_path, n_synthetic=1)
    with pytest.raises(MixShortfall, match=r"rewrite:easy: needs 450 tokens, .* short by"):
        build_mix(storage, "demo", recipe(), "pt", "high", tokenizer)
    assert not (tmp_path / "home" / "training_mix_demo").exists(), "nothing written"
    shrunk = build_mix(storage, "demo", recipe(on_shortfall="shrink"), "pt", "high", tokenizer)
    assert shrunk.outcome.success and shrunk.plan.shrunk and shrunk.manifest["plan"]["shortfalls"]["rewrite:easy"] > 0
    by = shrunk.manifest["by_origin"]
    assert abs(by["original"]["tokens"] - by["rewrite:easy"]["tokens"]) < 200, "ratio kept at 1:1 (within a document)"
    with pytest.raises(MixShortfall, match="rewrite:hard: needs"):
        build_mix(storage, "x", recipe(components=(MixComponent(source="originals"), MixComponent(source="rewrite:hard"))), "pt", "high", tokenizer)
