"""Keys a run used never show up where a user, a log reader or a reader of the store can see them; the
servers synth-cpt starts bind 127.0.0.1.

The end-to-end test runs the CLI as a user does, with canary keys in the environment: the storage root on
an S3 server (moto, 127.0.0.1) and generation on an OpenAI-compatible server that checks the key and, for
some requests, answers 401 with the Authorization header echoed in its body (as some proxies do). Then it
reads back everything the runs left: the CLI's output, the Dagster instance (run and event storage, compute
logs), the CLI's log folder and every object in the bucket (Parquet decoded, zstd decompressed).
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
import zstandard

from synth_cpt.core.secrets import MASK, redact, secret_values

from .conftest import REPO, SAMPLE_DROPS
from .fault_server import send

CANARY = {
    "OPENAI_API_KEY": "sk-canary-openai-5f1e0c2b9d7a4e36",
    "AWS_ACCESS_KEY_ID": "AKIACANARY7Q2W4E6R8T",
    "AWS_SECRET_ACCESS_KEY": "canarySecret9a8b7c6d5e4f3g2h1i0jKLMNOP",
}


def test_redact_masks_every_secret_value_and_url_password(monkeypatch):
    env = {
        "OPENAI_API_KEY": "sk-abcdefgh12345678",
        "MY_SERVER_TOKEN": "tok-0123456789",
        "CUSTOM_CRED": "cred-0123456789",  # not a secret by its name: only when the backend declares it
        "AWS_DEFAULT_REGION": "us-east-1",  # not secret
        "SHORT_KEY": "abc",  # too short to mask in text
    }
    text = "401: bad key sk-abcdefgh12345678 / tok-0123456789 cred-0123456789 at http://bob:hunter2@10.0.0.5:8000/v1 in us-east-1 abc"
    assert redact(text, environ=env) == f"401: bad key {MASK} / {MASK} cred-0123456789 at http://{MASK}@10.0.0.5:8000/v1 in us-east-1 abc"
    assert redact(text, extra_names=["CUSTOM_CRED"], environ=env).count(MASK) == 4
    assert (
        redact("at https://tok-abcdef123@gw.example/v1 and http://u:p@ss@h/v1", environ={})
        == f"at https://{MASK}@gw.example/v1 and http://{MASK}@h/v1"
    )
    # the openai backend declares the variable it reads its key from, whatever it is called
    from synth_cpt.core import secrets
    from synth_cpt.generation.backends import OpenAIBackend

    monkeypatch.setattr(secrets, "_declared", set())
    OpenAIBackend(["http://127.0.0.1:9/v1"], "m", api_key_env="CUSTOM_CRED")
    assert redact(text, environ=env).count(MASK) == 4
    # a key that contains another is masked whole, not left half-visible
    nested = {"OPENAI_API_KEY": "sk-0123456789", "HF_TOKEN": "sk-0123456789-extended"}
    assert secret_values(environ=nested) == ["sk-0123456789-extended", "sk-0123456789"]
    assert redact("x sk-0123456789-extended y", environ=nested) == f"x {MASK} y"


class EchoingServer:
    """An OpenAI-compatible server that requires the canary key; every other request (the first, the third,
    ...) is refused with 401 and the Authorization header repeated in the body."""

    def __init__(self, key: str) -> None:
        self.auth: list[str] = []
        self.refused = 0
        self.answered = 0
        lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                header = self.headers.get("Authorization", "")
                prompt = body["messages"][-1]["content"]
                with lock:
                    server.auth.append(header)
                    refuse = len(server.auth) % 2 == 1
                if header != f"Bearer {key}" or refuse:
                    with lock:
                        server.refused += 1
                    # padded so that the key straddles character 200, where a reason is cut
                    return self._send(401, json.dumps({"error": "x" * 145 + f" invalid credentials: {header}"}).encode())
                with lock:
                    server.answered += 1
                text = " ".join(prompt.split()[-60:])  # a reply made of the prompt's own words
                reply = {"choices": [{"message": {"role": "assistant", "content": text}, "finish_reason": "stop"}], "usage": {}}
                return self._send(200, json.dumps(reply).encode())

            def _send(self, code, data, headers=None):
                send(self, code, data, headers)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def stop(self) -> None:
        self.httpd.shutdown()


def _texts_of(name: str, data: bytes) -> list[bytes]:
    """What a reader of this file can see: its bytes, and decoded forms of compressed containers."""
    out = [data]
    if name.endswith(".parquet"):
        table = pq.read_table(io.BytesIO(data))
        out.append(json.dumps(table.to_pylist(), default=str).encode())
        out.append(json.dumps({k.decode(): v.decode(errors="replace") for k, v in (table.schema.metadata or {}).items()}).encode())
    elif name.endswith(".zst"):
        out.append(zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data)).read())
    return out


def _leaks(where: str, name: str, data: bytes, secrets: list[str]) -> list[str]:
    found = []
    for text in _texts_of(name, data):
        for s in secrets:
            if s[:12].encode() in text:  # the first 12 characters: a key cut short is still a leak
                found.append(f"{where}:{name} holds {s[:6]}…")
    return found


@pytest.mark.e2e
def test_keys_a_run_used_never_appear_in_logs_metadata_manifests_or_errors(tmp_path, moto_endpoint, s3_bucket):
    client, bucket = s3_bucket
    server = EchoingServer(CANARY["OPENAI_API_KEY"])
    base = tmp_path
    drops = base / "drops"  # two small drops (pt and en) keep the S3 ingest short
    drops.mkdir()
    for name in ("2026-11-02_en_debian-edu.parquet", "2026-11-02_pt_debian-edu.jsonl"):
        shutil.copy(SAMPLE_DROPS / name, drops / name)
    (base / "dagster_home").mkdir()
    shutil.copy(REPO / "dagster.yaml", base / "dagster_home" / "dagster.yaml")
    config = base / "pipeline.yaml"
    config.write_text(yaml.safe_dump({"extends": "defaults", "synthesis": {"max_documents": 1, "min_pass_rate": 0.0}}))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SYNTH_CPT_", "DAGSTER_", "AWS_"))}
    env.update(
        CANARY,
        AWS_DEFAULT_REGION="us-east-1", AWS_ENDPOINT_URL=moto_endpoint, HOME=str(base / "user"),
        DAGSTER_HOME=str(base / "dagster_home"), SYNTH_CPT_HOME=f"s3://{bucket}/home", SYNTH_CPT_CONFIG=str(config),
        SYNTH_CPT_DROPS=str(drops),
        SYNTH_CPT_ENDPOINTS=server.url, SYNTH_CPT_MODEL="served-model", COLUMNS="200",
    )  # fmt: skip
    exe = str(Path(sys.executable).with_name("synth-cpt"))

    def cli(*args: str, **extra: str) -> subprocess.CompletedProcess:
        started = time.monotonic()
        done = subprocess.run([exe, *args], env={**env, **extra}, cwd=base, capture_output=True, text=True, timeout=600)
        print(f"security: synth-cpt {args[0]} {time.monotonic() - started:.1f} s")
        return done

    try:
        ingest = cli("ingest")
        assert ingest.returncode == 0, ingest.stdout[-2000:] + ingest.stderr[-3000:]
        synth = cli("synthesize", "--asset", "rewrites_medium", "--partition", "en|high", "--partition", "pt|high")
        # a missing bucket: an error message from the S3 client, with the keys in the environment
        missing = cli("sql", "select 1", SYNTH_CPT_HOME="s3://no-such-bucket-synth-cpt/home")
    finally:
        server.stop()
    # the keys were really used: the server saw the key, the store was written with the AWS keys
    assert set(server.auth) == {f"Bearer {CANARY['OPENAI_API_KEY']}"}, server.auth
    assert server.answered > 0 and server.refused > 0, (server.answered, server.refused)
    assert synth.returncode == 0, synth.stdout[-2000:] + synth.stderr[-3000:]
    assert missing.returncode != 0 and missing.stdout + missing.stderr, "the missing bucket is reported"

    secrets = list(CANARY.values())
    leaks: list[str] = []
    for name, run in (("ingest", ingest), ("synthesize", synth), ("sql", missing)):
        leaks += _leaks("cli", name, (run.stdout + run.stderr).encode(), secrets)
    scanned = 0
    for path in sorted(base.rglob("*")):  # the instance (runs, events, compute logs), the CLI's log folder ($HOME/.cache)
        if path.is_file():
            leaks += _leaks("local", str(path.relative_to(base)), path.read_bytes(), secrets)
            scanned += 1
    objects = [o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket) for o in page.get("Contents", [])]
    for key in objects:
        leaks += _leaks("s3", key, client.get_object(Bucket=bucket, Key=key)["Body"].read(), secrets)
    # the refusals were recorded as failures with the echoed key masked: the redaction was exercised
    masked = [
        row["error"]
        for key in objects
        if key.startswith("home/generations/") and key.endswith(".parquet")
        for row in pq.read_table(io.BytesIO(client.get_object(Bucket=bucket, Key=key)["Body"].read())).to_pylist()
        if row.get("error")
    ]
    print(f"\nsecurity: scanned {scanned} local files, {len(objects)} S3 objects, 3 CLI outputs; {len(masked)} failure reasons masked")
    assert leaks == [], leaks
    assert masked and all(f"Bearer {MASK}" in e for e in masked), masked[:3]


def test_servers_synth_cpt_starts_bind_loopback_by_default():
    from synth_cpt.generation.serve import HOST, serve_command

    cmd = serve_command("/models/m", "served", {}, 8011)
    assert HOST == "127.0.0.1" and cmd[cmd.index("--host") + 1] == "127.0.0.1"
    # `make ui` starts the webserver on loopback, and so does `dagster dev` when started without -h
    ui_recipe = (REPO / "Makefile").read_text().split("\nui:", 1)[1].split("\n\n", 1)[0]
    assert re.search(r"dagster dev -h 127\.0\.0\.1 ", ui_recipe), ui_recipe
    from dagster_webserver.cli import DEFAULT_WEBSERVER_HOST

    assert DEFAULT_WEBSERVER_HOST == "127.0.0.1"
    # every server a test starts binds loopback: no wildcard address anywhere in the code or the tests
    wildcard = re.compile(r"""["'](0\.0\.0\.0|::)["']|(Server|bind|socket)\(\s*\(\s*["']["']\s*,""")
    offenders = [
        f"{p.relative_to(REPO)}:{n}"
        for folder in ("synth_cpt", "synth_cpt_tests", "benchmarks", "deploy")
        for p in (REPO / folder).rglob("*.py")
        if p.name != Path(__file__).name
        for n, line in enumerate(p.read_text().splitlines(), 1)
        if wildcard.search(line)
    ]
    assert offenders == []
