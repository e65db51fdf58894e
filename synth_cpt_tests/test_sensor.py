"""The drop sensor on a local folder and on S3 (moto server), and partition keys."""

import hashlib
import json
import os
import time

import pytest
import yaml
from dagster import DagsterInstance, SkipReason, build_sensor_context

from synth_cpt.core.layout import drop_key
from synth_cpt.core.storage import LocalStorage, S3Storage
from synth_cpt.defs.partitions import corpus_partitions, split_corpus_key
from synth_cpt.defs.resources import PipelineResource
from synth_cpt.defs.sensors import crawl_drop_sensor
from synth_cpt.ingest.sources import list_drops

from .conftest import PT_TEXT, make_config, write_jsonl


def _tick(instance, config_path, cursor=None):
    ctx = build_sensor_context(instance=instance, cursor=cursor, resources={"pipeline": PipelineResource(config_path=str(config_path))})
    result = crawl_drop_sensor(ctx)
    if isinstance(result, SkipReason):
        return [], [], cursor
    for req in result.dynamic_partitions_requests:
        instance.add_dynamic_partitions(req.partitions_def_name, list(req.partition_keys))
    return result.run_requests or [], result.dynamic_partitions_requests, result.cursor


def _config_file(tmp_path, location, settle_seconds=0):
    path = tmp_path / "pipeline.yaml"
    path.write_text(
        yaml.safe_dump({"storage_root": str(tmp_path / "home"), "drops": {"location": location, "settle_seconds": settle_seconds}})
    )
    return path


def test_local_sensor_new_unchanged_replaced_and_escapes(tmp_path, isolated_env):
    drops = tmp_path / "drops"
    write_jsonl(drops / "2026-11-01 crawl.jsonl", [{"text": PT_TEXT}])
    write_jsonl(drops / "sub/part 2.jsonl.gz", [{"text": PT_TEXT}], compress="gz")
    (drops / "notes.txt").write_text("not a drop")
    outside = tmp_path / "outside.jsonl"
    write_jsonl(outside, [{"text": "secret"}])
    os.symlink(outside, drops / "escape.jsonl")
    cfg_path = _config_file(tmp_path, str(drops))
    with DagsterInstance.ephemeral() as instance:
        runs, parts, cursor = _tick(instance, cfg_path)
        keys = sorted(r.partition_key for r in runs)
        assert keys == sorted([drop_key("2026-11-01 crawl.jsonl"), drop_key("sub/part 2.jsonl.gz")])
        assert sorted(instance.get_dynamic_partitions("crawl_drops")) == keys
        assert all("@mtime" in r.run_key for r in runs)
        assert not any("escape" in k for k in keys), "a symlink out of the folder is refused"
        assert [r.split(":")[0] for r in json.loads(cursor)["refused"]] == ["escape.jsonl"], "and remembered, so it is logged once"

        again, parts, cursor = _tick(instance, cfg_path, cursor)
        assert again == [] and parts == [], "an unchanged file is never ingested twice"

        time.sleep(0.01)
        write_jsonl(drops / "2026-11-01 crawl.jsonl", [{"text": PT_TEXT}, {"text": PT_TEXT + " 2"}])
        replaced, parts, cursor = _tick(instance, cfg_path, cursor)
        assert [r.partition_key for r in replaced] == [drop_key("2026-11-01 crawl.jsonl")]
        assert replaced[0].run_key not in {r.run_key for r in runs}, "a replaced file gets a new run key"
        assert parts == [], "its partition already exists"
        registry = json.loads((tmp_path / "home/crawl_drops/_registry" / f"{replaced[0].partition_key}.json").read_text())
        assert registry["drops_location"] == str(drops)


def test_listing_refuses_escaping_paths(tmp_path):
    drops = tmp_path / "drops"
    (drops / "real").mkdir(parents=True)
    write_jsonl(tmp_path / "elsewhere/x.jsonl", [{"text": "x"}])
    os.symlink(tmp_path / "elsewhere", drops / "linked")
    os.symlink(tmp_path / "elsewhere/x.jsonl", drops / "x.jsonl")
    listing = list_drops(LocalStorage(drops), ("*.jsonl",))
    assert listing.drops == []
    assert [r.split(": ")[0] for r in listing.refused] == [str(drops / "linked"), "x.jsonl"]
    assert [("refused" in r) for r in listing.refused] == [True, True]


def test_drop_keys_are_safe_stable_and_distinct():
    assert drop_key("2026-11-01_pt.jsonl.gz") == "2026-11-01_pt.jsonl.gz"
    # unsafe characters become _, folders __, and a changed name gets 8 hex digits of the path's SHA-256
    assert drop_key("a b/c|d,[e].jsonl") == "a_b__c_d_e_.jsonl-" + hashlib.sha256(b"a b/c|d,[e].jsonl").hexdigest()[:8]
    assert drop_key("a b.jsonl") != drop_key("a_b.jsonl"), "sanitizing must not merge two files"
    long = "x" * 500 + ".jsonl"
    assert drop_key(long) == "x" * 110 + "-" + hashlib.sha256(long.encode()).hexdigest()[:8], "cut to 119 characters"


