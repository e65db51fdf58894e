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


# -- a tick reads O(new) pointers, not O(all) ---------------------------------------------------------------


class ReadCountingTestStorage(LocalStorage):
    """Test double: local storage that records every read it is asked for, as (operation, key), in order, and
    every file it writes."""

    def __init__(self, root):
        super().__init__(root)
        self.reads = []  # (operation, key)
        self.writes = []  # keys

    def exists(self, key):
        self.reads.append(("exists", key))
        return super().exists(key)

    def read_bytes(self, key):
        self.reads.append(("read", key))
        return super().read_bytes(key)

    def open(self, key):
        self.reads.append(("open", key))
        return super().open(key)

    def list(self, prefix):
        self.reads.append(("list", prefix))
        return super().list(prefix)

    def files(self, prefix="", recursive=True, patterns=()):
        self.reads.append(("files", prefix))
        return super().files(prefix, recursive, patterns)

    def writing(self, key):
        self.writes.append(key)
        return super().writing(key)

    def take(self):
        taken, self.reads = self.reads, []
        return taken

    def take_writes(self):
        taken, self.writes = self.writes, []
        return taken


def _publish(storage, drops):
    """Publish each drop at its listed version through the real publishing code (the pointer a run writes)."""
    from synth_cpt.core.publish import new_version
    from synth_cpt.ingest.drops import publish_drop

    for d in drops:
        publish_drop(storage, d.key, new_version(), {"drop_id": d.key, "source_version": d.version})


def _pointer_reads(key):
    """The storage reads of one pointer look-up: the pointer, then (when missing) the pre-versions manifest."""
    return [("exists", f"crawl_drops/{key}/current.json"), ("read", f"crawl_drops/{key}/current.json")]


def _missing_pointer_reads(key):
    return [("exists", f"crawl_drops/{key}/current.json"), ("exists", f"crawl_drops/{key}/manifest.json")]


def _memory_key(cursor):
    return f"_sensor/published/{json.loads(cursor)['published_sha256']}.bin"


def _memory_read(cursor):
    """The one read of a tick whose cursor names a memory file."""
    return [("read", _memory_key(cursor))]


def _memory(storage, cursor):
    """The digests in the memory file the cursor names, read past the counting (checked against its name)."""
    raw = LocalStorage(storage.root).read_bytes(_memory_key(cursor))
    assert hashlib.sha256(raw).hexdigest() == json.loads(cursor)["published_sha256"] and len(raw) % 8 == 0
    return {raw[i : i + 8] for i in range(0, len(raw), 8)}


N_DROPS = 300


