"""The streamed mix build publishes exactly what the in-memory build did (frozen in
benchmarks/baselines/mix_v0.py), reading texts in bounded batches; eval_scores samples without reading
whole tables and scores the same rows."""

from __future__ import annotations

import io
import random

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from benchmarks.baselines import mix_v0
from synth_cpt.core.config import MixComponent, MixRecipe
from synth_cpt.core.layout import partition_file
from synth_cpt.core.storage import LocalStorage
from synth_cpt.core.validation import Outcome
from synth_cpt.corpus.tokenizer import TokenCounter
from synth_cpt.evals import scores
from synth_cpt.mix import build
from synth_cpt.synthesis.outputs import publish_tables

from .conftest import PT_TEXT
from .test_mix_build import originals_frame, tokenizer  # noqa: F401  (fixture)

FORMATS = [("parquet",), ("parquet", "jsonl.zst"), ("parquet", "tokens"), ("parquet", "jsonl.zst", "tokens")]


class EncodeSpyTokenizer(TokenCounter):
    """The real tokenizer, recording how many texts each call encodes (a spy: every count is real)."""

    calls: list[int]

    def encode(self, texts: list[str]) -> list[list[int]]:
        self.calls.append(len(texts))
        return super().encode(texts)


def inputs(tmp_path) -> LocalStorage:
    """Originals from two drop versions (one row group each of 4 rows), two rewrite styles, one an empty text."""
    storage = LocalStorage(tmp_path / "home")
    originals = originals_frame().with_columns(drop_version=pl.Series(["v1"] * 5 + ["v2"] * 5))
    with storage.writing(partition_file("quality_subsets", "pt", "high")) as tmp:
        pq.write_table(originals.to_arrow(), tmp, row_group_size=4)
    for style, n in (("easy", 14), ("hard", 9)):
        rows = pl.DataFrame(
            {
                "synth_id": [f"{style}{i}" for i in range(n)],
                "doc_id": [f"d{i % 10}" for i in range(n)],
                "drop_id": ["drop-a"] * n,
                "drop_version": ["v1"] * n,
                "text": [f"{style} {i}: " + PT_TEXT[: 90 + 13 * i] for i in range(n)],
                "prompt_sha": [f"p-{style}"] * n,
                "model_fingerprint": ["fp"] * n,
            }
        )
        publish_tables(storage, f"rewrites_{style}", "pt", "high", {"rows.parquet": rows}, {"ok": Outcome(True)}, {})
    return storage


def recipe(formats: tuple[str, ...]) -> MixRecipe:
    return MixRecipe(
        components=(
            MixComponent(source="originals", max_epochs=3),
            MixComponent(source="rewrite", ratio=2, styles={"easy": 1, "hard": 1}),
            MixComponent(source="entigraph"),  # never published: missing, and short
        ),
        target_tokens=4000, on_shortfall="take_available", shard_tokens=200, formats=formats, seed=11,
    )  # fmt: skip


def published_files(storage: LocalStorage, result) -> dict[str, bytes]:
    folder = storage.path(result.pointer["prefix"])
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name not in ("manifest.json",)}


def assert_same_repeats(old: bytes, new: bytes) -> None:
    """repeats.parquet is written in row groups as it is gathered: the same rows, in the same order and
    with the same column types, as the in-memory build's one row group (its bytes differ)."""
    before, ours = pq.read_table(io.BytesIO(old)), pq.read_table(io.BytesIO(new))
    assert ours.schema == before.schema and ours.num_rows == before.num_rows > 0
    assert ours.equals(before)


