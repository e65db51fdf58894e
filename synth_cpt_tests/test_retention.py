"""Lineage that outlives re-runs: published versions are kept until `synth-cpt gc` removes them under an
explicit policy, a mix version pins the exact inputs it read, and a shard of an old mix version is
still traced through those inputs; prompt files are archived by their SHA."""

import errno
import hashlib
import json
import os
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import polars as pl
import pytest
import yaml

from synth_cpt.cli import main
from synth_cpt.core import retention
from synth_cpt.core.layout import INPUTS, POINTER, partition_file, published_marker, snapshot_key, version_prefix
from synth_cpt.core.publish import CANDIDATE_GRACE, publish_version, published, published_versions
from synth_cpt.core.retention import Policy, collect, plan_gc
from synth_cpt.core.storage import LocalStorage, StorageWriteError, candidate_name, utc_stamp
from synth_cpt.core.validation import Outcome
from synth_cpt.generation.prompt_archive import archive_prompt, archived_prompt, prompt_key
from synth_cpt.lineage import queries
from synth_cpt.lineage.catalog import Catalog
from synth_cpt.mix.build import MANIFEST, build_mix
from synth_cpt.synthesis.outputs import publish_tables

from .conftest import PT_TEXT
from .doubles import RefusingDeleteTestStorage
from .test_mix_build import originals_frame, recipe, tokenizer  # noqa: F401  (fixture)

PROMPTS = {g: f"name: easy\nkind: rewrite\ndescription: generation {g}\nuser: 'Reescreva: {{{{ text }}}}'\n" for g in range(3)}
SHAS = {g: hashlib.sha256(text.encode()).hexdigest() for g, text in PROMPTS.items()}


def _subset(storage, with_drop_version=False):
    frame = originals_frame()
    if with_drop_version:
        frame = frame.with_columns(
            pl.when(pl.col("drop_id") == "drop-a").then(pl.lit("va1")).otherwise(pl.lit("vb1")).alias("drop_version")
        )
    storage.write_parquet(partition_file("quality_subsets", "pt", "high"), frame)


def _rewrites(storage, generation, with_drop_version=False):
    """One generation of rewrites_easy: its rows name the prompt file of that generation."""
    rows = pl.DataFrame(
        {
            "synth_id": [f"g{generation}-s{i}" for i in range(12)],
            "doc_id": [f"d{i % 10}" for i in range(12)],
            "drop_id": ["drop-a"] * 12,
            "text": [f"Reescrita {generation}.{i}: " + PT_TEXT[: 100 + 10 * i] for i in range(12)],
            "prompt_sha": [SHAS[generation]] * 12,
            "model_fingerprint": [f"fp{generation}"] * 12,
            "request_ids": [[f"r{generation}-{i}"] for i in range(12)],
        }  # fmt: skip
    )
    if with_drop_version:
        rows = rows.with_columns(pl.lit(f"va{generation}").alias("drop_version"))
    return publish_tables(storage, "rewrites_easy", "pt", "high", {"rows.parquet": rows}, {"ok": Outcome(True)}, {})


def _three_generations(tmp_path, tokenizer, with_drop_version=False):  # noqa: F811
    """Three rounds of (re-)synthesis, each followed by a re-mix: mix versions m0 < m1 < m2."""
    storage = LocalStorage(tmp_path / "home")
    _subset(storage, with_drop_version)
    rewrites, mixes = [], []
    for g in range(3):
        rewrites.append(_rewrites(storage, g, with_drop_version)["prefix"])
        archive_prompt(storage, SHAS[g], PROMPTS[g])
        result = build_mix(storage, "demo", recipe(), "pt", "high", tokenizer, run_id=f"run-{g}")
        assert result.outcome.success, result.outcome.failures
        mixes.append(result.pointer["prefix"])
    return storage, rewrites, mixes


def test_publishing_keeps_every_published_version_and_drops_only_old_candidates(tmp_path):
    storage = LocalStorage(tmp_path)
    old = [f"2000010{d}T000000000000-0000000{d}" for d in (1, 2, 3)]
    crashed = "20000101T120000000000-deadbeef"  # never published, long past the grace
    storage.write_bytes(f"{version_prefix('out', crashed)}/rows.parquet", b"x")
    for v in old:  # each written, then published
        storage.write_bytes(f"{version_prefix('out', v)}/rows.parquet", b"x")
        assert publish_version(storage, "out", v, {})
    assert published_versions(storage, "out") == old, "the first version outlives two re-publishes"
    assert not storage.list(version_prefix("out", crashed)), "a never-published folder past the grace goes"
    assert published(storage, "out")["version"] == old[-1]