def test_a_tick_reads_only_the_pointers_of_drops_not_known_published(tmp_path, isolated_env, monkeypatch):
    """Over N published drops: the first tick after an old-format cursor reads every pointer once (and keeps
    what that cursor requested) and writes the memory file; then a tick with nothing new reads that file and no
    pointer and writes nothing, k new or replaced drops cost exactly their k look-ups (and a new memory file),
    requested drops are looked up until published, deleted ones are forgotten. The cursor names the memory only."""
    from synth_cpt.ingest.drops import published_digest

    drops = tmp_path / "drops"
    for i in range(N_DROPS):
        write_jsonl(drops / f"2026-11-{i % 30 + 1:02d}_{i:04d}.jsonl", [{"text": f"{PT_TEXT} {i}"}])
    cfg_path = _config_file(tmp_path, str(drops))
    home = ReadCountingTestStorage(tmp_path / "home")
    monkeypatch.setattr(PipelineResource, "storage", lambda self: home)
    listed = list_drops(LocalStorage(drops), ("*.jsonl",)).drops
    _publish(home, listed)
    write_jsonl(drops / "pending.jsonl", [{"text": PT_TEXT + " pending"}])  # requested by the old sensor, run failed
    (pending_drop,) = [d for d in list_drops(LocalStorage(drops), ("*.jsonl",)).drops if d.key == "pending.jsonl"]
    old_cursor = json.dumps({"requested": {"pending.jsonl": pending_drop.version}, "refused": []})
    home.take(), home.take_writes()

    with DagsterInstance.ephemeral() as instance:
        runs, _, cursor = _tick(instance, cfg_path, old_cursor)
        assert runs == [], "the old cursor's request is kept: not asked for twice; everything else is published"
        assert home.take() == [r for d in listed for r in _pointer_reads(d.key)] + _missing_pointer_reads("pending.jsonl")
        assert home.take_writes() == [_memory_key(cursor)], "the memory is written once, as one file"
        assert _memory(home, cursor) == {published_digest(home, d) for d in listed}
        assert (tmp_path / "home" / _memory_key(cursor)).stat().st_size == 8 * N_DROPS
        sha = json.loads(cursor)["published_sha256"]
        assert cursor == json.dumps(
            {"published_sha256": sha, "refused": [], "requested": {"pending.jsonl": pending_drop.version}}, sort_keys=True
        ), "the cursor (stored with every tick) names the memory and holds no digest: its size does not grow with the drops"

        runs, _, again = _tick(instance, cfg_path, cursor)
        assert runs == [] and home.take() == _memory_read(cursor) + _missing_pointer_reads("pending.jsonl"), (
            "the memory file (one read) and the drop never published: no other pointer"
        )
        assert home.take_writes() == [] and again == cursor, "nothing changed: nothing written, the same cursor"

        new = [write_jsonl(drops / f"new-{i}.jsonl", [{"text": f"{PT_TEXT} new {i}"}]) for i in range(3)]
        time.sleep(0.01)
        replaced = listed[7]
        write_jsonl(drops / replaced.relative_path, [{"text": PT_TEXT + " replaced"}])
        runs, _, after = _tick(instance, cfg_path, cursor)
        expected = sorted([p.name for p in new] + [replaced.key])
        assert sorted(r.partition_key for r in runs) == expected, "new files and a replaced one are seen"
        reads = home.take()
        assert sorted(reads) == sorted(
            _memory_read(cursor)
            + [r for p in new for r in _missing_pointer_reads(p.name)]
            + _pointer_reads(replaced.key)
            + _missing_pointer_reads("pending.jsonl")
        ), "exactly the memory and the pointers of the 4 changed drops (and the pending one): none of the other 299"
        assert sorted(home.take_writes()) == sorted([_memory_key(after)] + [f"crawl_drops/_registry/{k}.json" for k in expected])
        assert _memory_key(after) != _memory_key(cursor) and (tmp_path / "home" / _memory_key(cursor)).exists(), (
            "a changed set is a new file: the old one is never rewritten"
        )
        assert _memory(home, after) == {published_digest(home, d) for d in listed if d != replaced}, "the replaced drop is forgotten"
        cursor = after

        runs, _, after = _tick(instance, cfg_path, cursor)
        assert runs == [], "requested: not asked for twice"
        assert len(home.take()) == 1 + 2 * 5, "but looked up on every tick until published (or failed, like pending)"
        assert home.take_writes() == [] and after == cursor

        now = {d.key: d for d in list_drops(LocalStorage(drops), ("*.jsonl",)).drops}
        _publish(home, [now[k] for k in expected])  # their runs succeed
        home.take(), home.take_writes()
        runs, _, after = _tick(instance, cfg_path, cursor)
        assert runs == [] and sorted(home.take()) == sorted(
            _memory_read(cursor) + [r for k in expected for r in _pointer_reads(k)] + _missing_pointer_reads("pending.jsonl")
        )
        assert home.take_writes() == [_memory_key(after)] and len(_memory(home, after)) == N_DROPS + 3
        cursor = after
        runs, _, after = _tick(instance, cfg_path, cursor)
        assert runs == [] and home.take() == _memory_read(cursor) + _missing_pointer_reads("pending.jsonl"), "known published now"
        assert home.take_writes() == [] and after == cursor

        gone = listed[11]
        (drops / gone.relative_path).unlink()
        runs, _, after = _tick(instance, cfg_path, cursor)
        assert runs == [] and home.take() == _memory_read(cursor) + _missing_pointer_reads("pending.jsonl")
        assert home.take_writes() == [_memory_key(after)] and len(_memory(home, after)) == N_DROPS + 2, "a deleted drop is forgotten"
        cursor = after
        time.sleep(0.01)
        write_jsonl(drops / gone.relative_path, [{"text": PT_TEXT + " dropped again"}])
        runs, _, after = _tick(instance, cfg_path, cursor)
        assert [r.partition_key for r in runs] == [gone.key], "dropped again with new content: a new version, ingested"
        assert sorted(home.take()) == sorted(_memory_read(cursor) + _pointer_reads(gone.key) + _missing_pointer_reads("pending.jsonl"))
        assert home.take_writes() == [f"crawl_drops/_registry/{gone.key}.json"], "not published yet: the same memory"
        assert _memory_key(after) == _memory_key(cursor)


