"""A drop is published as one version: readers go through a pointer written last, so a crash
mid-ingest or a replaced drop never pairs one version's documents with another's manifest."""

import json
import signal
import subprocess
import sys
import textwrap

import pytest

from synth_cpt.core.storage import LocalStorage
from synth_cpt.ingest.dedup import build_raw_corpus
from synth_cpt.ingest.drops import ingest_drop, ingested_drops, published, published_prefix
from synth_cpt.ingest.sources import list_drops

from .conftest import PT_TEXT, REPO, make_config, write_jsonl


def _records(n, bad=0):
    good = [{"id": str(i), "text": f"{PT_TEXT} Registro {i}.", "language": "pt", "edu": 4.0} for i in range(n)]
    return good + [{"id": f"bad{i}", "text": None} for i in range(bad)]


def _ingest(tmp_path, cfg):
    source = LocalStorage(tmp_path / "drops")
    (drop,) = list_drops(source, cfg.drops.patterns).drops
    storage = LocalStorage(tmp_path / "home")
    return storage, drop, ingest_drop(cfg, storage, source, drop)


def test_a_replaced_drop_over_the_limit_is_published_whole_and_kept_out(tmp_path):
    cfg = make_config(tmp_path)
    write_jsonl(tmp_path / "drops/d.jsonl", _records(10))
    storage, drop, first = _ingest(tmp_path, cfg)
    assert first.accepted and build_raw_corpus(storage, cfg, "pt", "high").documents == 10
    write_jsonl(tmp_path / "drops/d.jsonl", _records(2, bad=8))  # the same drop, replaced by a bad version
    storage, drop, second = _ingest(tmp_path, cfg)
    assert not second.accepted
    pointer = published(storage, drop.key)
    manifest = json.loads((tmp_path / "home" / pointer["prefix"] / "manifest.json").read_text())
    assert pointer["manifest"] == manifest and manifest["documents"] == 2, "documents and manifest are one version"
    assert build_raw_corpus(storage, cfg, "pt", "high").documents == 0, "the replaced drop is kept out"
    versions = sorted(p.name for p in (tmp_path / "home/crawl_drops/d.jsonl/v").iterdir())
    assert len(versions) == 2 and pointer["version"] == versions[-1], "the published version and the one before"


