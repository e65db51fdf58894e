"""The drop sensor at 10,000 published drops: one tick of ours against the pre-issue-18 sensor, same drops, same tick.

For each backend, a local folder and S3 (a moto server in server mode on 127.0.0.1, started and stopped
here in a process of its own, like a remote S3), N drops (default 10,000 small JSONL files, keys spread
over 30 dates) are published: each drop's pointer and marker are written by the real publishing code
(`publish_drop`, on a local root), at the drop's listed version (local mtime and size, S3 ETag); for S3
those files are then put into the server as they are, through moto's backend (30,000 PUTs over HTTP would
take minutes and measure nothing). Then, with Dagster's `build_sensor_context` and the real `PipelineResource`:

- **upgrade**: ours' first tick with the cursor the old sensor leaves when every drop is published
  (`{"refused": [], "requested": {}}`): it reads every pointer once and remembers what is published (one
  memory file under the storage root, `_sensor/published/<sha256>.bin`, which the cursor names);
- **idle**: ours with that cursor, nothing new (the tick every 30 s of a quiet day): the listing and one
  read of the memory file;
- then `--new` drops (default 10) appear, and the measured tick runs on N + new drops, alternately:
  **baseline** `benchmarks/baselines/sensor_v0.py` (the sensor and `plan_drops` before issue 18: every
  tick reads every drop's pointer) with the old cursor, and **ours** with its cursor from the upgrade
  tick. Both must request exactly the new drops, or the script fails. Best of `--repeats` each.

Reads are counted where they happen: on S3 every request the moto server answers (object GET and HEAD
are `gets`, listing pages `lists`, PUTs `puts`); locally every `exists`, `read_bytes` and `open` of the
storage root. Ours on S3 for k new drops is 2k HEADs (a missing pointer, then the pre-versions
manifest) and 1 GET (the memory file), plus the listing (10 pages at 10,000) and the registry writes of
the new drops. The cursor's size is printed (Dagster stores it with every tick), and the memory file's.

    python benchmarks/sensor.py [--drops 10000] [--new 10] [--repeats 2] [--only local|s3] [--root DIR]

Last lines: RESULT sensor_local ..., then RESULT sensor tick_s=<ours, S3, N + new> gets=<ours> ratio=<baseline_s/ours_s>
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PATTERNS = ("*.jsonl",)
OLD_CURSOR = json.dumps({"requested": {}, "refused": []}, sort_keys=True)  # what sensor_v0 leaves when every drop is published


def drop_name(i: int) -> str:
    return f"2026-11-{i % 30 + 1:02d}/crawl-{i:05d}.jsonl"


def drop_body(i: int) -> bytes:
    return json.dumps({"text": f"Documento {i} da coleta de novembro.", "url": f"https://example.org/{i}"}).encode() + b"\n"


def publish_all(home, drops) -> None:
    """Each drop published at its listed version through the real publishing code (threads: each write waits on fsync)."""
    from synth_cpt.core.publish import new_version
    from synth_cpt.ingest.drops import publish_drop

    with ThreadPoolExecutor(8) as pool:  # one drop per task: no two tasks write under the same prefix
        list(
            pool.map(
                lambda d: publish_drop(home, d.key, new_version(), {"drop_id": d.key, "source_version": d.version, "bytes": d.size}), drops
            )
        )


def _storage_root(config: Path) -> str:
    import yaml

    return yaml.safe_load(config.read_text())["storage_root"]


def write_config(path: Path, root: str, drops: str) -> Path:
    import yaml

    path.write_text(yaml.safe_dump({"storage_root": root, "drops": {"location": drops, "settle_seconds": 0, "patterns": list(PATTERNS)}}))
    return path


class LocalReads:
    """exists / read_bytes / open of the local storage root named, counted (the sensor opens its own storage)."""

    def __init__(self, root: Path) -> None:
        from synth_cpt.core.storage import LocalStorage

        self.root, self.counts = str(root.resolve()), Counter()
        for name in ("exists", "read_bytes", "open"):
            original = getattr(LocalStorage, name)

            def counted(storage, key, _original=original, _name=name):
                if storage.root == self.root:
                    self.counts[_name] += 1
                return _original(storage, key)

            setattr(LocalStorage, name, counted)

    def take(self) -> dict[str, int]:
        taken = {"gets": sum(self.counts.values()), **self.counts}
        self.counts.clear()
        return taken


class ServerRequests:
    """Every request the moto server answers, by kind: object GET and HEAD (`gets`), listing pages, PUTs."""

    def __init__(self) -> None:
        from moto.s3.responses import S3Response

        self.counts: Counter = Counter()
        for name in ("key_response", "bucket_response"):
            original = getattr(S3Response, name)

            def answer(response, request, full_url, headers, _original=original, _name=name):
                if request.method in ("GET", "HEAD"):
                    self.counts["lists" if "list-type" in full_url else "gets"] += 1
                else:
                    self.counts[request.method.lower() + "s"] += 1
                return _original(response, request, full_url, headers)

            setattr(S3Response, name, answer)

    def take(self) -> dict[str, int]:
        taken = {"gets": 0, **self.counts}
        self.counts.clear()
        return taken


def tick(sensor, config: Path, cursor: str | None, instance) -> tuple[float, list[str], str]:
    """One evaluation of `sensor`: seconds, partition keys requested, the new cursor."""
    from dagster import build_sensor_context

    from synth_cpt.defs.resources import PipelineResource

    ctx = build_sensor_context(instance=instance, cursor=cursor, resources={"pipeline": PipelineResource(config_path=str(config))})
    t0 = time.perf_counter()
    result = sensor(ctx)
    seconds = time.perf_counter() - t0
    keys = sorted(r.partition_key for r in (result.run_requests or []))
    return seconds, keys, result.cursor


def scenario(name: str, config: Path, add_new, counter, n: int, new: int, repeats: int) -> dict:
    """The upgrade and idle ticks of ours, then baseline and ours alternately on N + new drops."""
    from dagster import DagsterInstance

    from benchmarks.baselines.sensor_v0 import crawl_drop_sensor as sensor_v0
    from synth_cpt.core.layout import sensor_memory_key
    from synth_cpt.core.storage import open_storage
    from synth_cpt.defs.sensors import MEMORY, crawl_drop_sensor, load_published

    out: dict = {}
    with DagsterInstance.ephemeral() as instance:
        counter.take()
        s, keys, cursor = tick(crawl_drop_sensor, config, OLD_CURSOR, instance)
        out["upgrade"] = (s, counter.take())
        assert keys == [], f"{name}: every drop is published, none may be requested ({len(keys)} were)"
        home = open_storage(_storage_root(config))
        sha = json.loads(cursor)[MEMORY]
        known, why = load_published(home, sha)
        assert known is not None and len(known) == n, f"{name}: the memory file holds every drop ({why})"
        out["cursor_chars"], out["memory_bytes"] = len(cursor), len(home.read_bytes(sensor_memory_key(sha)))
        counter.take()  # those two reads were the benchmark's, not the sensor's
        s, keys, _ = tick(crawl_drop_sensor, config, cursor, instance)
        out["idle"] = (s, counter.take())
        assert keys == []
        expected = add_new()
        counter.take()
        best: dict[str, tuple[float, dict]] = {}
        for _ in range(repeats):
            for side, sensor, start in (("baseline", sensor_v0, OLD_CURSOR), ("ours", crawl_drop_sensor, cursor)):
                s, keys, _ = tick(sensor, config, start, instance)
                counts = counter.take()
                assert keys == expected, f"{name} {side}: requested {keys[:5]}..., not the {new} new drops"
                if side not in best or s < best[side][0]:
                    best[side] = (s, counts)
                print(f"  {name} {side:<8} tick {s:7.3f} s  {counts}", flush=True)
        out.update(best)
    return out


def run_local(root: Path, n: int, new: int, repeats: int) -> dict:
    from synth_cpt.core.storage import LocalStorage
    from synth_cpt.ingest.sources import list_drops

    drops, home = root / "local-drops", root / "local-home"
    t0 = time.perf_counter()
    for i in range(n):
        path = drops / drop_name(i)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(drop_body(i))
    publish_all(LocalStorage(home), list_drops(LocalStorage(drops), PATTERNS).drops)
    print(f"local: {n:,} drops published in {time.perf_counter() - t0:.1f} s", flush=True)

    def add_new() -> list[str]:
        for i in range(n, n + new):
            path = drops / drop_name(i)
            path.write_bytes(drop_body(i))
        return sorted(
            d.key for d in list_drops(LocalStorage(drops), PATTERNS).drops if d.relative_path in {drop_name(i) for i in range(n, n + new)}
        )

    config = write_config(root / "local.yaml", str(home), str(drops))
    return scenario("local", config, add_new, LocalReads(home), n, new, repeats)


def serve_s3(conn) -> None:
    """The moto server in a process of its own (S3 is elsewhere too: its work is not the sensor's CPU), counting every
    request it answers; over `conn` it takes bulk puts (straight into its backend) and hands out the counts."""
    import logging

    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    counter = ServerRequests()
    conn.send(server.get_host_and_port())
    backend = s3_backends[DEFAULT_ACCOUNT_ID]["global"]
    while True:
        command, arg = conn.recv()
        if command == "put":
            bucket, items = arg
            for key, body in items:
                backend.put_object(bucket, key, body)
            conn.send(len(items))
        elif command == "take":
            conn.send(counter.take())
        else:
            server.stop()
            conn.send(None)
            return


class S3Server:
    """The parent's handle on `serve_s3`: its endpoint, bulk puts, and the request counts (`take`)."""

    def __init__(self) -> None:
        import multiprocessing

        context = multiprocessing.get_context("spawn")
        self.conn, child = context.Pipe()
        self.process = context.Process(target=serve_s3, args=(child,), daemon=True)
        self.process.start()
        host, port = self.conn.recv()
        self.endpoint = f"http://{host}:{port}"

    def put(self, bucket: str, items: list[tuple[str, bytes]]) -> None:
        for i in range(0, len(items), 2000):
            self.conn.send(("put", (bucket, items[i : i + 2000])))
            self.conn.recv()

    def take(self) -> dict[str, int]:
        self.conn.send(("take", None))
        return self.conn.recv()

    def stop(self) -> None:
        self.conn.send(("stop", None))
        self.conn.recv()
        self.process.join(10)


def run_s3(root: Path, n: int, new: int, repeats: int) -> dict:
    import boto3

    from synth_cpt.core.storage import LocalStorage, S3Storage
    from synth_cpt.ingest.sources import list_drops

    server = S3Server()
    try:
        os.environ.update(
            {
                "AWS_ACCESS_KEY_ID": "testing",
                "AWS_SECRET_ACCESS_KEY": "testing",
                "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_ENDPOINT_URL": server.endpoint,
            }
        )
        bucket = "synth-cpt-bench-sensor"
        client = boto3.client("s3")
        client.create_bucket(Bucket=bucket)
        t0 = time.perf_counter()
        server.put(bucket, [(f"drops/{drop_name(i)}", drop_body(i)) for i in range(n)])
        listed = list_drops(S3Storage(f"s3://{bucket}/drops", client=client), PATTERNS).drops  # over HTTP: the ETags
        assert len(listed) == n
        staging = root / "s3-home"  # the real publishing code writes the pointers at the S3 versions here...
        publish_all(LocalStorage(staging), listed)
        files = [p for p in staging.rglob("*") if p.is_file()]
        server.put(
            bucket, [(f"home/{p.relative_to(staging).as_posix()}", p.read_bytes()) for p in files]
        )  # ...the server gets them as they are
        print(f"s3: {n:,} drops and {len(files):,} pointer and marker files in {time.perf_counter() - t0:.1f} s", flush=True)

        def add_new() -> list[str]:
            with ThreadPoolExecutor(4) as pool:  # over HTTP, as a crawler would
                list(
                    pool.map(lambda i: client.put_object(Bucket=bucket, Key=f"drops/{drop_name(i)}", Body=drop_body(i)), range(n, n + new))
                )
            names = {drop_name(i) for i in range(n, n + new)}
            return sorted(
                d.key for d in list_drops(S3Storage(f"s3://{bucket}/drops", client=client), PATTERNS).drops if d.relative_path in names
            )

        config = write_config(root / "s3.yaml", f"s3://{bucket}/home", f"s3://{bucket}/drops")
        return scenario("s3", config, add_new, server, n, new, repeats)
    finally:
        server.stop()


def report(name: str, r: dict, n: int, new: int) -> str:
    base_s, base_c = r["baseline"]
    ours_s, ours_c = r["ours"]
    up_s, up_c = r["upgrade"]
    idle_s, idle_c = r["idle"]
    print(f"\n{name}: {n:,} published drops + {new} new")
    print(f"  {'tick':<40} {'s':>8}  requests")
    print(f"  {'baseline (sensor_v0), old cursor':<40} {base_s:8.3f}  {base_c}")
    print(f"  {'ours, cursor of the previous tick':<40} {ours_s:8.3f}  {ours_c}")
    print(f"  {'ours, idle (nothing new)':<40} {idle_s:8.3f}  {idle_c}")
    print(f"  {'ours, upgrade tick (old cursor)':<40} {up_s:8.3f}  {up_c}")
    print(f"  cursor: {r['cursor_chars']:,} characters (stored with every tick); memory file: {r['memory_bytes']:,} bytes")
    return (
        f"tick_s={ours_s:.3f} gets={ours_c['gets']} ratio={base_s / ours_s:.1f} baseline_s={base_s:.3f} baseline_gets={base_c['gets']} "
        f"idle_gets={idle_c['gets']} cursor_chars={r['cursor_chars']}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--drops", type=int, default=10_000)
    parser.add_argument("--new", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--only", choices=["local", "s3"])
    parser.add_argument("--root", help="work folder (default: a temp dir, removed after)")
    args = parser.parse_args()
    root = Path(args.root) if args.root else Path(tempfile.mkdtemp(prefix="bench-sensor-"))
    root.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("DAGSTER_HOME", str(root / "dagster"))
    (root / "dagster").mkdir(exist_ok=True)
    for var in ("SYNTH_CPT_CONFIG", "SYNTH_CPT_HOME", "SYNTH_CPT_DROPS"):
        os.environ.pop(var, None)
    try:
        lines = []
        if args.only != "s3":
            local = run_local(root, args.drops, args.new, args.repeats)
            lines.append(f"RESULT sensor_local {report('local', local, args.drops, args.new)}")
        if args.only != "local":
            s3 = run_s3(root, args.drops, args.new, args.repeats)
            lines.append(f"RESULT sensor {report('s3 (moto server)', s3, args.drops, args.new)}")
        print()
        print(*lines, sep="\n")
    finally:
        if not args.root:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
