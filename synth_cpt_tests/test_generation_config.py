"""The model is chosen by configuration: the `generation:` section builds the `llm` resource of the
Definitions (so the CLI, the sensor, automation and UI launches all use it), environment overrides, per-run
launchpad overrides, the shipped GPU profile, and `synth-cpt serve`'s pieces that need no engine."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import yaml
from dagster import asset, materialize

from synth_cpt.core.config import ConfigError, load_config, parse_config
from synth_cpt.defs.resources import LLM
from synth_cpt.generation.serve import READY, STARTING, ServerRecord, find_server, record_path, serve_command
from synth_cpt.generation.settings import LLMSettings

from .conftest import REPO


def _write(tmp_path, data: dict):
    path = tmp_path / f"pipeline-{len(list(tmp_path.glob('pipeline-*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump({"storage_root": str(tmp_path / "home"), **data}))
    return path


def test_the_definitions_build_the_llm_resource_from_the_config(tmp_path, monkeypatch, isolated_env):
    from synth_cpt.defs.definitions import build_definitions

    path = _write(tmp_path, {"generation": {"model": "/models/Qwen2.5-7B-Instruct", "dtype": "float16", "max_model_len": 8192}})
    monkeypatch.setenv("SYNTH_CPT_CONFIG", str(path))
    monkeypatch.delenv("SYNTH_CPT_MODEL", raising=False)
    monkeypatch.delenv("SYNTH_CPT_ENDPOINTS", raising=False)
    llm = build_definitions().resources["llm"]
    assert (llm.model, llm.dtype, llm.max_model_len) == ("/models/Qwen2.5-7B-Instruct", "float16", 8192)
    assert llm.enforce_eager is True, "fields the file does not set keep their defaults"


def test_environment_overrides_model_and_endpoints(tmp_path, monkeypatch, isolated_env):
    config = load_config(_write(tmp_path, {"generation": {"model": "/models/a"}}))
    monkeypatch.setenv("SYNTH_CPT_MODEL", "/models/b")
    monkeypatch.delenv("SYNTH_CPT_ENDPOINTS", raising=False)
    assert LLM.from_config(config).model == "/models/b"
    monkeypatch.setenv("SYNTH_CPT_ENDPOINTS", "http://10.0.0.5:8000/v1, http://10.0.0.6:8000/v1")
    llm = LLM.from_config(config)
    assert llm.backend == "openai" and llm.endpoints == ["http://10.0.0.5:8000/v1", "http://10.0.0.6:8000/v1"]
    assert config.generation.backend == "vllm", "the file's settings are not changed"


@pytest.mark.parametrize(
    ("generation", "named"),
    [
        ({"modle": "x"}, "generation.modle"),
        ({"backend": "openai"}, "endpoints"),
        ({"gpu_memory_utilization": 1.5}, "gpu_memory_utilization"),
    ],
)
def test_a_bad_generation_section_fails_at_load_naming_the_field(generation, named):
    with pytest.raises(ConfigError, match=named):
        parse_config(yaml.safe_dump({"generation": generation}), "test.yaml")


def test_the_launchpad_overrides_a_field_for_one_run(tmp_path, isolated_env):
    """What the UI's launchpad sends: run config for the `llm` resource over the configured values."""
    configured = LLM.from_config(parse_config(yaml.safe_dump({"generation": {"model": "/models/configured"}}), "test"))
    seen = []

    @asset
    def which_model(llm: LLM) -> None:
        seen.append((llm.model, llm.dtype))

    assert materialize([which_model], resources={"llm": configured}).success
    override = {"resources": {"llm": {"config": {"model": "/models/for-this-run"}}}}
    assert materialize([which_model], resources={"llm": configured}, run_config=override).success
    assert seen == [("/models/configured", "bfloat16"), ("/models/for-this-run", "bfloat16")]


def test_the_shipped_gpu_profile_loads():
    config = load_config(REPO / "synth_cpt" / "defaults" / "gpu.yaml")
    g = config.generation
    assert g.max_model_len is None and g.enforce_eager is False and g.enable_chunked_prefill is True
    assert "max_model_len" not in {k for k, v in LLMSettings(**g.model_dump()).engine_args().items() if v is not None}


def test_extra_engine_args_reach_the_engine_and_the_fingerprint():
    plain, extra = LLMSettings(), LLMSettings(extra_engine_args={"quantization": "fp8"})
    assert extra.engine_args()["quantization"] == "fp8"
    assert plain.model_fingerprint("w@1") != extra.model_fingerprint("w@1")
    assert plain.model_fingerprint("w@1") == LLMSettings(extra_engine_args={}).model_fingerprint("w@1")


def test_serve_command_carries_the_engine_arguments():
    args = LLMSettings(max_model_len=4096, enforce_eager=True, enable_chunked_prefill=False).engine_args()
    cmd = serve_command("/m", "M", args, 8123)
    assert cmd[1:5] == ["-m", "synth_cpt.generation.vllm_cli", "serve", "/m"]
    pairs = list(zip(cmd, cmd[1:], strict=False))  # a flag and the argument after it
    assert {("--host", "127.0.0.1"), ("--port", "8123"), ("--served-model-name", "M"), ("--max-model-len", "4096")} <= set(pairs)
    assert "--enforce-eager" in cmd and "--no-enable-chunked-prefill" in cmd
    assert ("--generation-config", "vllm") in pairs, "unset sampling fields take vLLM's defaults, as in process"
    assert "--no-enforce-eager" not in " ".join(serve_command("/m", "M", LLMSettings(enforce_eager=False).engine_args(), 1))


class HealthOnlyServerDouble(BaseHTTPRequestHandler):
    """Test double of a model server: answers /health and nothing else."""

    def do_GET(self):  # noqa: N802
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()

    def log_message(self, *a):
        pass


def test_find_server_takes_a_ready_healthy_server_and_nothing_else(tmp_path):
    import os

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), HealthOnlyServerDouble)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    try:
        record = ServerRecord(url=url, served_model_name="M", revision="sha256:x", fingerprint="fp", pid=os.getpid(), state=READY, log="")
        assert find_server(tmp_path, "fp") is None, "no record"
        record_path(tmp_path, "fp").write_text(json.dumps(record.__dict__))
        assert find_server(tmp_path, "fp") == record
        assert find_server(tmp_path, "other") is None, "another model's settings"
        dead = {**record.__dict__, "pid": 2**22 + 12345}
        record_path(tmp_path, "fp").write_text(json.dumps(dead))
        assert find_server(tmp_path, "fp") is None, "its process is gone"
        record_path(tmp_path, "fp").write_text(json.dumps({**record.__dict__, "state": STARTING}))
        with pytest.raises(TimeoutError):
            find_server(tmp_path, "fp", wait_s=1.5)  # loading: waited for, never taken before it is ready
    finally:
        httpd.shutdown()