KILLER = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    sys.path.insert(0, {repo!r})
    from synth_cpt_tests.conftest import make_config
    from synth_cpt.ingest.drops import ingest_drop
    from synth_cpt.ingest.sources import list_drops
    from synth_cpt.core.storage import LocalStorage
    tmp = Path({tmp!r})
    cfg = make_config(tmp, limits={{"batch_bytes": 2000, "workers": 1}})
    source = LocalStorage(tmp / "drops")
    (drop,) = list_drops(source, cfg.drops.patterns).drops
    def die(done, total, records, documents):
        if records >= 20:
            os.kill(os.getpid(), signal.SIGKILL)
    ingest_drop(cfg, LocalStorage(tmp / "home"), source, drop, progress=die)
    """
)


def test_killing_the_ingest_midway_leaves_the_previous_version_whole(tmp_path):
    cfg = make_config(tmp_path, limits={"batch_bytes": 2000, "workers": 1})
    write_jsonl(tmp_path / "drops/d.jsonl", _records(10))
    storage, drop, first = _ingest(tmp_path, cfg)
    before = published(storage, drop.key)
    write_jsonl(tmp_path / "drops/d.jsonl", _records(200))
    proc = subprocess.run([sys.executable, "-c", KILLER.format(repo=str(REPO), tmp=str(tmp_path))], capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert published(storage, drop.key) == before, "the pointer still names the previous version"
    docs = storage.read_parquet(f"{published_prefix(storage, drop.key)}/docs.parquet")
    assert docs.height == 10 and before["manifest"]["documents"] == 10
    assert [m["documents"] for m in ingested_drops(storage)] == [10]
    # the next run publishes the new version whole
    storage, drop, again = _ingest(tmp_path, cfg)
    assert again.documents == 200 and published(storage, drop.key)["manifest"]["documents"] == 200


def test_a_drop_ingested_before_versions_existed_stays_in_force(tmp_path):
    cfg = make_config(tmp_path)
    write_jsonl(tmp_path / "drops/d.jsonl", _records(4))
    storage, drop, _ = _ingest(tmp_path, cfg)
    home = tmp_path / "home/crawl_drops/d.jsonl"
    version = published(storage, drop.key)["prefix"]
    for name in ("docs.parquet", "quarantine.parquet", "manifest.json"):  # the old layout: files at the drop's root
        (home / name).write_bytes((tmp_path / "home" / version / name).read_bytes())
    import shutil

    shutil.rmtree(home / "v")
    (home / "current.json").unlink()
    assert published(storage, drop.key)["version"] == "legacy"
    assert [m["prefix"] for m in ingested_drops(storage)] == ["crawl_drops/d.jsonl"]
    assert build_raw_corpus(storage, cfg, "pt", "high").documents == 4


def test_acceptance_follows_the_current_limits(tmp_path):
    import gzip
    import zlib

    whole = gzip.compress(b"".join(json.dumps(r).encode() + b"\n" for r in _records(50)))
    (tmp_path / "drops").mkdir()
    (tmp_path / "drops/d.jsonl.gz").write_bytes(whole[: len(whole) // 2])
    readable = zlib.decompressobj(wbits=31).decompress(whole[: len(whole) // 2]).count(b"\n")  # the whole lines before the cut
    strict = make_config(tmp_path, limits={"max_quarantine_rate": 0.9})  # the cut line is quarantined too
    storage, drop, report = _ingest(tmp_path, strict)
    assert readable in range(1, 50), "the cut is inside the records"
    assert (report.complete, report.documents) == (False, readable)
    assert build_raw_corpus(storage, strict, "pt", "high").documents == 0
    lenient = make_config(tmp_path, limits={"max_quarantine_rate": 0.9, "accept_partial_files": True})
    assert build_raw_corpus(storage, lenient, "pt", "high").documents == readable, "no re-ingest needed"


def test_an_older_version_never_replaces_a_newer_published_one(tmp_path):
    from synth_cpt.ingest.drops import publish_drop

    cfg = make_config(tmp_path)
    write_jsonl(tmp_path / "drops/d.jsonl", _records(3))
    storage, drop, _ = _ingest(tmp_path, cfg)
    newest = published(storage, drop.key)
    publish_drop(storage, drop.key, "20000101T000000000000-00000000", {"documents": 0})  # a slow run finishing late
    assert published(storage, drop.key) == newest


def test_a_drop_version_that_fails_its_suite_is_never_published(tmp_path):
    """Validate, then publish: the schema suite runs on the new version before its pointer is written."""
    from synth_cpt.core.contracts import check_drop_version
    from synth_cpt.core.publish import CandidateRejected

    cfg = make_config(tmp_path)
    write_jsonl(tmp_path / "drops/d.jsonl", _records(3))
    storage, drop, good = _ingest(tmp_path, cfg)
    before = published(storage, drop.key)
    write_jsonl(tmp_path / "drops/d.jsonl", _records(5))
    (drop,) = list_drops(LocalStorage(tmp_path / "drops"), cfg.drops.patterns).drops
    # the real suite, run against a config whose contract has a score column the documents lack
    other = make_config(tmp_path, fields={"scores": {"edu": "edu", "stem": "stem", "extra": "extra"}}, quality={"scores": ["edu"]})
    with pytest.raises(CandidateRejected) as rejected:
        ingest_drop(cfg, storage, LocalStorage(tmp_path / "drops"), drop, validate=lambda s, prefix: check_drop_version(s, prefix, other))
    assert rejected.value.check_name == "documents_valid" and "columns: missing ['score_extra']" in str(rejected.value)
    kept = rejected.value.kept
    assert published(storage, drop.key) == before, "readers still see the previous version"
    assert ingested_drops(storage)[0]["documents"] == 3
    assert sorted(p.name for p in (tmp_path / kept).iterdir()) == ["docs.parquet", "manifest.json", "quarantine.parquet"]
    assert len(list((tmp_path / "home/crawl_drops/d.jsonl/v").iterdir())) == 1, "the rejected version left the drop's folder"
    # and the real suite with the drop's own config passes
    report = ingest_drop(
        cfg, storage, LocalStorage(tmp_path / "drops"), drop, validate=lambda s, prefix: check_drop_version(s, prefix, cfg)
    )
    assert report.outcome.success and published(storage, drop.key)["manifest"]["documents"] == 5


def test_publishing_leaves_other_runs_young_candidates_alone(tmp_path):
    """The first publish of an output (no previous version) must not delete a candidate another run
    started earlier and is still writing; a crashed candidate older than the grace does go."""
    from synth_cpt.core.layout import drop_prefix, version_prefix
    from synth_cpt.core.publish import new_version
    from synth_cpt.ingest.drops import publish_drop

    storage = LocalStorage(tmp_path / "home")
    crashed, writing = "20000101T000000000000-00000000", new_version()  # writing: another run, started just before
    ours = new_version()
    for version in (crashed, writing, ours):
        storage.write_bytes(f"{version_prefix(drop_prefix('d.jsonl'), version)}/docs.parquet", b"parquet")
    publish_drop(storage, "d.jsonl", ours, {"documents": 0})
    assert published(storage, "d.jsonl")["version"] == ours
    assert sorted(p.name for p in (tmp_path / "home/crawl_drops/d.jsonl/v").iterdir()) == [writing, ours]


def _newer_run_publishes_first(storage, drop_key):
    """A `validate` that, while this run's candidate waits for its check, lets another run publish a
    newer version of the drop."""
    from synth_cpt.core.layout import drop_prefix, version_prefix
    from synth_cpt.core.publish import new_version
    from synth_cpt.core.validation import Outcome
    from synth_cpt.ingest.drops import publish_drop

    def validate(s, prefix):
        newer = new_version()
        manifest = {**s.read_json(f"{prefix}/manifest.json"), "documents": 99, "version": newer}
        storage.write_json(f"{version_prefix(drop_prefix(drop_key), newer)}/manifest.json", manifest)
        publish_drop(storage, drop_key, newer, manifest)
        return Outcome(True, [], {})

    return validate


def test_a_candidate_superseded_by_a_newer_run_says_so(tmp_path):
    """publish_version keeps a newer version in force: the report must not name this run's unpublished
    candidate as what readers see."""
    cfg = make_config(tmp_path)
    write_jsonl(tmp_path / "drops/d.jsonl", _records(3))
    source = LocalStorage(tmp_path / "drops")
    (drop,) = list_drops(source, cfg.drops.patterns).drops
    storage = LocalStorage(tmp_path / "home")
    report = ingest_drop(cfg, storage, source, drop, validate=_newer_run_publishes_first(storage, drop.key))
    pointer = published(storage, drop.key)
    assert pointer["manifest"]["documents"] == 99, "the newer run's version stays in force"
    assert report.superseded_by == pointer["version"] and report.prefix == pointer["prefix"]
    assert "superseded_by" not in report.to_json()
    _, _, again = _ingest(tmp_path, cfg)
    assert again.superseded_by is None and published(storage, drop.key)["prefix"] == again.prefix


def test_the_crawl_drops_asset_does_not_materialize_a_superseded_candidate(tmp_path, monkeypatch):
    from dagster import AssetKey, DagsterInstance

    from synth_cpt.defs import ingest as ingest_defs

    from .test_dagster import _setup

    defs = _setup(tmp_path, monkeypatch)
    storage = LocalStorage(tmp_path / "home")
    real = ingest_defs.ingest_drop

    def racing(cfg, storage_, location, drop, progress=None, validate=None):
        return real(cfg, storage_, location, drop, progress=progress, validate=_newer_run_publishes_first(storage, drop.key))

    monkeypatch.setattr(ingest_defs, "ingest_drop", racing)
    with DagsterInstance.ephemeral() as instance:
        instance.add_dynamic_partitions("crawl_drops", ["2026-11-01.jsonl"])
        result = defs.resolve_job_def("ingest_drop_job").execute_in_process(instance=instance, partition_key="2026-11-01.jsonl")
        assert result.success
        assert not result.asset_materializations_for_node("crawl_drops"), "the newer run's materialization stands"
        assert [c.passed for c in result.get_asset_check_evaluations()] == [True]
        assert instance.get_latest_materialization_event(AssetKey("crawl_drops")) is None
