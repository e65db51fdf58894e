"""Path security in drop locations: `..`, absolute names, symlinks out of the folder, NUL and control
characters are refused with a reason in the listing's `refused`, and never read, on a local folder and
on S3 (moto server on 127.0.0.1).

"Never read" is measured, not assumed: locally a refused file holds a marker text that no ingested
document may contain; on S3 every GetObject the client sends is recorded and none names a refused key.
"""

import json
import os

import pytest
from dagster import DagsterInstance, build_sensor_context

from synth_cpt.core.config import load_config
from synth_cpt.core.storage import LocalStorage, S3Storage, unsafe_path
from synth_cpt.defs.resources import PipelineResource
from synth_cpt.defs.sensors import crawl_drop_sensor
from synth_cpt.ingest.drops import ingest_drop
from synth_cpt.ingest.sources import list_drops

from .conftest import PT_TEXT, write_jsonl

SECRET = "SEGREDO fora da pasta de entregas"


def test_unsafe_path_names_each_reason():
    assert unsafe_path("2026/11/a.jsonl") is None
    assert unsafe_path("..hidden-but-inside.jsonl") is None, "'..' inside a name is not a segment"
    assert unsafe_path("../evil.jsonl") == "'..' segment climbs out of the location"
    assert unsafe_path("a/../../evil.jsonl") == "'..' segment climbs out of the location"
    assert unsafe_path("/etc/passwd") == "absolute path"
    assert unsafe_path("a\x00.jsonl") == "name contains a NUL byte"
    assert unsafe_path("a\x01.jsonl") == "name contains a control character"
    assert unsafe_path("a\n.jsonl") == "name contains a control character"
    assert unsafe_path("a//b.jsonl") == "empty or '.' segment (the name is not in its one normal form)"
    assert unsafe_path("a/./b.jsonl") == "empty or '.' segment (the name is not in its one normal form)"


def test_a_drop_swapped_for_a_symlink_after_its_name_was_checked_is_refused_by_what_was_opened(tmp_path, monkeypatch):
    """The race a name check alone loses: the file is replaced by a symlink out of the folder after
    `_readable` said yes. The swap is made to land in that window by letting the check run first, then
    swapping, then opening."""
    drops, outside = tmp_path / "drops", tmp_path / "outside.jsonl"
    drops.mkdir()
    outside.write_text(json.dumps({"text": SECRET}) + "\n")
    (drops / "a.jsonl").write_text(json.dumps({"text": PT_TEXT}) + "\n")
    storage = LocalStorage(drops)
    checked = storage._readable

    def check_then_swap(key: str):
        path = checked(key)  # the name check passes on the regular file
        path.unlink()
        path.symlink_to(outside)  # and then the file is swapped
        return path

    monkeypatch.setattr(storage, "_readable", check_then_swap)
    with pytest.raises(PermissionError) as refused:
        storage.open("a.jsonl")
    print("refused:", refused.value)
    assert f"opened {outside}, outside" in str(refused.value)


def _sensor_tick(config_path):
    with DagsterInstance.ephemeral() as instance:
        ctx = build_sensor_context(instance=instance, resources={"pipeline": PipelineResource(config_path=str(config_path))})
        result = crawl_drop_sensor(ctx)
        return sorted(r.partition_key for r in result.run_requests or []), json.loads(result.cursor)["refused"]


def _config(tmp_path, location):
    import yaml

    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump({"storage_root": str(tmp_path / "home"), "drops": {"location": location, "settle_seconds": 0}}))
    return path