def test_every_cursor_format_and_a_lost_memory(tmp_path, isolated_env, monkeypatch):
    """A cursor naming no memory file (the first sensor's, or any other) reads every pointer once and writes the
    memory file; a memory file that is missing (removed by gc) or does not hold what its name says, or a cursor naming no SHA-256, means every
    pointer is read again, and the memory is written anew."""
    import base64

    from synth_cpt.ingest.drops import published_digest

    drops = tmp_path / "drops"
    for i in range(5):
        write_jsonl(drops / f"{i}.jsonl", [{"text": f"{PT_TEXT} {i}"}])
    listed = list_drops(LocalStorage(drops), ("*.jsonl",)).drops
    home = ReadCountingTestStorage(tmp_path / "home")
    _publish(home, listed)
    digests = sorted(published_digest(home, d) for d in listed)
    sha = hashlib.sha256(b"".join(digests)).hexdigest()
    memory_file = tmp_path / "home" / f"_sensor/published/{sha}.bin"
    every_pointer = [r for d in listed for r in _pointer_reads(d.key)]
    cfg_path = _config_file(tmp_path, str(drops))
    monkeypatch.setattr(PipelineResource, "storage", lambda self: home)
    with DagsterInstance.ephemeral() as instance:
        inline = json.dumps({"published": base64.b64encode(b"".join(digests)).decode(), "requested": {}, "refused": []})
        home.take(), home.take_writes()
        runs, _, cursor = _tick(instance, cfg_path, inline)
        assert runs == [] and home.take() == every_pointer, "a cursor naming no memory file: every pointer once"
        assert home.take_writes() == [f"_sensor/published/{sha}.bin"] and memory_file.read_bytes() == b"".join(digests)
        assert cursor == json.dumps({"published_sha256": sha, "refused": [], "requested": {}}, sort_keys=True)

        memory_file.unlink()  # removed by gc
        runs, _, after = _tick(instance, cfg_path, cursor)
        assert runs == [] and home.take() == _memory_read(cursor) + every_pointer, "lost: every pointer once"
        assert home.take_writes() == [f"_sensor/published/{sha}.bin"] and after == cursor and memory_file.read_bytes() == b"".join(digests)

        memory_file.write_bytes(b"".join(digests[:4]))  # not what its name says
        runs, _, after = _tick(instance, cfg_path, cursor)
        assert runs == [] and home.take() == _memory_read(cursor) + every_pointer and after == cursor
        assert home.take_writes() == [f"_sensor/published/{sha}.bin"] and memory_file.read_bytes() == b"".join(digests)

        for name in ("../../../etc/passwd", 42, sha.upper()):
            runs, _, after = _tick(instance, cfg_path, json.dumps({"published_sha256": name, "requested": {}, "refused": []}))
            assert runs == [] and home.take() == every_pointer and after == cursor, name
            assert home.take_writes() == [f"_sensor/published/{sha}.bin"]


def test_a_damaged_or_foreign_memory_reads_every_pointer_again(tmp_path, isolated_env, monkeypatch):
    """Never trust what cannot be decoded, nor digests of another storage root (storage_root changed: its drops
    are not published in the new root)."""
    import base64

    from synth_cpt.ingest.drops import plan_drops, published_digest

    drops = tmp_path / "drops"
    for i in range(5):
        write_jsonl(drops / f"{i}.jsonl", [{"text": f"{PT_TEXT} {i}"}])
    listed = list_drops(LocalStorage(drops), ("*.jsonl",)).drops
    old_root, new_root = ReadCountingTestStorage(tmp_path / "old"), ReadCountingTestStorage(tmp_path / "new")
    _publish(old_root, listed)
    memory = {published_digest(old_root, d) for d in listed}
    assert plan_drops(old_root, listed, 0, known_published=memory).pointers_read == 0
    plan = plan_drops(new_root, listed, 0, known_published=memory)
    assert plan.new == listed and plan.pointers_read == 5, "published in the old root is not published here"

    raw = b"".join(sorted(memory))
    inline = base64.b64encode(raw).decode()
    sha = hashlib.sha256(raw).hexdigest()
    (tmp_path / "new/_sensor/published").mkdir(parents=True)
    (tmp_path / "new/_sensor/published" / f"{sha}.bin").write_bytes(raw)  # the old root's memory, copied with the files
    cfg_path = _config_file(tmp_path, str(drops))
    monkeypatch.setattr(PipelineResource, "storage", lambda self: new_root)
    with DagsterInstance.ephemeral() as instance:
        for damaged in ({"published": "not base64!"}, {"published": inline[:-4] + "AAA="}, {"published": inline}):
            new_root.take()
            runs, _, cursor = _tick(instance, cfg_path, json.dumps({**damaged, "requested": {}, "refused": []}))
            assert len(runs) == 5 and len(new_root.take()) == 10, damaged
            assert json.loads(cursor)["published_sha256"] is None, "nothing published here: no memory file"
        runs, _, cursor = _tick(instance, cfg_path, json.dumps({"published_sha256": sha, "requested": {}, "refused": []}))
        assert len(runs) == 5 and len(new_root.take()) == 1 + 10, "a memory file of another root"


