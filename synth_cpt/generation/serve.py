"""One long-lived `vllm serve` per machine, which every run of the instance sends its requests to.

Why: a UI backfill is one Dagster run per partition (and each run's step is its own process). Loading the
model in each would cost a load per run and hold several engines at once; a served model is loaded once,
batches the requests of every concurrent run continuously, and the runs load nothing.

`serve` starts vLLM's own server on 127.0.0.1 for the configured model and writes a record,
`<models>/.servers/<fingerprint>.json`, once the server answers `/health`; `find_server` is how a run
finds it: same fingerprint (same weights, dtype, context, parallelism), process alive, healthy. The
fingerprint is the in-process engine's, so cached answers are shared between the CLI and served runs.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from synth_cpt.generation.backends import OpenAIBackend
from synth_cpt.generation.embedded import models_dir
from synth_cpt.generation.reaper import Reaper

HOST = "127.0.0.1"
DEFAULT_PORT = 8011
STARTING, READY = "starting", "ready"


@dataclass(frozen=True)
class ServerRecord:
    url: str  # OpenAI base URL, http://127.0.0.1:<port>/v1
    served_model_name: str
    revision: str  # sha256:<digest of the weights' folder> (identity.py)
    fingerprint: str
    pid: int  # the vLLM server process
    state: str
    log: str
    load_seconds: float | None = None
    vllm_version: str = ""

    def healthy(self, timeout_s: float = 2.0) -> bool:
        import httpx

        try:
            return httpx.get(self.url.removesuffix("/v1") + "/health", timeout=timeout_s).status_code == 200
        except httpx.HTTPError:
            return False


def servers_dir(storage_root: str) -> Path:
    """Per machine: beside the local model copies (never in S3: a record names a local process)."""
    return models_dir(storage_root) / ".servers"


def record_path(directory: Path, fingerprint: str) -> Path:
    return directory / f"{fingerprint}.json"


def read_record(path: Path) -> ServerRecord | None:
    try:
        return ServerRecord(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None


def _write_record(path: Path, record: ServerRecord) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(asdict(record), indent=2))
    os.replace(tmp, path)


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def find_server(directory: Path, fingerprint: str, wait_s: float = 900.0, log: Callable[[str], None] | None = None) -> ServerRecord | None:
    """The running server of this fingerprint, waiting while it is still loading; None when there is none."""
    path = record_path(directory, fingerprint)
    deadline = time.monotonic() + wait_s
    told = False
    while True:
        record = read_record(path)
        if record is None or not process_alive(record.pid):
            return None
        if record.state == READY and record.healthy():
            return record
        if time.monotonic() > deadline:
            raise TimeoutError(f"synth-cpt serve (pid {record.pid}) did not become ready in {wait_s:g} s; its log: {record.log}")
        if log and not told:
            log(f"waiting for synth-cpt serve (pid {record.pid}) to finish loading the model")
            told = True
        time.sleep(1.0)


def _flag(name: str, value: Any) -> list[str]:
    option = "--" + name.replace("_", "-")
    if value is None:
        return []
    if isinstance(value, bool):
        return [option] if value else [f"--no-{option[2:]}"]
    if isinstance(value, (dict, list)):
        return [option, json.dumps(value)]
    return [option, str(value)]


def serve_command(model_path: str, served_name: str, engine_args: dict[str, Any], port: int) -> list[str]:
    """vLLM's server with the engine arguments of the in-process engine. `--generation-config vllm`: a
    request's unset sampling fields take vLLM's defaults, as in process, not the model folder's."""
    cmd = [sys.executable, "-m", "synth_cpt.generation.vllm_cli", "serve", model_path, "--served-model-name", served_name]
    cmd += ["--host", HOST, "--port", str(port), "--generation-config", "vllm", "--disable-uvicorn-access-log"]
    for name, value in engine_args.items():
        if name == "enforce_eager" and value is False:
            continue  # --no-enforce-eager is the default
        cmd += _flag(name, value)
    return cmd


def port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def run_server(
    cmd: list[str],
    record: ServerRecord,
    path: Path,
    timeout_s: float,
    log: Callable[[str], None],
    on_ready: Callable[[ServerRecord], None] | None = None,
) -> int:
    """Start the server, publish its record once healthy, wait for it; the record goes when it stops."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # nothing is downloaded: a model name must already be in the local Hugging Face cache
    env = {**os.environ, "VLLM_CONFIGURE_LOGGING": "1", "HF_HUB_OFFLINE": "1"}
    started = time.monotonic()
    reaper = Reaper.start()  # a SIGKILLed `synth-cpt serve` must not leave `vllm serve` and its engine running
    with open(record.log, "ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True)
    record = ServerRecord(**{**asdict(record), "pid": proc.pid, "state": STARTING})
    _write_record(path, record)

    def stop(*_: Any) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    try:
        while not record.healthy():
            if proc.poll() is not None:
                log(f"vllm serve exited with {proc.returncode} while loading; the last lines of {record.log}:")
                log(_tail(record.log))
                return proc.returncode or 1
            if time.monotonic() - started > timeout_s:
                log(f"vllm serve did not answer /health in {timeout_s:g} s; see {record.log}")
                stop()
                proc.wait(60)
                return 1
            time.sleep(1.0)
        record = ServerRecord(**{**asdict(record), "state": READY, "load_seconds": round(time.monotonic() - started, 1)})
        _write_record(path, record)
        if on_ready:
            on_ready(record)
        return proc.wait()
    finally:
        stop()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(60)
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        current = read_record(path)
        if current is not None and current.pid == proc.pid:
            path.unlink(missing_ok=True)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        reaper.stop()


def _tail(path: str, lines: int = 30) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class ServedBackend(OpenAIBackend):
    """The OpenAI client pointed at a `synth-cpt serve` of this machine; rows say which server made them."""

    name = "vllm-serve"

    def __init__(self, record: ServerRecord, **kwargs: Any) -> None:
        super().__init__([record.url], record.served_model_name, **kwargs)
        self.record = record

    def version(self) -> str:
        return self.record.vllm_version

    def config(self) -> dict[str, Any]:
        return {**super().config(), "server": self.record.url, "server_pid": self.record.pid, "revision": self.record.revision}