def test_local_drop_folder_refuses_every_escape_and_reads_none(tmp_path, isolated_env):
    drops = tmp_path / "drops"
    write_jsonl(drops / "good.jsonl", [{"text": PT_TEXT}])
    write_jsonl(drops / "inner/also good.jsonl", [{"text": PT_TEXT + " 2"}])
    outside = write_jsonl(tmp_path / "outside/secret.jsonl", [{"text": SECRET}])
    os.symlink(outside, drops / "file-link-out.jsonl")  # a file symlink out of the folder
    os.symlink(tmp_path / "outside", drops / "folder-link-out")  # a folder symlink out of the folder
    os.symlink(drops / "good.jsonl", drops / "link-inside.jsonl")  # a symlink that stays inside: allowed
    os.symlink(tmp_path / "missing.jsonl", drops / "dangling.jsonl")
    write_jsonl(drops / "ctl\x01name.jsonl", [{"text": SECRET}])  # a control character (NUL is impossible in a local name)
    location = LocalStorage(drops)

    listing = list_drops(location, ("*.jsonl",))
    assert [d.relative_path for d in listing.drops] == ["good.jsonl", "inner/also good.jsonl", "link-inside.jsonl"]
    refused = sorted(listing.refused)
    print("refused:", *refused, sep="\n  ")
    assert refused == sorted(
        [
            f"{drops / 'folder-link-out'}: symlinked folder refused (files must live in {drops})",
            f"file-link-out.jsonl: symlink to {outside} escapes {drops}; refused",
            f"dangling.jsonl: symlink to {tmp_path / 'missing.jsonl'} escapes {drops}; refused",
            "'ctl\\x01name.jsonl': name contains a control character; refused",
        ]
    )

    # keys nobody listed (a hand-written partition key, a registry) are refused before anything is opened
    for key, why in [
        ("../outside/secret.jsonl", "'..' segment climbs out of the location"),
        (str(outside), "absolute path"),
        ("good\x00.jsonl", "name contains a NUL byte"),
        ("file-link-out.jsonl", f"resolves to {outside}, outside {drops}"),
        ("folder-link-out/secret.jsonl", f"resolves to {outside}, outside {drops}"),
    ]:
        with pytest.raises(PermissionError) as refused_open:
            location.open(key)
        assert refused_open.value.strerror == f"{key!r}: {why}; refused"
        with pytest.raises(PermissionError):
            with location.local_path(key):
                pass

    # a file swapped for a symlink out of the folder after it was listed is refused when read
    (good,) = [d for d in list_drops(location, ("good.jsonl",)).drops]
    (drops / "good.jsonl").unlink()
    os.symlink(outside, drops / "good.jsonl")
    with pytest.raises(PermissionError):
        ingest_drop(load_config(_config(tmp_path, str(drops))), LocalStorage(tmp_path / "home"), location, good)

    keys, sensor_refused = _sensor_tick(_config(tmp_path, str(drops)))
    assert keys == ["inner__also_good.jsonl-" + keys[0].rsplit("-", 1)[1]], "only the file that stayed a file inside"
    assert len(sensor_refused) == 6, sensor_refused  # the four above, plus good.jsonl and link-inside.jsonl now pointing out
    home = tmp_path / "home"
    assert not any(SECRET.encode() in p.read_bytes() for p in home.rglob("*") if p.is_file()), "no refused file was read"


def test_s3_drop_prefix_refuses_every_unsafe_key_and_never_gets_it(tmp_path, isolated_env, s3_bucket):
    client, bucket = s3_bucket
    good = json.dumps({"text": PT_TEXT}).encode() + b"\n"
    secret = json.dumps({"text": SECRET}).encode() + b"\n"
    client.put_object(Bucket=bucket, Key="drops/good.jsonl", Body=good)
    unsafe = {
        "drops/../evil.jsonl": "'..' segment climbs out of the location",
        "drops/a/../../evil2.jsonl": "'..' segment climbs out of the location",
        "drops//abs.jsonl": "absolute path",
        "drops/a//b.jsonl": "empty or '.' segment (the name is not in its one normal form)",
        "drops/a/./b.jsonl": "empty or '.' segment (the name is not in its one normal form)",
        "drops/nul\x00.jsonl": "name contains a NUL byte",
        "drops/ctl\x01.jsonl": "name contains a control character",
    }
    for key in unsafe:
        client.put_object(Bucket=bucket, Key=key, Body=secret)
    client.put_object(Bucket=bucket, Key="evil.jsonl", Body=secret)  # where a normalized '..' would land

    location = S3Storage(f"s3://{bucket}/drops", client=client)
    gets: list[str] = []
    client.meta.events.register("provide-client-params.s3.GetObject", lambda params, **_: gets.append(params["Key"]))

    listing = list_drops(location, ("*.jsonl",))
    assert [d.relative_path for d in listing.drops] == ["good.jsonl"]
    print("refused:", *listing.refused, sep="\n  ")
    assert sorted(listing.refused) == sorted(
        f"s3://{bucket}/{k!r}: {why} (under s3://{bucket}/drops); refused" for k, why in unsafe.items()
    )
    for key in ("../evil.jsonl", "/abs.jsonl", "nul\x00.jsonl", "a//b.jsonl"):
        with pytest.raises(PermissionError):
            location.open(key)
        with pytest.raises(PermissionError):
            location.read_bytes(key)
        with pytest.raises(PermissionError):
            with location.local_path(key):
                pass
    assert gets == [], "a refused key is never requested"

    report = ingest_drop(
        load_config(_config(tmp_path, f"s3://{bucket}/drops")), LocalStorage(tmp_path / "home"), location, listing.drops[0]
    )
    assert report.documents == 1
    keys, sensor_refused = _sensor_tick(_config(tmp_path, f"s3://{bucket}/drops"))
    assert keys == [] and len(sensor_refused) == len(unsafe), "the published drop is not asked again; every unsafe key refused"
    print("GetObject keys:", gets)
    assert gets == ["drops/good.jsonl"], "only the safe drop was ever read"