def test_corpus_partition_keys(tmp_path):
    cfg = make_config(tmp_path, languages=["pt", "en", "es"])
    keys = corpus_partitions(cfg).get_partition_keys()
    assert sorted(keys) == ["en|high", "en|low", "es|high", "es|low", "pt|high", "pt|low"]
    assert split_corpus_key("pt|high") == ("pt", "high")
    with pytest.raises(ValueError):
        split_corpus_key("pt-high")


def test_s3_sensor_through_moto_server(tmp_path, isolated_env, s3_bucket):
    client, bucket = s3_bucket
    client.put_object(Bucket=bucket, Key="drops/2026-11-01.jsonl", Body=json.dumps({"text": PT_TEXT}).encode() + b"\n")
    client.put_object(Bucket=bucket, Key="drops/nested/b.jsonl", Body=b'{"text": "b"}\n')
    client.put_object(Bucket=bucket, Key="drops/../evil.jsonl", Body=b'{"text": "x"}\n')
    client.put_object(Bucket=bucket, Key="drops/readme.md", Body=b"no")
    cfg_path = _config_file(tmp_path, f"s3://{bucket}/drops")
    with DagsterInstance.ephemeral() as instance:
        runs, _, cursor = _tick(instance, cfg_path)
        assert sorted(r.partition_key for r in runs) == ["2026-11-01.jsonl", drop_key("nested/b.jsonl")]
        assert all("@etag" in r.run_key for r in runs)
        again, _, cursor = _tick(instance, cfg_path, cursor)
        assert again == []
        client.put_object(Bucket=bucket, Key="drops/2026-11-01.jsonl", Body=b'{"text": "replaced"}\n')
        replaced, _, _ = _tick(instance, cfg_path, cursor)
        assert [r.partition_key for r in replaced] == ["2026-11-01.jsonl"]
    listing = list_drops(S3Storage(f"s3://{bucket}/drops"), ("*.jsonl",))
    assert len(listing.refused) == 1 and "evil.jsonl" in listing.refused[0] and "refused" in listing.refused[0]


def test_the_sensor_and_the_cli_agree_through_what_is_published(tmp_path, isolated_env):
    """A drop ingested outside the sensor (the CLI) is not ingested again by it, and vice versa."""
    from synth_cpt.core.config import load_config
    from synth_cpt.core.storage import LocalStorage
    from synth_cpt.ingest.drops import ingest_drop, plan_drops

    drops = tmp_path / "drops"
    write_jsonl(drops / "a.jsonl", [{"text": PT_TEXT}])
    write_jsonl(drops / "b.jsonl", [{"text": PT_TEXT + " b"}])
    cfg_path = _config_file(tmp_path, str(drops))
    cfg = load_config(cfg_path)
    source = LocalStorage(drops)
    a = next(d for d in list_drops(source, cfg.drops.patterns).drops if d.relative_path == "a.jsonl")
    ingest_drop(cfg, LocalStorage(tmp_path / "home"), source, a)  # what `synth-cpt ingest` does
    with DagsterInstance.ephemeral() as instance:
        runs, _, cursor = _tick(instance, cfg_path)
        assert [r.partition_key for r in runs] == ["b.jsonl"], "the published drop is not asked for again"
        again, _, _ = _tick(instance, cfg_path, cursor)
        assert again == [], "nor one whose run is under way"
    plan = plan_drops(LocalStorage(tmp_path / "home"), list_drops(source, cfg.drops.patterns).drops, 0)
    assert [d.key for d in plan.unchanged] == ["a.jsonl"] and [d.key for d in plan.new] == ["b.jsonl"]


def test_a_file_still_being_written_is_not_taken(tmp_path, isolated_env):
    drops = tmp_path / "drops"
    write_jsonl(drops / "growing.jsonl", [{"text": PT_TEXT}])
    cfg_path = _config_file(tmp_path, str(drops), settle_seconds=3600)
    with DagsterInstance.ephemeral() as instance:
        runs, _, _ = _tick(instance, cfg_path)
        assert runs == [], "changed a moment ago: maybe still being copied"
    from synth_cpt.core.storage import LocalStorage
    from synth_cpt.ingest.drops import plan_drops

    (drop,) = list_drops(LocalStorage(drops), ("*.jsonl",)).drops
    later = drop.changed_ns + int(3601e9)
    assert plan_drops(LocalStorage(tmp_path / "home"), [drop], 3600, now_ns=later).new == [drop], "taken once settled"
    plan = plan_drops(LocalStorage(tmp_path / "home"), [drop], 3600, now_ns=drop.changed_ns + int(600e9))
    assert plan.unsettled == [drop] and plan.settles_in == {drop.key: 3000.0}, "how long until it is settled"
    early = drop.changed_ns - int(5e9)  # a clock behind the file's: settle 0 still takes it now
    assert plan_drops(LocalStorage(tmp_path / "home"), [drop], 0, now_ns=early).new == [drop]
