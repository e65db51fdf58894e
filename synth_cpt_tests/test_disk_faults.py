"""Disk full, read-only targets and refused PUTs while publishing: the run fails with a message naming the
target and the errno's meaning, the previous version stays published and readable, and nothing half
written looks published (no pointer change, no marker, no candidate `.<name>.<id>.tmp` file).

Tests run as root (here and in CI), so chmod blocks nothing. The faults are real: a small tmpfs filled
to the brim (ENOSPC) and a read-only bind mount (EROFS), mounted by the test on its own tmp folder. When
the container may not mount (no CAP_SYS_ADMIN), the same errno is raised at the one OS call every local
write goes through (`os.fsync` of the candidate in `LocalStorage.writing`), and the test says so. On S3
the server itself refuses: a bucket policy denying s3:PutObject (moto enforces Deny statements).
"""

import errno
import json
import os
import subprocess
import uuid
from pathlib import Path

import pytest
from dagster import DagsterInstance

from synth_cpt.core.storage import LocalStorage, S3Storage, Storage, StorageWriteError, is_candidate
from synth_cpt.ingest.drops import ingest_drop
from synth_cpt.ingest.sources import list_drops

from .conftest import PT_TEXT, make_config, write_jsonl

DROP = "2026-11-01.jsonl"


def _mount(*args: str) -> bool:
    return subprocess.run(["mount", *args], capture_output=True).returncode == 0


def _docs(n: int) -> list[dict]:
    return [{"text": f"{PT_TEXT} Registo {i}: {uuid.uuid4().hex} {uuid.uuid4().hex}."} for i in range(n)]


def _ingest(tmp_path, storage: Storage):
    cfg = make_config(tmp_path)
    (drop,) = list_drops(LocalStorage(tmp_path / "drops"), cfg.drops.patterns).drops
    return ingest_drop(cfg, storage, LocalStorage(tmp_path / "drops"), drop)


def _published_state(storage: Storage) -> tuple[bytes, list[str]]:
    return storage.read_bytes(f"crawl_drops/{DROP}/current.json"), storage.list("")


def _assert_previous_intact(storage: Storage, pointer: bytes, keys_before: list[str], documents: int) -> None:
    now, keys_after = _published_state(storage)
    assert now == pointer, "the pointer is unchanged"
    prefix = json.loads(pointer)["prefix"]
    assert storage.read_parquet(f"{prefix}/docs.parquet").height == documents, "the previous version is whole and readable"
    new = sorted(set(keys_after) - set(keys_before))
    print("left after the failed publish:", new)
    assert not [k for k in new if "/_published/" in k or k.endswith("current.json")], "no marker or pointer for the failed version"
    if isinstance(storage, LocalStorage):  # listings hide candidates: look at the folder itself
        left = [p for p in Path(storage.root).rglob("*") if is_candidate(p.name)]
        assert left == [], "no candidate file left"


@pytest.fixture
def tmpfs_home(tmp_path):
    """A 256 KiB tmpfs at tmp_path/home (None when this container may not mount)."""
    home = tmp_path / "home"
    home.mkdir()
    if not _mount("-t", "tmpfs", "-o", "size=256k", "tmpfs", str(home)):
        yield None
        return
    yield home
    subprocess.run(["umount", "-l", str(home)], check=True)


def test_disk_full_while_publishing_keeps_the_previous_version(tmp_path, tmpfs_home, monkeypatch):
    write_jsonl(tmp_path / "drops" / DROP, _docs(1))
    home = LocalStorage(tmp_path / "home")
    assert _ingest(tmp_path, home).documents == 1
    pointer, keys = _published_state(home)
    write_jsonl(tmp_path / "drops" / DROP, _docs(400))  # a bigger drop arrives
    if tmpfs_home is not None:
        st = os.statvfs(tmpfs_home)
        free = st.f_bavail * st.f_frsize
        (tmpfs_home / "filler").write_bytes(b"\0" * (free - 16 * 1024))  # 16 KiB left
        print(f"tmpfs: {st.f_blocks * st.f_frsize} bytes, {free} free before filling, 16384 after")
    else:
        print("mount not permitted here: ENOSPC raised at os.fsync, the OS call every local write ends with")

        def full(fd):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(StorageWriteError) as failed:
        _ingest(tmp_path, home)
    monkeypatch.undo()
    message = str(failed.value)
    print("message:", message)
    assert failed.value.errno == errno.ENOSPC
    assert f"could not write {tmp_path / 'home' / 'crawl_drops' / DROP}/v/" in message
    assert "No space left on device (ENOSPC); nothing was published there, the previous version is unchanged" in message
    _assert_previous_intact(home, pointer, keys, 1)