class FullAtPointerTestStorage(LocalStorage):
    """Test double: local storage whose disk is full when the pointer is written (as `writing` reports it)."""

    def write_bytes(self, key, data):
        if key.endswith(f"/{POINTER}"):
            raise StorageWriteError(errno.ENOSPC, f"could not write {self.uri(key)}: No space left on device (ENOSPC)")
        return super().write_bytes(key, data)


def test_a_publish_whose_pointer_write_fails_claims_no_version(tmp_path):
    """Disk full at the pointer: the marker written just before is taken back, so the version is not listed
    as published and the next publish may clean it like any candidate; a version published before keeps its
    marker even when re-publishing it fails."""
    first, failed, later = (f"2000010{d}T000000000000-0000000{d}" for d in (1, 2, 3))
    LocalStorage(tmp_path).write_bytes(f"{version_prefix('out', first)}/rows.parquet", b"x")
    assert publish_version(LocalStorage(tmp_path), "out", first, {})
    full = FullAtPointerTestStorage(tmp_path)
    full.write_bytes(f"{version_prefix('out', failed)}/rows.parquet", b"x")
    with pytest.raises(StorageWriteError):
        publish_version(full, "out", failed, {})
    print("markers after the failed publish:", full.list("out/_published"))
    assert full.list("out/_published") == [published_marker("out", first)]
    assert published_versions(full, "out") == [first]
    assert published(full, "out")["version"] == first
    with pytest.raises(StorageWriteError):
        publish_version(full, "out", first, {})  # the current one again: its marker is no claim of this publish
    assert published_versions(full, "out") == [first]
    storage = LocalStorage(tmp_path)
    storage.write_bytes(f"{version_prefix('out', later)}/rows.parquet", b"x")
    assert publish_version(storage, "out", later, {})
    assert published_versions(storage, "out") == [first, later]
    assert not storage.list(version_prefix("out", failed)), "the failed candidate, past the grace, is cleaned like any other"


def test_a_crash_between_marker_and_pointer_keeps_the_folder_as_published(tmp_path):
    """A crash after the marker, before the pointer: nothing can take the marker back, so the folder is kept
    like a published version (never a published version lost) until a policy removes it."""
    storage = LocalStorage(tmp_path)
    first, crashed, later = (f"2000010{d}T000000000000-0000000{d}" for d in (1, 2, 3))
    storage.write_bytes(f"{version_prefix('out', first)}/rows.parquet", b"x")
    assert publish_version(storage, "out", first, {})
    storage.write_bytes(f"{version_prefix('out', crashed)}/rows.parquet", b"x")
    storage.write_json(published_marker("out", crashed), {"version": crashed, "published_at": utc_stamp()})  # then the crash
    storage.write_bytes(f"{version_prefix('out', later)}/rows.parquet", b"x")
    assert publish_version(storage, "out", later, {})
    assert published_versions(storage, "out") == [first, crashed, later]
    assert storage.list(version_prefix("out", crashed)) == [f"{version_prefix('out', crashed)}/rows.parquet"]
    plan = plan_gc(storage, Policy(keep_last=1), now=datetime.now(timezone.utc) + timedelta(days=1))
    assert sorted(r.version for r in plan.remove) == [first, crashed]


def test_a_mix_version_pins_the_exact_versions_of_its_inputs(tmp_path, tokenizer):  # noqa: F811
    storage, rewrites, mixes = _three_generations(tmp_path, tokenizer)
    for g, mix in enumerate(mixes):
        manifest = storage.read_json(f"{mix}/{MANIFEST}")
        assert storage.read_json(f"{mix}/{INPUTS}") == manifest["inputs"], "pins written first, and kept in the manifest"
        by = {i["component"]: i for i in manifest["inputs"]}
        assert by["rewrite:easy"]["prefix"] == rewrites[g] and by["rewrite:easy"]["version"] == rewrites[g].rsplit("/", 1)[1]
        subset = (tmp_path / "home" / partition_file("quality_subsets", "pt", "high")).read_bytes()
        assert by["original"]["sha256"] == hashlib.sha256(subset).hexdigest()
        assert storage.read_bytes(by["original"]["prefix"]) == subset, "the subset as read, kept by content"
    assert published_versions(storage, "rewrites_easy/pt/high") == [r.rsplit("/", 1)[1] for r in rewrites]


