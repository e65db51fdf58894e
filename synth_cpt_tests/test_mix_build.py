"""Building a training mix from published outputs: manifests agree with shards, every format reads back."""

import hashlib
import json
import os

import numpy as np
import polars as pl
import pytest

from synth_cpt.core.config import MixComponent, MixRecipe
from synth_cpt.core.layout import partition_file
from synth_cpt.core.storage import LocalStorage
from synth_cpt.core.validation import Outcome
from synth_cpt.corpus.tokenizer import TokenCounter, train_model
from synth_cpt.mix.build import MANIFEST, REPEATS, build_mix
from synth_cpt.mix.plan import MixShortfall
from synth_cpt.mix.shards import decode_token_shard, read_jsonl_zst, read_token_shard
from synth_cpt.synthesis.outputs import publish_tables

from .conftest import EN_TEXT, PT_TEXT


@pytest.fixture(scope="module")
def tokenizer():
    return TokenCounter(train_model([PT_TEXT, EN_TEXT] * 30, vocab_size=400, seed=1, character_coverage=1.0))


def originals_frame() -> pl.DataFrame:
    """Ten pt|high subset documents of growing length, from two drops."""
    return pl.DataFrame(
        {
            "doc_id": [f"d{i}" for i in range(10)],
            "drop_id": ["drop-a"] * 5 + ["drop-b"] * 5,
            "text": [f"Documento {i}. " + PT_TEXT[: 60 + 20 * i] for i in range(10)],
            "language": ["pt"] * 10,
            "quality": ["high"] * 10,
        }  # fmt: skip
    )