def test_read_only_target_fails_the_asset_with_a_clear_message(tmp_path, monkeypatch):
    """Through Dagster: the crawl_drops run fails, and its error names the target and EROFS."""
    import yaml

    from synth_cpt.defs.definitions import build_definitions

    write_jsonl(tmp_path / "drops" / DROP, _docs(1))
    cfg = tmp_path / "pipeline.yaml"
    cfg.write_text(
        yaml.safe_dump({"storage_root": str(tmp_path / "home"), "drops": {"location": str(tmp_path / "drops"), "settle_seconds": 0}})
    )
    monkeypatch.setenv("SYNTH_CPT_CONFIG", str(cfg))
    monkeypatch.delenv("SYNTH_CPT_HOME", raising=False)
    monkeypatch.delenv("SYNTH_CPT_DROPS", raising=False)
    defs = build_definitions()
    job = defs.resolve_job_def("ingest_drop_job")
    home = LocalStorage(tmp_path / "home")
    with DagsterInstance.ephemeral() as instance:
        instance.add_dynamic_partitions("crawl_drops", [DROP])
        assert job.execute_in_process(instance=instance, partition_key=DROP).success
        pointer, keys = _published_state(home)
        write_jsonl(tmp_path / "drops" / DROP, _docs(3))
        bound = _mount("--bind", str(tmp_path / "home"), str(tmp_path / "home"))
        mounted = bound and _mount("-o", "remount,bind,ro", str(tmp_path / "home"))
        if bound and not mounted:  # bound but not read-only: undo it, then fall back to the injected errno
            subprocess.run(["umount", str(tmp_path / "home")], check=True)
        try:
            if not mounted:
                print("mount not permitted here: EROFS raised at os.fsync, the OS call every local write ends with")

                def read_only(fd):
                    raise OSError(errno.EROFS, os.strerror(errno.EROFS))

                monkeypatch.setattr(os, "fsync", read_only)
            result = job.execute_in_process(instance=instance, partition_key=DROP, raise_on_error=False)
        finally:
            if mounted:
                subprocess.run(["umount", str(tmp_path / "home")], check=True)
            monkeypatch.undo()  # the real os.fsync again
    assert not result.success
    (failure,) = [e.event_specific_data.error for e in result.all_events if e.is_step_failure]
    error = failure.cause  # Dagster's "Error occurred while executing op" wraps the asset's own error
    print("step failure:", failure.message.strip(), "caused by:", error.message.strip())
    assert error.cls_name == "StorageWriteError"
    assert error.message.startswith(f"synth_cpt.core.storage.StorageWriteError: [Errno 30] could not write {tmp_path / 'home'}/")
    assert "Read-only file system (EROFS); nothing was published there, the previous version is unchanged" in error.message
    _assert_previous_intact(home, pointer, keys, 1)