def test_lineage_of_a_shard_of_an_old_mix_version(tmp_path, tokenizer):  # noqa: F811
    storage, rewrites, mixes = _three_generations(tmp_path, tokenizer)
    catalog = Catalog(storage)
    first = tmp_path / "home" / mixes[0]
    answer = queries.shard(catalog, str(first / "shard-00000.bin"), prompts=True)
    frame = pl.read_parquet(first / "shard-00000.parquet")
    assert answer["version"] == mixes[0].rsplit("/", 1)[1] and answer["current_version"] == mixes[2].rsplit("/", 1)[1]
    assert answer["is_current"] is False and answer["mix_run"] == "run-0"
    assert answer["traced_through"] == "the input versions this mix version pinned"
    synthetic = frame.filter(pl.col("origin") == "rewrite:easy")
    assert synthetic.height > 0
    assert answer["made_by"] == [{"prompt_sha": SHAS[0], "model_fingerprint": "fp0", "asset": "rewrites_easy",
                                  "version": rewrites[0].rsplit("/", 1)[1], "rows": synthetic["synth_id"].n_unique()}]  # fmt: skip
    assert answer["prompts"] == [{"prompt_sha": SHAS[0], "source": "prompt archive", "text": PROMPTS[0]}]
    assert {r["origin"]: r["tokens"] for r in answer["by_origin"]} == dict(
        frame.group_by("origin").agg(pl.col("n_tokens").sum()).iter_rows()
    )
    current = queries.shard(catalog, str(tmp_path / "home" / mixes[2] / "shard-00000.parquet"))
    assert current["is_current"] is True and [r["prompt_sha"] for r in current["made_by"]] == [SHAS[2]]
    versions = catalog.sql("SELECT version, current FROM mix_versions ORDER BY version")[1]
    assert versions == [(m.rsplit("/", 1)[1], i == 2) for i, m in enumerate(mixes)]
    assert queries.prompt(catalog, SHAS[1][:10])["text"] == PROMPTS[1], "a unique prefix of a SHA rows name"


def test_rows_that_carry_their_drop_version_pin_it_and_lineage_names_it(tmp_path, tokenizer):  # noqa: F811
    storage, rewrites, mixes = _three_generations(tmp_path, tokenizer, with_drop_version=True)
    pins = {(i["drop_id"], i["version"]) for i in storage.read_json(f"{mixes[0]}/{MANIFEST}")["inputs"] if i["asset"] == "crawl_drops"}
    every_shard = pl.concat([pl.read_parquet(p) for p in sorted((tmp_path / "home" / mixes[0]).glob("shard-*.parquet"))])
    expected = {("drop-a", "va0")} if (every_shard["origin"] == "rewrite:easy").any() else set()
    originals = every_shard.filter(pl.col("origin") == "original")
    expected |= {(d, "va1" if d == "drop-a" else "vb1") for d in originals["drop_id"]}
    assert pins == expected, "exactly the drop versions of the rows the mix took"
    frame = pl.read_parquet(tmp_path / "home" / mixes[0] / "shard-00000.parquet")
    answer = queries.shard(Catalog(storage), str(tmp_path / "home" / mixes[0] / "shard-00000.parquet"))
    counted = {}
    for row in frame.iter_rows(named=True):
        version = "va0" if row["origin"] == "rewrite:easy" else ("va1" if row["drop_id"] == "drop-a" else "vb1")
        counted[(row["drop_id"], version)] = counted.get((row["drop_id"], version), 0) + 1
    assert {(r["drop_id"], r["drop_version"]): r["rows"] for r in answer["drop_versions"]} == counted


