"""`dagster dev` (webserver, daemon, queued runs) started by a test on 127.0.0.1, and the GraphQL calls the UI makes:
a backfill is what the Backfill button launches (tests only)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

LAUNCH = """
mutation($params: LaunchBackfillParams!) {
  launchPartitionBackfill(backfillParams: $params) {
    __typename
    ... on LaunchBackfillSuccess { backfillId }
    ... on PythonError { message }
    ... on InvalidSubsetError { message }
    ... on UnauthorizedError { message }
  }
}"""
STATUS = """
query($id: String!) {
  partitionBackfillOrError(backfillId: $id) { __typename ... on PartitionBackfill { status } ... on PythonError { message } }
}"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def venv_bin(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


def stop_gracefully(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: what `dagster dev` and `synth-cpt serve` shut down cleanly on
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)


def graphql(url: str, query: str, variables: dict) -> dict:
    resp = httpx.post(url, json={"query": query, "variables": variables}, timeout=60)
    resp.raise_for_status()
    body = resp.json()
    assert "errors" not in body, body["errors"]
    return body["data"]


def start_backfill(url: str, assets: list[str], partitions: list[str]) -> str:
    """A backfill of `assets` over `partitions`, as the UI's Backfill button launches it; its id."""
    params = {"partitionNames": partitions, "assetSelection": [{"path": [a]} for a in assets], "fromFailure": False}
    launched = graphql(url, LAUNCH, {"params": params})["launchPartitionBackfill"]
    assert launched["__typename"] == "LaunchBackfillSuccess", launched
    return launched["backfillId"]


def wait_backfill(url: str, backfill_id: str, timeout_s: float) -> str:
    """The backfill's status once it is no longer in progress (or when `timeout_s` is up)."""
    deadline = time.monotonic() + timeout_s
    status = "REQUESTED"
    while time.monotonic() < deadline:
        status = graphql(url, STATUS, {"id": backfill_id})["partitionBackfillOrError"].get("status")
        if status not in ("REQUESTED", "CANCELING", "FAILING"):
            break
        time.sleep(5)
    return status


def launch_backfill(url: str, assets: list[str], partitions: list[str], timeout_s: float) -> tuple[str, str]:
    backfill_id = start_backfill(url, assets, partitions)
    return backfill_id, wait_backfill(url, backfill_id, timeout_s)


@contextlib.contextmanager
def dagster_dev(env: dict, cwd: Path, module: str = "synth_cpt.definitions") -> Iterator[tuple[subprocess.Popen, str, int]]:
    """`dagster dev` on a free loopback port for the instance in env["DAGSTER_HOME"], until its GraphQL answers;
    (its process, the GraphQL URL, the port); Ctrl-C'd after. Its output goes to cwd/dagster_dev.log."""
    port = free_port()
    log_path = cwd / "dagster_dev.log"
    with open(log_path, "w") as log:
        dev = subprocess.Popen(
            [venv_bin("dagster"), "dev", "-h", "127.0.0.1", "-p", str(port), "-m", module],
            env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        url = f"http://127.0.0.1:{port}/graphql"
        try:
            deadline = time.monotonic() + 240
            while True:
                try:
                    if httpx.post(url, json={"query": "{ version }"}, timeout=5).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert dev.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
                time.sleep(2)
            yield dev, url, port
        finally:
            stop_gracefully(dev)