def corpus(tmp_path, n_synthetic: int = 12):
    storage = LocalStorage(tmp_path / "home")
    originals = originals_frame()
    storage.write_parquet(partition_file("quality_subsets", "pt", "high"), originals)
    rows = pl.DataFrame(
        {
            "synth_id": [f"s{i}" for i in range(n_synthetic)],
            "doc_id": [f"d{i % 10}" for i in range(n_synthetic)],
            "drop_id": ["drop-a"] * n_synthetic,
            "text": [f"Reescrita {i}: " + PT_TEXT[: 100 + 10 * i] for i in range(n_synthetic)],
            "prompt_sha": ["p-easy"] * n_synthetic,
            "model_fingerprint": ["fp"] * n_synthetic,
        }  # fmt: skip
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
        got = {
            r["origin"]: (r["documents"], r["tokens"])
            for r in frame.group_by("origin").agg(pl.len().alias("documents"), pl.col("n_tokens").sum().alias("tokens")).to_dicts()
        }
        assert got == {o: (v["documents"], v["tokens"]) for o, v in entry["by_origin"].items()}
        assert entry["tokens"] <= 250 or entry["documents"] == 1
    everything = pl.concat(frames)
    assert everything["n_tokens"].to_list() == tokenizer.count(everything["text"].to_list()), "counted with the project tokenizer"
    for origin, target in {"original": 450, "rewrite:easy": 450}.items():
        tokens = manifest["by_origin"][origin]["tokens"]
        biggest = max(tokenizer.count((originals if origin == "original" else rows)["text"].to_list()))
        assert target - biggest < tokens <= target, (origin, tokens)
    assert (
        manifest["drops"] == ["drop-a", "drop-b"]
        and manifest["prompt_shas"] == ["p-easy"]
        and manifest["tokenizer_sha"] == tokenizer.sha256
    )
    repeats = pl.read_parquet(folder / REPEATS)
    assert repeats.filter(pl.col("origin") == "original")["repeats"].max() <= 3
    assert repeats["repeats"].sum() == everything.height
    # the other formats hold the same rows in the same order
    for k, frame in enumerate(frames):
        assert [r["text"] for r in read_jsonl_zst((folder / f"shard-{k:05d}.jsonl.zst").read_bytes())] == frame["text"].to_list()
        assert decode_token_shard(folder / f"shard-{k:05d}.bin", tokenizer) == [
            tokenizer.decode(ids) for ids in tokenizer.encode(frame["text"].to_list())
        ]
    # the same inputs and seed make the same mix: every shard and the manifest (but its version name)
    again = build_mix(storage, "demo", recipe(), "pt", "high", tokenizer)
    other = tmp_path / "home" / again.pointer["prefix"]
    assert again.pointer["prefix"] != result.pointer["prefix"]
    for k, frame in enumerate(frames):
        assert pl.read_parquet(other / f"shard-{k:05d}.parquet").equals(frame)
        assert (other / f"shard-{k:05d}.bin").read_bytes() == (folder / f"shard-{k:05d}.bin").read_bytes()
    assert {**json.loads((other / MANIFEST).read_text()), "version": None} == {**manifest, "version": None}


def test_the_manifest_counts_the_tokens_a_bin_shard_holds(tmp_path, tokenizer):
    """A `.bin` shard holds `[BOS] ids EOS` per document: `tokens_in_file` is every id in the file,
    `tokens` the documents' own (n_tokens), and the two differ by the framing exactly."""
    storage, _, _ = corpus(tmp_path)
    result = build_mix(storage, "demo", recipe(), "pt", "high", tokenizer)
    folder = tmp_path / "home" / result.pointer["prefix"]
    manifest = json.loads((folder / MANIFEST).read_text())
    layout = manifest["token_shards"]
    framing = 1 + (layout["bos_id"] is not None)
    assert layout["bos_id"] == tokenizer.bos_id and framing == 2, "the trained SentencePiece model has a BOS distinct from its EOS"
    for entry in manifest["shards"]:
        ids = np.fromfile(folder / f"shard-{entry['shard']:05d}.bin", dtype=np.dtype(layout["dtype"]).newbyteorder("<"))
        docs = read_token_shard(folder / f"shard-{entry['shard']:05d}.bin", layout["vocab_size"])
        frame = pl.read_parquet(folder / f"shard-{entry['shard']:05d}.parquet")
        assert entry["tokens_in_file"] == ids.size == sum(len(d) for d in docs)
        assert entry["tokens"] == frame["n_tokens"].sum() == ids.size - framing * entry["documents"]
        assert [int(d[0]) for d in docs] == [layout["bos_id"]] * frame.height and [int(d[-1]) for d in docs] == [
            layout["eos_id"]
        ] * frame.height
    assert manifest["tokens_in_files"] == sum(e["tokens_in_file"] for e in manifest["shards"])
    assert manifest["tokens"] == sum(e["tokens"] for e in manifest["shards"]) and "tokens_in_file" in manifest["token_counts"]


def test_a_mix_that_cannot_be_made_says_so_before_writing(tmp_path, tokenizer):
    storage, originals, rows = corpus(tmp_path, n_synthetic=1)
    with pytest.raises(MixShortfall, match=r"rewrite:easy: needs 450 tokens, .* short by"):
        build_mix(storage, "demo", recipe(), "pt", "high", tokenizer)
    assert not (tmp_path / "home" / "training_mix_demo").exists(), "nothing written"
    shrunk = build_mix(storage, "demo", recipe(on_shortfall="shrink"), "pt", "high", tokenizer)
    (only,) = tokenizer.count(rows["text"].to_list())
    assert shrunk.outcome.success and shrunk.plan.shrunk and shrunk.manifest["plan"]["shortfalls"] == {"rewrite:easy": 450 - only}
    by = shrunk.manifest["by_origin"]
    largest = max(tokenizer.count(originals["text"].to_list()) + [only])
    assert abs(by["original"]["tokens"] - by["rewrite:easy"]["tokens"]) < largest, "ratio kept at 1:1 (within a document)"
    with pytest.raises(MixShortfall, match="rewrite:hard: needs"):
        build_mix(
            storage,
            "x",
            recipe(components=(MixComponent(source="originals"), MixComponent(source="rewrite:hard"))),
            "pt",
            "high",
            tokenizer,
        )


def test_a_build_rewrites_the_snapshot_it_pins_even_when_one_exists(tmp_path, tokenizer):
    """A gc planned before this build's pins may be about to remove the existing snapshot; it leaves one
    written within its grace alone, so the build writes it again after its pins (same bytes)."""
    storage, _, _ = corpus(tmp_path)
    first = build_mix(storage, "demo", recipe(), "pt", "high", tokenizer)
    pin = next(i for i in first.manifest["inputs"] if i["component"] == "original")
    path = storage.path(pin["prefix"])
    os.utime(path, (946684800, 946684800))  # as written in 2000
    second = build_mix(storage, "demo", recipe(), "pt", "high", tokenizer)
    assert next(i for i in second.manifest["inputs"] if i["component"] == "original") == pin
    assert path.stat().st_mtime > 946684800 and hashlib.sha256(path.read_bytes()).hexdigest() == pin["sha256"]