def test_gc_keeps_pinned_inputs_until_their_mixes_go(tmp_path, tokenizer):  # noqa: F811
    storage, rewrites, mixes = _three_generations(tmp_path, tokenizer)
    later = datetime.now(timezone.utc) + timedelta(hours=7)  # past the grace: the superseded versions may go
    only_rewrites = plan_gc(storage, Policy(keep_last=1), only=("rewrites_",), now=later)
    assert only_rewrites.remove == [] and [p for p, _ in only_rewrites.pinned] == rewrites[:2]
    assert only_rewrites.pinned[0][1] == [mixes[0]]
    plan = plan_gc(storage, Policy(keep_last=1), now=later)
    assert sorted(r.key for r in plan.remove) == sorted(mixes[:2] + rewrites[:2])
    files = [p for m in mixes[:2] + rewrites[:2] for p in (tmp_path / "home" / m).rglob("*") if p.is_file()]
    assert plan.files == len(files) and plan.bytes == sum(p.stat().st_size for p in files)
    done = collect(storage, plan)
    assert done.failures == [] and done.kept == []
    assert [r.key for r in done.removed] == mixes[:2] + rewrites[:2], "mix versions first, then the inputs they pinned"
    assert published_versions(storage, "training_mix_demo/pt/high") == [mixes[2].rsplit("/", 1)[1]]
    assert published_versions(storage, "rewrites_easy/pt/high") == [rewrites[2].rsplit("/", 1)[1]]
    catalog = Catalog(storage)
    assert queries.shard(catalog, str(tmp_path / "home" / mixes[2] / "shard-00000.parquet"))["made_by"][0]["prompt_sha"] == SHAS[2]
    with pytest.raises(LookupError, match="not a shard of a retained training mix version"):
        queries.shard(catalog, str(tmp_path / "home" / mixes[0] / "shard-00000.parquet"))
    subset_pin = storage.read_json(f"{mixes[2]}/{INPUTS}")[0]["prefix"]
    assert storage.exists(subset_pin), "the snapshot the retained mix pins stays"


def test_gc_right_after_a_remix_keeps_the_version_a_reader_may_be_on(tmp_path, tokenizer):  # noqa: F811
    storage, rewrites, mixes = _three_generations(tmp_path, tokenizer)
    plan = plan_gc(storage, Policy(keep_last=1))
    assert sorted(r.key for r in plan.remove) == [rewrites[0], mixes[0]]


def test_gc_older_than_and_keep_last_together(tmp_path):
    storage = LocalStorage(tmp_path)
    made = datetime.now(timezone.utc)
    versions = [f"{utc_stamp(made - timedelta(days=d))}-000000{d:02d}" for d in (19, 15, 10, 5, 1)]
    for v in versions:
        storage.write_bytes(f"{version_prefix('out', v)}/a.bin", b"12345")
        publish_version(storage, "out", v, {})
    now = made + timedelta(hours=7)  # the current was published longer ago than the grace
    plan = plan_gc(storage, Policy(keep_last=2, older_than=timedelta(days=12)), now=now)
    assert [r.version for r in plan.remove] == versions[:2], "beyond the newest 2 and made over 12 days ago"
    assert [r.why for r in plan.remove] == ["beyond the newest 2 and older than 12 days"] * 2
    assert [r.version for r in plan_gc(storage, Policy(older_than=timedelta(days=3)), now=now).remove] == versions[:4], "not the current"
    right_away = plan_gc(storage, Policy(older_than=timedelta(days=3)))
    assert [r.version for r in right_away.remove] == versions[:3] and right_away.superseded_lately == [version_prefix("out", versions[3])]
    with pytest.raises(ValueError, match="name a policy"):
        Policy()


def _cli_home(tmp_path):
    storage = LocalStorage(tmp_path / "home")
    versions = [f"2000010{d}T000000000000-0000000{d}" for d in (1, 2, 3)]
    for v in versions:
        storage.write_bytes(f"{version_prefix('rewrites_easy/pt/high', v)}/rows.parquet", b"1234567")
        publish_version(storage, "rewrites_easy/pt/high", v, {})
    config = tmp_path / "pipeline.yaml"
    config.write_text(yaml.safe_dump({"storage_root": str(tmp_path / "home"), "drops": {"location": str(tmp_path / "drops")}}))
    return storage, versions, str(config)