def test_repeats_are_written_a_row_group_at_a_time(tmp_path, tokenizer, monkeypatch):  # noqa: F811
    """Each full row group is written as soon as its ids are gathered, not once the table is whole."""
    storage = inputs(tmp_path)
    before = mix_v0.build_mix(storage, "demo", recipe(("parquet",)), "pt", "high", tokenizer, run_id="r")
    monkeypatch.setattr(build, "REPEATS_GROUP", 4)
    events: list[tuple[str, int]] = []
    write_table = pq.ParquetWriter.write_table

    def recording_write(self, table, *args, **kwargs):
        if table.schema.names == build.REPEATS_SCHEMA.names:  # not a shard's
            events.append(("write", table.num_rows))
        return write_table(self, table, *args, **kwargs)

    class Spool(build.TextSpool):
        def lineage(self, *args):
            frame = super().lineage(*args)
            events.append(("gather", frame.height))
            return frame

    monkeypatch.setattr(pq.ParquetWriter, "write_table", recording_write)
    monkeypatch.setattr(build, "TextSpool", Spool)
    ours = build.build_mix(storage, "demo", recipe(("parquet",)), "pt", "high", tokenizer, run_id="r", batch_rows=3)
    repeats = [e for e in events[len(ours.manifest["shards"]) :]]  # after each shard's one gather
    expected, pending = [], 0
    for _, n in (e for e in repeats if e[0] == "gather"):
        expected.append(("gather", n))
        pending += n
        if pending >= 4:
            expected.append(("write", pending - pending % 4))
            pending %= 4
    expected += [("write", pending)] if pending else []
    assert repeats == expected and sum(n for k, n in repeats if k == "write") > 8, repeats
    old, new = (published_files(storage, r)[build.REPEATS] for r in (before, ours))
    assert_same_repeats(old, new)
    groups = [pq.ParquetFile(io.BytesIO(new)).metadata.row_group(i).num_rows for i in range(pq.ParquetFile(io.BytesIO(new)).num_row_groups)]
    rows = pq.read_metadata(io.BytesIO(old)).num_rows
    assert groups == [4] * (rows // 4) + ([rows % 4] if rows % 4 else []), groups
    assert ours.manifest["repeats"] == before.manifest["repeats"] and ours.manifest["repeats"]["max"] > 1


@pytest.mark.parametrize("formats", FORMATS, ids=["+".join(f) for f in FORMATS])
def test_the_streamed_build_publishes_what_the_in_memory_build_did(tmp_path, tokenizer, formats):  # noqa: F811
    storage = inputs(tmp_path)
    before = mix_v0.build_mix(storage, "demo", recipe(formats), "pt", "high", tokenizer, run_id="r")
    ours = build.build_mix(storage, "demo", recipe(formats), "pt", "high", tokenizer, run_id="r", batch_rows=3)
    assert before.outcome.success and ours.outcome.success, ours.outcome.failures
    assert ours.outcome == before.outcome, "the same suite results, details included"
    old, new = published_files(storage, before), published_files(storage, ours)
    assert sorted(new) == sorted(old) and len([k for k in new if k.endswith(".parquet") and k.startswith("shard-")]) >= 4
    assert [k for k in new if old[k] != new[k] and k != build.REPEATS] == [], "every shard and inputs.json byte for byte"
    assert_same_repeats(old[build.REPEATS], new[build.REPEATS])
    assert {**ours.manifest, "version": None} == {**before.manifest, "version": None}
    assert ours.manifest["missing_components"] == ["entigraph"] and ours.manifest["repeats"]["max"] > 1
    assert {i["version"] for i in ours.manifest["inputs"] if i["asset"] == "crawl_drops"} == {"v1", "v2"}


def test_texts_are_read_counted_and_encoded_in_bounded_batches_once_each(tmp_path, tokenizer):  # noqa: F811
    storage = inputs(tmp_path)
    spy = EncodeSpyTokenizer.__new__(EncodeSpyTokenizer)
    spy.__dict__.update(tokenizer.__dict__, calls=[])
    result = build.build_mix(storage, "demo", recipe(("parquet", "jsonl.zst", "tokens")), "pt", "high", spy, batch_rows=3)
    assert result.outcome.success
    assert max(spy.calls) == 3 and sum(spy.calls) == 10 + 14 + 9, "every component text encoded once, 3 at a time, none again for .bin"
    # a component whose one row group holds more rows than a batch is still read a batch at a time
    component = build.component_rows(storage, "rewrite:easy", "pt", "high")
    assert component is not None and pq.ParquetFile(storage.path(component.texts_key)).metadata.num_row_groups == 1
    with build.component_batches(storage, component, batch_rows=4) as batches:
        sizes = [len(b) for b in batches]
    assert sizes == [4, 4, 4, 2]


def _whole_table_sample(paths: list[str], columns: list[str], limit: int, seed: int) -> pl.DataFrame:
    """The sample as eval_scores drew it by reading every chosen row group whole (the code before streaming)."""
    groups = [(p, g) for p in paths for g in range(pq.ParquetFile(p).metadata.num_row_groups)]
    random.Random(seed).shuffle(groups)
    chosen, taken = [], 0
    for p, g in groups:
        if taken >= limit:
            break
        chosen.append(pl.from_arrow(pq.ParquetFile(p).read_row_group(g, columns=[c for c in columns if c in pq.read_schema(p).names])))
        taken += chosen[-1].height
    sample = pl.concat(chosen, how="diagonal_relaxed")
    return sample.sample(limit, seed=seed) if sample.height > limit else sample


@pytest.mark.parametrize("limit", [1, 7, 23, 40, 500])
def test_eval_samples_read_only_the_sampled_rows_and_are_unchanged(tmp_path, limit):
    storage = LocalStorage(tmp_path)
    rng = random.Random(3)
    keys = []
    for f in range(3):  # three shards of row groups of 9 rows, the last file without the fidelity column
        n = 30 + 5 * f
        table = pa.table(
            {"doc_id": [f"f{f}d{i}" for i in range(n)], "text": [PT_TEXT[: rng.randint(10, 200)] for _ in range(n)],
             "n_tokens": [rng.randint(1, 50) for _ in range(n)], **({"copy_similarity": [rng.random() for _ in range(n)]} if f < 2 else {})}
        )  # fmt: skip
        keys.append(f"mix/shard-{f:05d}.parquet")
        with storage.writing(keys[-1]) as tmp:
            pq.write_table(table, tmp, row_group_size=9)
    found = scores._sample(storage, keys, ["doc_id", "text", "copy_similarity"], limit, 5, None, batch_rows=4)
    expected = _whole_table_sample([str(storage.path(k)) for k in keys], ["doc_id", "text", "copy_similarity"], limit, 5)
    assert found.sample.equals(expected) and found.sample.height == min(limit, 105)
    assert found.rows == 105 and found.tokens == sum(
        pq.read_table(storage.path(k))["n_tokens"].to_pylist()[i] for k in keys for i in range(pq.read_metadata(storage.path(k)).num_rows)
    )


class RecordingSpool(build.TextSpool):
    """The real spool, kept by the test after the build (a spy: it records, every read is real)."""

    made: list[build.TextSpool] = []

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.added: list = []
        RecordingSpool.made.append(self)

    def add(self, *args, **kwargs):
        self.added.append(super().add(*args, **kwargs))
        return self.added[-1]


def test_no_component_string_column_is_held_whole_only_a_batch_or_a_shard(tmp_path, tokenizer, monkeypatch):  # noqa: F811
    """Strings (texts and lineage) are read a batch at a time and gathered back a shard (or, for the repeats
    table, a batch) at a time; what stays per row is numbers only. Exact counts for batch_rows=3."""
    storage = inputs(tmp_path)
    RecordingSpool.made = []
    monkeypatch.setattr(build, "TextSpool", RecordingSpool)
    result = build.build_mix(storage, "demo", recipe(("parquet", "tokens")), "pt", "high", tokenizer, batch_rows=3)
    assert result.outcome.success
    (spool,) = RecordingSpool.made
    # originals: 10 rows in row groups of 4; rewrites: 14 and 9 rows in one row group each
    assert spool.batches == [3, 3, 3, 1] + [3] * 4 + [2] + [3] * 3, spool.batches
    shards = [s["documents"] for s in result.manifest["shards"]]
    repeats = pl.read_parquet(storage.path(f"{result.pointer['prefix']}/{build.REPEATS}")).group_by("origin", maintain_order=True).len()
    by_batch = [min(3, n - a) for n in repeats["len"].to_list() for a in range(0, n, 3)]
    assert spool.gathered == shards + by_batch, "each shard's lineage at once, then the repeats table's 3 at a time"
    assert max(spool.gathered) == 3 < 9 and sum(shards) == result.manifest["documents"] == 32, "never a component's (9 to 14 rows)"
    # the only per-row state kept for the plan: numbers, and a handful of lineage classes
    assert len(spool.classes) == 4, spool.classes  # originals of v1 and v2, one per style
    assert [s.rows for s in spool.added] == [10, 14, 9, 0]
    assert all(v.dtype.kind in "iu" for s in spool.added for v in vars(s).values() if v is not None), "numbers only"


class RecordingParquetFile(pq.ParquetFile):
    """A real ParquetFile recording the rows of every batch it yields (a spy)."""

    seen: list[tuple[str, int]] = []

    def iter_batches(self, *args, **kwargs):
        for batch in super().iter_batches(*args, **kwargs):
            RecordingParquetFile.seen.append((",".join(batch.schema.names), batch.num_rows))
            yield batch


def test_eval_scores_reads_in_bounded_batches(tmp_path, monkeypatch):
    """Totals and samples are read `batch_rows` rows at a time, whatever a row group holds: exact batches."""
    storage = LocalStorage(tmp_path)
    keys = []
    for f, n in enumerate((30, 12)):  # row groups of 9 rows, read 4 at a time
        table = pa.table(
            {"doc_id": [f"f{f}d{i}" for i in range(n)], "text": [PT_TEXT[: 10 + i] for i in range(n)], "n_tokens": list(range(1, n + 1))}
        )
        keys.append(f"mix/shard-{f:05d}.parquet")
        with storage.writing(keys[-1]) as tmp:
            pq.write_table(table, tmp, row_group_size=9)
    RecordingParquetFile.seen = []
    monkeypatch.setattr(storage, "parquet_file", lambda key: RecordingParquetFile(storage.path(key)))
    found = scores._sample(storage, keys, ["doc_id", "text"], 5, 5, None, batch_rows=4)
    assert found.rows == 42 and found.tokens == sum(range(1, 31)) + sum(range(1, 13)) and found.sample.height == 5
    totals = [n for cols, n in RecordingParquetFile.seen if cols == "n_tokens"]
    sampled = [n for cols, n in RecordingParquetFile.seen if cols == "doc_id,text"]
    assert totals == [4] * 7 + [2] + [4] * 3, totals
    assert sampled == [4, 4, 1], "one sampled row group of 9, 4 rows at a time"


def test_lineage_spooled_side_by_side_comes_back_as_it_was(tmp_path):
    """doc_id and synth_id bytes are spooled side by side and split back without a per-row loop; nulls come
    back from the row's lineage class, drop_id and drop_version from it too, in any gathered order."""
    from synth_cpt.mix.spool import TextSpool

    class Counting:
        def count(self, texts):
            return [len(t) for t in texts]

    frame = pl.DataFrame(
        {  # rows 5-8 repeat the classes of rows 4, 2, 1 and 0, out of order, with other ids
            "synth_id": [None, "s1", "", "sé✓", None, None, "s6", "s7", None],
            "doc_id": ["d0", None, "ドキュメント", "", "d4", "d5", "d6", None, "d8"],
            "drop_id": ["a", "a", "b", None, "a", "a", "b", "a", "a"],
            "drop_version": ["v1", "v1", None, None, "v2", "v2", None, "v1", "v1"],
            "prompt_sha": [None, "p", "p", "p", None, None, "p", "p", None],
            "model_fingerprint": [None, "m", "m", "m", None, None, "m", "m", None],
        }
    )
    texts = ["x", "yy", "", "zzz", "w", "v5", "v6", "v7", "v8"]
    batch = frame.with_columns(text=pl.Series(texts)).to_arrow().to_batches()[0]
    spool = TextSpool(tmp_path, with_ids=False)
    try:
        spooled = spool.add([batch.slice(0, 2), batch.slice(2)], Counting(), lambda f: f.drop("text"))
        assert spooled.doc_id_bytes.tolist() == [2, 0, 18, 0, 2, 2, 2, 0, 2] and spooled.synth_id_bytes.tolist() == [
            0,
            2,
            0,
            6,
            0,
            0,
            2,
            2,
            0,
        ]
        assert len(spool.classes) == 5 and spooled.lineage_class.tolist() == [0, 1, 2, 3, 4, 4, 2, 1, 0]
        order = np.array([4, 2, 0, 8, 3, 1, 6, 2, 5, 7])
        back = spool.lineage(*spooled.lineage_of(order))
        assert back.to_dicts() == frame.select("synth_id", "doc_id", "drop_id", "drop_version")[order.tolist()].to_dicts()
        assert spool.texts(spooled.text_start[order], spooled.text_bytes[order]).to_list() == [texts[i] for i in order]
    finally:
        spool.close()