class ServerRequests:
    """Every request the moto server answers, as (method, path with query): reads are counted at the server."""

    def __init__(self, monkeypatch) -> None:
        from urllib.parse import unquote, urlparse

        from moto.s3.responses import S3Response

        self.seen: list[tuple[str, str]] = []
        seen = self.seen
        for name in ("key_response", "bucket_response"):
            original = getattr(S3Response, name)

            def answer(self, request, full_url, headers, _original=original):
                url = urlparse(full_url)
                seen.append((request.method, unquote(url.path) + (f"?{url.query}" if url.query else "")))
                return _original(self, request, full_url, headers)

            monkeypatch.setattr(S3Response, name, answer)

    def take(self) -> list[tuple[str, str]]:
        taken = list(self.seen)
        self.seen.clear()
        return taken


def test_s3_tick_counted_at_the_server(tmp_path, isolated_env, s3_bucket, monkeypatch):
    """Drops and storage root on S3: once the memory is there, a tick is one listing (one page) and one GET (the memory
    file); k new drops cost exactly their k look-ups (two HEADs each: pointer, pre-versions manifest)."""
    client, bucket = s3_bucket
    n = 60
    for i in range(n):
        client.put_object(Bucket=bucket, Key=f"drops/{i:03d}.jsonl", Body=f'{{"text": "{PT_TEXT} {i}"}}\n'.encode())
    cfg_path = tmp_path / "pipeline.yaml"
    cfg_path.write_text(
        yaml.safe_dump({"storage_root": f"s3://{bucket}/home", "drops": {"location": f"s3://{bucket}/drops", "settle_seconds": 0}})
    )
    home = S3Storage(f"s3://{bucket}/home", client=client)
    _publish(home, list_drops(S3Storage(f"s3://{bucket}/drops", client=client), ("*.jsonl",)).drops)
    server = ServerRequests(monkeypatch)
    with DagsterInstance.ephemeral() as instance:
        runs, _, cursor = _tick(instance, cfg_path)
        first = server.take()
        assert runs == [] and sum(m == "HEAD" for m, _ in first) == n and sum(m == "GET" and "current.json" in p for m, p in first) == n
        memory = f"/{bucket}/home/{_memory_key(cursor)}"
        assert [r for r in first if r[0] == "PUT"] == [("PUT", memory)], "the memory: one PUT"
        runs, _, again = _tick(instance, cfg_path, cursor)
        assert runs == [] and server.take() == [("GET", f"/{bucket}?list-type=2&prefix=drops%2F&encoding-type=url"), ("GET", memory)]
        assert again == cursor
        for i in range(2):
            client.put_object(Bucket=bucket, Key=f"drops/new-{i}.jsonl", Body=b'{"text": "new"}\n')
        client.put_object(Bucket=bucket, Key="drops/005.jsonl", Body=b'{"text": "replaced"}\n')
        runs, _, cursor = _tick(instance, cfg_path, cursor)
        assert sorted(r.partition_key for r in runs) == ["005.jsonl", "new-0.jsonl", "new-1.jsonl"]
        reads = [(m, p) for m, p in server.take() if m in ("GET", "HEAD") and "list-type" not in p]
        assert sorted(reads) == sorted(
            [
                ("HEAD", f"/{bucket}/home/crawl_drops/{k}/{f}")
                for k in ("new-0.jsonl", "new-1.jsonl")
                for f in ("current.json", "manifest.json")
            ]
            + [
                ("HEAD", f"/{bucket}/home/crawl_drops/005.jsonl/current.json"),
                ("GET", f"/{bucket}/home/crawl_drops/005.jsonl/current.json"),
                ("GET", memory),
            ]
        )


def test_s3_listing_of_more_than_1000_keys_is_paginated(s3_bucket, monkeypatch):
    """ListObjectsV2 answers at most 1000 keys: 1,005 drops take two pages, and every drop is listed."""
    from concurrent.futures import ThreadPoolExecutor

    client, bucket = s3_bucket
    keys = [f"drops/{i:04d}.jsonl" for i in range(1005)]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda k: client.put_object(Bucket=bucket, Key=k, Body=b'{"text": "x"}\n'), keys))
    server = ServerRequests(monkeypatch)
    listing = list_drops(S3Storage(f"s3://{bucket}/drops", client=client), ("*.jsonl",))
    assert [d.relative_path for d in listing.drops] == [k.removeprefix("drops/") for k in keys]
    pages = server.take()
    assert [m for m, _ in pages] == ["GET", "GET"] and all("list-type=2" in p for _, p in pages)
    assert "continuation-token=" in pages[1][1], "the second page continues the first"