def test_the_gc_command(tmp_path, isolated_env, capsys):
    storage, versions, config = _cli_home(tmp_path)
    assert main(["--config", config, "gc"]) == 2, "no policy: nothing is removed by default"
    assert "name a policy" in capsys.readouterr().err
    assert main(["--config", config, "gc", "--keep-last", "1", "--dry-run"]) == 0
    err = capsys.readouterr().err
    assert (
        "would free 1 version(s), 0 snapshot(s), 0 old sensor memory file(s) and 0 candidate file(s) killed writes left: 1 files, 7 B (7 bytes) (dry run: nothing removed)"
        in err
    )
    assert f"kept rewrites_easy/pt/high/v/{versions[1]}: superseded less than 6:00:00 ago, a reader may still be on it" in err
    assert published_versions(storage, "rewrites_easy/pt/high") == versions
    assert main(["--config", config, "gc", "--keep-last", "1"]) == 0
    assert (
        "freed 1 version(s), 0 snapshot(s), 0 old sensor memory file(s) and 0 candidate file(s) killed writes left: 1 files, 7 B (7 bytes)\n"
        in capsys.readouterr().err
    )
    assert published_versions(storage, "rewrites_easy/pt/high") == versions[1:]
    assert not storage.list("rewrites_easy/pt/high/_published/" + versions[0]), "its marker went with it"