def test_s3_put_refused_keeps_the_previous_version(tmp_path, s3_bucket):
    client, bucket = s3_bucket
    write_jsonl(tmp_path / "drops" / DROP, _docs(1))
    home = S3Storage(f"s3://{bucket}/home", client=client)
    assert _ingest(tmp_path, home).documents == 1
    pointer, keys = _published_state(home)
    write_jsonl(tmp_path / "drops" / DROP, _docs(3))
    deny = {"Effect": "Deny", "Principal": "*", "Action": "s3:PutObject", "Resource": f"arn:aws:s3:::{bucket}/*"}
    client.put_bucket_policy(Bucket=bucket, Policy=json.dumps({"Version": "2012-10-17", "Statement": [deny]}))
    try:
        with pytest.raises(StorageWriteError) as failed:
            _ingest(tmp_path, home)
    finally:
        client.delete_bucket_policy(Bucket=bucket)
    message = str(failed.value)
    print("message:", message)
    assert f"could not write s3://{bucket}/home/crawl_drops/{DROP}/v/" in message
    assert "Forbidden" in message and message.endswith("nothing was published there, the previous version is unchanged")
    _assert_previous_intact(home, pointer, keys, 1)

    missing = S3Storage(f"s3://{bucket}-missing/home", client=client)
    with pytest.raises(StorageWriteError) as no_bucket:
        _ingest(tmp_path, missing)
    print("message:", no_bucket.value)
    assert f"could not write s3://{bucket}-missing/home/crawl_drops/{DROP}/v/" in str(no_bucket.value)
    assert "(NoSuchBucket)" in str(no_bucket.value)


def test_only_the_candidates_own_write_errors_become_a_storage_write_error(tmp_path):
    """A full disk or denied access while the candidate is written says which target could not be written; the
    same errno naming another file (an input the body reads, a scratch file elsewhere) is the body's own error
    and keeps its type and message, and the candidate is removed either way."""
    storage = LocalStorage(tmp_path / "home")
    elsewhere = str(tmp_path / "scratch" / "spill.bin")
    cases = [
        (OSError(errno.ENOSPC, "No space left on device"), StorageWriteError),  # a write() on the fd: no file named
        (OSError(errno.ENOSPC, "No space left on device", elsewhere), OSError),
        (PermissionError(errno.EACCES, "Permission denied", elsewhere), PermissionError),
    ]
    for error, expected in cases:
        with pytest.raises(OSError) as raised:
            with storage.writing("out/table.parquet") as tmp:
                tmp.write_bytes(b"half")
                raise error
        print(f"{error!r} -> {type(raised.value).__name__}: {raised.value}")
        assert type(raised.value) is expected
        assert ("could not write" in str(raised.value)) == (expected is StorageWriteError)
        assert [p for p in (tmp_path / "home").rglob("*") if p.is_file()] == [], "the candidate is gone"


def test_s3_copy_of_a_missing_source_is_not_found_and_a_full_staging_disk_names_the_target(tmp_path, s3_bucket):
    client, bucket = s3_bucket
    home = S3Storage(f"s3://{bucket}/home", client=client)
    with pytest.raises(FileNotFoundError) as missing:
        home.copy("nowhere/source.parquet", "out/copy.parquet")
    print("copy:", missing.value)
    assert not isinstance(missing.value, StorageWriteError)
    assert f"s3://{bucket}/home/nowhere/source.parquet does not exist" in str(missing.value)

    with pytest.raises(StorageWriteError) as full:
        with home.writing("out/table.parquet") as staged:
            staged.write_bytes(b"half")
            raise OSError(errno.ENOSPC, "No space left on device")
    print("staging:", full.value)
    assert f"could not write s3://{bucket}/home/out/table.parquet (staged in " in str(full.value)
    assert "(ENOSPC)" in str(full.value)
    assert home.list("out") == [], "nothing was uploaded"


class MissingBucketTestClient:
    """A test double of boto3's S3 client where the bucket is gone, answering as real S3 does: a bare 404 to the
    copy's HEAD of its source and to head_bucket (moto names NoSuchBucket instead)."""

    def _404(self, operation: str):
        from botocore.exceptions import ClientError

        return ClientError({"Error": {"Code": "404", "Message": "Not Found"}}, operation)

    def copy(self, *args, **kwargs):
        raise self._404("HeadObject")

    def head_bucket(self, **kwargs):
        raise self._404("HeadBucket")


def test_s3_copy_into_a_missing_bucket_is_a_failed_write_not_a_missing_source():
    storage = S3Storage("s3://gone-bucket/home", client=MissingBucketTestClient())
    with pytest.raises(StorageWriteError) as failed:
        storage.copy("a/source.parquet", "b/target.parquet")
    print("copy into a missing bucket:", failed.value)
    assert "could not write s3://gone-bucket/home/b/target.parquet" in str(failed.value)