def test_the_prompt_archive_is_content_addressed_and_written_once(tmp_path, isolated_env, capsys):
    storage = LocalStorage(tmp_path / "home")
    assert archive_prompt(storage, SHAS[0], PROMPTS[0]) is True
    key = prompt_key(SHAS[0])
    assert key == f"generations/prompts/{SHAS[0]}.yaml" and storage.read_bytes(key) == PROMPTS[0].encode()
    assert archive_prompt(storage, SHAS[0], PROMPTS[0].encode()) is False, "idempotent"
    with pytest.raises(ValueError, match="the file changed since it was loaded"):
        archive_prompt(storage, SHAS[1], PROMPTS[0])
    with pytest.raises(ValueError, match="not a prompt SHA"):
        archived_prompt(storage, "../../etc/passwd")
    assert archived_prompt(storage, SHAS[0]) == PROMPTS[0] and archived_prompt(storage, SHAS[1]) is None
    config = tmp_path / "pipeline.yaml"
    config.write_text(yaml.safe_dump({"storage_root": str(tmp_path / "home"), "drops": {"location": str(tmp_path / "drops")}}))
    assert main(["--config", str(config), "lineage", "prompt", SHAS[0], "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"prompt_sha": SHAS[0], "source": "prompt archive", "text": PROMPTS[0]}


def test_gc_names_what_it_could_not_remove_and_exits_1(tmp_path, isolated_env, capsys, monkeypatch):
    storage, versions, config = _cli_home(tmp_path)

    def refuse(self, prefix):
        raise PermissionError("read-only bucket")

    monkeypatch.setattr(LocalStorage, "delete_prefix", refuse)
    assert main(["--config", config, "gc", "--keep-last", "1"]) == 1
    assert f"not removed: rewrites_easy/pt/high/v/{versions[0]}: PermissionError: read-only bucket" in capsys.readouterr().err
    # its marker went first: a folder half removed never counts as a retained version; cleanup finishes it
    assert published_versions(storage, "rewrites_easy/pt/high") == versions[1:]
    assert storage.list(version_prefix("rewrites_easy/pt/high", versions[0])) == [f"rewrites_easy/pt/high/v/{versions[0]}/rows.parquet"]
    monkeypatch.undo()
    assert main(["--config", config, "gc", "--keep-last", "1"]) == 0
    assert (
        "freed 1 version(s), 0 snapshot(s), 0 old sensor memory file(s) and 0 candidate file(s) killed writes left: 1 files, 7 B (7 bytes)\n"
        in capsys.readouterr().err
    )
    assert storage.list(version_prefix("rewrites_easy/pt/high", versions[0])) == []


def test_a_mix_version_that_fails_to_go_keeps_its_inputs(tmp_path, tokenizer):  # noqa: F811
    _, rewrites, mixes = _three_generations(tmp_path, tokenizer)
    storage = RefusingDeleteTestStorage(tmp_path / "home", refuse=[mixes[0]])
    later = datetime.now(timezone.utc) + timedelta(hours=7)
    plan = plan_gc(storage, Policy(keep_last=1), now=later)
    assert {r.key: r.pinned_by for r in plan.remove} == {mixes[0]: (), mixes[1]: (), rewrites[0]: (mixes[0],), rewrites[1]: (mixes[1],)}
    done = collect(storage, plan)
    mix, rewrite = "training_mix_demo/pt/high", "rewrites_easy/pt/high"
    assert storage.removals == [
        ("file", published_marker(mix, mixes[0].rsplit("/", 1)[1])), ("folder", mixes[0]),
        ("file", published_marker(mix, mixes[1].rsplit("/", 1)[1])), ("folder", mixes[1]),
        ("file", published_marker(rewrite, rewrites[1].rsplit("/", 1)[1])), ("folder", rewrites[1]),
    ], "mix versions first, each marker before its folder; the input of the mix that failed is not touched"  # fmt: skip
    assert done.failures == [f"{mixes[0]}: PermissionError: read-only bucket",
                             f"{rewrites[0]}: kept: {mixes[0]}, which pins it (or may have read it), was not removed"]  # fmt: skip
    assert [r.key for r in done.removed] == [mixes[1], rewrites[1]]
    assert storage.exists(f"{mixes[0]}/{INPUTS}") and storage.exists(f"{rewrites[0]}/rows.parquet")
    storage.refuse.clear()  # the half-removed mix is now never published: the next gc finishes it, then its input
    again = plan_gc(storage, Policy(keep_last=1), now=later)
    assert {r.key: (r.why, r.pinned_by) for r in again.remove} == {
        mixes[0]: ("never published (a crashed or superseded candidate)", ()),
        rewrites[0]: ("beyond the newest 1", (mixes[0],)),
    }
    assert collect(storage, again).failures == []
    assert published_versions(storage, rewrite) == [rewrites[2].rsplit("/", 1)[1]] and storage.list(mixes[0]) == []


def test_a_store_published_before_markers_loses_no_published_version(tmp_path, isolated_env, capsys):
    storage, _, config = _cli_home(tmp_path)
    prefix = "tokenizer"
    before = [f"2000020{d}T000000000000-0000000{d}" for d in (1, 2)]
    for v in before:  # what the publisher wrote before markers: two version folders and a pointer, no marker
        storage.write_bytes(f"{version_prefix(prefix, v)}/tokenizer.model", b"12345")
    storage.write_json(f"{prefix}/current.json", {"version": before[1], "prefix": version_prefix(prefix, before[1])})
    assert published_versions(storage, prefix) == before, "every folder up to the current may have been published"
    assert plan_gc(storage, Policy(keep_last=10)).remove == []
    third = "20000203T000000000000-00000003"
    storage.write_bytes(f"{version_prefix(prefix, third)}/tokenizer.model", b"12345")
    assert publish_version(storage, prefix, third, {})
    assert [storage.read_json(published_marker(prefix, v))["recorded"] for v in before] == ["before markers"] * 2
    assert main(["--config", config, "gc", "--keep-last", "10"]) == 0
    assert (
        "freed 0 version(s), 0 snapshot(s), 0 old sensor memory file(s) and 0 candidate file(s) killed writes left: 0 files"
        in capsys.readouterr().err
    )
    assert published_versions(storage, prefix) == before + [third]
    assert [k for k in storage.list(prefix) if "/v/" in k] == [f"{version_prefix(prefix, v)}/tokenizer.model" for v in before + [third]]


def test_gc_leaves_a_young_snapshot_and_reads_the_pins_again_before_removing_one(tmp_path):
    storage = LocalStorage(tmp_path)
    key = snapshot_key("quality_subsets/pt/high", "ab" * 32)
    storage.write_bytes(key, b"subset")
    plan = plan_gc(storage, Policy(keep_last=1))
    assert plan.remove == [] and plan.kept_snapshots == [(key, "written less than 6:00:00 ago (a mix being built may pin it)")]
    later = datetime.now(timezone.utc) + timedelta(hours=7)
    plan = plan_gc(storage, Policy(keep_last=1), now=later)
    assert [(r.key, r.bytes, r.why) for r in plan.remove] == [(key, 6, "a snapshot no retained mix version pins")]
    building = version_prefix("training_mix_demo/pt/high", "20991231T000000000000-00000001")
    storage.write_json(f"{building}/{INPUTS}", [{"asset": "quality_subsets", "prefix": key}])  # a build pinned it since the plan
    done = collect(storage, plan, now=later)
    assert done.kept == [f"{key}: pinned meanwhile by {building}"] and done.removed == [] and storage.exists(key)
    storage.delete_prefix(building)
    storage.write_bytes(key, b"subset")  # a build that pinned it rewrote it since the plan: young again
    assert collect(storage, plan).kept == [f"{key}: written less than 6:00:00 ago (a mix being built may pin it)"]
    assert [r.key for r in collect(storage, plan, now=later).removed] == [key] and not storage.exists(key)


def test_inputs_a_mix_made_before_pinning_may_have_read_stay_unless_forced(tmp_path, tokenizer, isolated_env, capsys, monkeypatch):  # noqa: F811
    storage, rewrites, mixes = _three_generations(tmp_path, tokenizer)
    storage.delete(f"{mixes[0]}/{INPUTS}")  # mixes[0] as made before pinning: no inputs anywhere
    manifest = storage.read_json(f"{mixes[0]}/{MANIFEST}")
    storage.write_json(f"{mixes[0]}/{MANIFEST}", {k: v for k, v in manifest.items() if k != "inputs"})
    stray = {lq: snapshot_key(f"quality_subsets/{lq}", lq[:2] * 32) for lq in ("pt/high", "en/low")}  # pinned by no mix
    for key in stray.values():
        storage.write_bytes(key, b"old subset")
    monkeypatch.setattr(retention, "CANDIDATE_GRACE", timedelta(0))  # as if written long ago
    config = tmp_path / "pipeline.yaml"
    config.write_text(yaml.safe_dump({"storage_root": str(tmp_path / "home"), "drops": {"location": str(tmp_path / "drops")}}))
    args = ["--config", str(config), "gc", "--keep-last", "1", "--asset", "rewrites_", "--asset", "quality_subsets"]
    assert main(args) == 0
    err = capsys.readouterr().err
    for kept in (rewrites[0], stray["pt/high"]):
        assert f"kept {kept}: 1 retained mix version(s) made before inputs were pinned may have read it, e.g. {mixes[0]} " in err
    assert "freed 0 version(s), 1 snapshot(s), 0 old sensor memory file(s) and 0 candidate file(s)" in err, (
        "a snapshot of another language|quality is not held"
    )
    assert storage.exists(f"{rewrites[0]}/rows.parquet") and storage.exists(stray["pt/high"]) and not storage.exists(stray["en/low"])
    assert main([*args, "--force"]) == 0
    err = capsys.readouterr().err
    assert f"--force: removing {rewrites[0]}, which 1 retained mix version(s) made before inputs were pinned may have read" in err
    assert "freed 1 version(s), 1 snapshot(s), 0 old sensor memory file(s) and 0 candidate file(s)" in err
    assert not storage.exists(f"{rewrites[0]}/rows.parquet") and not storage.exists(stray["pt/high"])
    assert published_versions(storage, "training_mix_demo/pt/high") == [m.rsplit("/", 1)[1] for m in mixes]


def test_a_snapshots_age_is_known_on_s3_as_on_disk(s3_bucket, tmp_path):
    """gc frees an unpinned snapshot only once it is older than the grace: S3 must say when an object was written."""
    from synth_cpt.core.storage import S3Storage

    _, bucket = s3_bucket
    key = snapshot_key("quality_subsets/pt/high", "a" * 64)
    before = datetime.now(timezone.utc).replace(microsecond=0) - timedelta(seconds=1)
    for storage in (S3Storage(f"s3://{bucket}/root"), LocalStorage(tmp_path / "home")):
        storage.write_bytes(key, b"parquet bytes")
        at, size = retention._written_at(storage, key)
        assert size == len(b"parquet bytes") and at is not None and before <= at <= datetime.now(timezone.utc), type(storage).__name__
        assert (
            retention._snapshot_too_young(storage, key, datetime.now(timezone.utc))
            == f"written less than {retention.CANDIDATE_GRACE} ago (a mix being built may pin it)"
        )
        assert (
            retention._snapshot_too_young(storage, key, datetime.now(timezone.utc) + retention.CANDIDATE_GRACE + timedelta(minutes=1))
            is None
        )


def test_gc_removes_candidates_killed_writes_left_once_past_the_grace(tmp_path, isolated_env, capsys):
    """A write killed between creating its candidate and the rename leaves `.<name>.<id>.tmp` behind, which no
    listing shows: gc frees it once it has been untouched for the grace (a live write keeps touching its own),
    and leaves the published files and a fresh candidate alone."""
    storage, versions, config = _cli_home(tmp_path)
    pointer = Path(storage.root, "rewrites_easy/pt/high", candidate_name("current.json"))
    segment = Path(storage.root, "generations/pt/high", candidate_name("segment-0001.parquet"))
    fresh = Path(storage.root, "rewrites_easy/pt/high", candidate_name("current.json"))
    for path in (pointer, segment, fresh):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"half a write")
    stale = time.time() - CANDIDATE_GRACE.total_seconds() - 60
    for path in (pointer, segment):
        os.utime(path, (stale, stale))
    listed = storage.list("")
    assert main(["--config", config, "gc", "--keep-last", "3"]) == 0
    err = capsys.readouterr().err
    print(err)
    assert (
        "freed 0 version(s), 0 snapshot(s), 0 old sensor memory file(s) and 2 candidate file(s) killed writes left: 2 files, 24 B (24 bytes)\n"
        in err
    )
    assert not pointer.exists() and not segment.exists()
    assert fresh.exists(), "a candidate touched within the grace may be a write in progress"
    assert storage.list("") == listed and published_versions(storage, "rewrites_easy/pt/high") == versions


def test_a_candidate_written_to_after_the_plan_is_kept(tmp_path):
    """A slow writer (a quarantine file idle through a long ingest) may touch its candidate between the plan and the
    removal: it is read again and kept."""
    storage = LocalStorage(tmp_path / "home")
    slow = Path(storage.root, "crawl_drops/d.jsonl/v/x", candidate_name("quarantine.parquet"))
    slow.parent.mkdir(parents=True)
    slow.write_bytes(b"rows so far")
    stale = time.time() - CANDIDATE_GRACE.total_seconds() - 60
    os.utime(slow, (stale, stale))
    plan = plan_gc(storage, Policy(keep_last=1))
    assert [r.key for r in plan.remove if r.candidate] == [slow.relative_to(storage.root).as_posix()]
    slow.write_bytes(b"rows so far, and more")  # the writer goes on
    done = collect(storage, plan)
    print(done.kept)
    assert slow.exists() and done.removed == [] and done.kept == [f"{plan.remove[0].key}: written to since the plan (a write in progress)"]


def test_gc_keeps_the_newest_sensor_memories_and_frees_older_ones_past_the_grace(tmp_path):
    """The drop sensor writes a new `_sensor/published/<sha256>.bin` whenever the published set changes: gc frees all
    but the newest SENSOR_MEMORIES_KEPT once older than the grace, whatever the policy, and keeps one the sensor
    wrote again since the plan (its set came back)."""
    from synth_cpt.core.layout import sensor_memory_key

    storage = LocalStorage(tmp_path / "home")
    now = time.time()
    ages_h = [10, 9, 2, 1, 0.5, 0]  # oldest first; the grace is 6 h
    keys = []
    for i, age in enumerate(ages_h):
        raw = bytes([i]) * 8 * (i + 1)
        keys.append(sensor_memory_key(hashlib.sha256(raw).hexdigest()))
        storage.write_bytes(keys[-1], raw)
        os.utime(storage.path(keys[-1]), (now - age * 3600, now - age * 3600))
    assert retention.SENSOR_MEMORIES_KEPT == 3
    plan = plan_gc(storage, Policy(keep_last=5))
    assert [(r.key, r.bytes, r.why, r.sensor_memory) for r in plan.remove] == [
        (keys[0], 8, "an old memory of the drop sensor (a newer one is in use)", True),
        (keys[1], 16, "an old memory of the drop sensor (a newer one is in use)", True),
    ], "keys[2] is beyond the newest 3 but younger than the grace; keys[3:] are the newest 3"
    assert plan_gc(storage, Policy(keep_last=5), only=("rewrites_",)).remove == [], "--asset limits gc to those outputs"
    storage.write_bytes(keys[1], bytes([1]) * 16)  # the sensor's set came back to this one: written again, in use
    done = collect(storage, plan)
    assert [r.key for r in done.removed] == [keys[0]] and done.failures == []
    assert done.kept == [f"{keys[1]}: written again since the plan (the drop sensor's memory in use)"]
    assert storage.list("_sensor") == sorted(keys[1:])
    later = datetime.now(timezone.utc) + CANDIDATE_GRACE + timedelta(hours=1)
    assert sorted(r.key for r in plan_gc(storage, Policy(keep_last=5), now=later).remove) == sorted(keys[2:4]), (
        "oldest written first: keys[1], rewritten, is now among the newest 3"
    )
