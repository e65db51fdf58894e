from __future__ import annotations

import contextlib
import gzip
import json
import os
from pathlib import Path

import pytest
import yaml

from synth_cpt.core.config import PipelineConfig, parse_config

REPO = Path(__file__).resolve().parents[1]
SAMPLE_DROPS = REPO / "synth_cpt" / "sample_corpus" / "drops"

PT_TEXT = (
    "O Debian Edu é uma distribuição que implementa uma abordagem cliente-servidor, disponibilizando "
    "um ambiente de rede escolar completamente configurado. Os servidores fornecem informações e serviços "
    "aos clientes, que os professores e os alunos usam todos os dias nas salas de aula. A instalação é "
    "simples e a documentação explica cada passo com exemplos práticos e figuras."
)
EN_TEXT = (
    "The Undo command lets you revert the last change you made to an image and return it to its previous "
    "state. Almost anything you do to an image can be undone in this way, with the exception of scripts, "
    "which deactivate this function. Further undo operations may be performed, depending on the number of "
    "undo levels configured in the preferences dialog of the program."
)


def make_config(tmp_path: Path, **overrides) -> PipelineConfig:
    """A validated config whose storage root is under tmp_path, with nested overrides."""
    data: dict = {"storage_root": str(tmp_path / "home"), "drops": {"location": str(tmp_path / "drops"), "settle_seconds": 0}}
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return parse_config(yaml.safe_dump(data), "test")


def write_jsonl(path: Path, records: list, compress: str | None = None) -> Path:
    lines = []
    for r in records:
        lines.append(r if isinstance(r, bytes) else json.dumps(r, ensure_ascii=False).encode())
    data = b"\n".join(lines) + b"\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    if compress == "gz":
        data = gzip.compress(data)
    elif compress == "zst":
        import zstandard

        data = zstandard.ZstdCompressor().compress(data)
    path.write_bytes(data)
    return path


def short_prompt_library(dest: Path, max_tokens: int = 48) -> Path:
    """The shipped prompt library with the medium rewrite cut to `max_tokens` new tokens (point SYNTH_CPT_PROMPTS
    at it): the engine, its loading and the machinery stay the real ones, and a request costs seconds instead of
    a minute on 2 cores (the 135M model writes until max_tokens, 512, on most rewrites)."""
    import shutil

    from synth_cpt.synthesis.prompts import prompts_dir

    shutil.copytree(prompts_dir(), dest)
    medium = dest / "rewrite" / "medium.yaml"
    assert "  max_tokens: 512\n" in medium.read_text()
    medium.write_text(medium.read_text().replace("  max_tokens: 512\n", f"  max_tokens: {max_tokens}\n"))
    return dest


@pytest.fixture
def isolated_env(tmp_path, monkeypatch):
    """No SYNTH_CPT_* from the caller's shell leaks into a test."""
    for var in ("SYNTH_CPT_CONFIG", "SYNTH_CPT_HOME", "SYNTH_CPT_DROPS"):
        monkeypatch.delenv(var, raising=False)
    return tmp_path


@pytest.fixture(scope="session")
def moto_endpoint():
    """A real S3 API (moto in server mode) on 127.0.0.1, with throwaway credentials."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    credentials = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    with environ({**credentials, "AWS_ENDPOINT_URL": endpoint}):
        yield endpoint
        server.stop()


@pytest.fixture
def s3_bucket(moto_endpoint, request):
    import boto3

    client = boto3.client("s3", endpoint_url=moto_endpoint)
    name = "synth-cpt-" + request.node.name.lower().replace("_", "-")[:40]
    client.create_bucket(Bucket=name)
    return client, name


@pytest.fixture(scope="session")
def embedded_model(tmp_path_factory):
    """The embedded model converted once for the whole session (about 70 s on 2 cores): SYNTH_CPT_MODELS
    names its folder from here on, so every engine and `vllm serve` the session starts finds it converted."""
    from synth_cpt.generation.settings import LLMSettings

    saved = os.environ.get("SYNTH_CPT_MODELS")
    os.environ["SYNTH_CPT_MODELS"] = str(tmp_path_factory.mktemp("models"))
    path, _ = LLMSettings().resolve_model(str(tmp_path_factory.mktemp("model_home")))
    yield path
    if saved is None:
        os.environ.pop("SYNTH_CPT_MODELS", None)
    else:
        os.environ["SYNTH_CPT_MODELS"] = saved


@pytest.fixture(scope="session")
def vllm_session(tmp_path_factory, embedded_model):
    """The real engine, loaded once for the whole session (~20-30 s on 2 cores). It is the process's
    shared backend for the default LLM settings, so assets materialized in this process (through
    Dagster, with SYNTH_CPT_MODELS pointing at the same converted model) use it instead of loading
    another one."""
    from synth_cpt.defs.resources import LLM
    from synth_cpt.generation.settings import keep_engines

    keep_engines()  # runs executed in this process share the one engine, as in the CLI
    root = tmp_path_factory.mktemp("vllm_home")
    resource = LLM()
    model_path, identity = resource.resolve_model(str(root))
    backend = resource.shared_backend(model_path)
    yield backend, root, resource, identity, model_path
    backend.close()


DEFINITIONS_MODULES = ("synth_cpt.definitions", "synth_cpt.defs.definitions")


@pytest.fixture
def fresh_definitions(tmp_path, monkeypatch):
    """`configure(generation=None, home=None)`: a pipeline config under tmp_path (outputs in `home`, default
    tmp_path/home), and synth_cpt.definitions imported afresh under it at its next import (the module builds its
    Definitions at import, from the config the environment names). What was imported before comes back after."""
    import importlib
    import sys

    imported_before = {m for m in DEFINITIONS_MODULES if m in sys.modules}

    def configure(generation: dict | None = None, home: str | None = None) -> None:
        data = {"storage_root": str(tmp_path / "home"), "drops": {"location": str(tmp_path / "drops"), "settle_seconds": 0}}
        if generation:
            data["generation"] = generation
        (tmp_path / "drops").mkdir(exist_ok=True)
        path = tmp_path / "pipeline.yaml"
        path.write_text(yaml.safe_dump(data))
        monkeypatch.setenv("SYNTH_CPT_CONFIG", str(path))
        monkeypatch.setenv("SYNTH_CPT_HOME", home or str(tmp_path / "home"))
        monkeypatch.delenv("SYNTH_CPT_ENDPOINTS", raising=False)
        monkeypatch.delenv("SYNTH_CPT_MODEL", raising=False)
        for module in DEFINITIONS_MODULES:  # the modules of an earlier import come back afterwards
            parent, _, name = module.rpartition(".")
            monkeypatch.delitem(sys.modules, module, raising=False)
            monkeypatch.delattr(importlib.import_module(parent), name, raising=False)

    yield configure
    for module in DEFINITIONS_MODULES:
        if module not in imported_before:
            sys.modules.pop(module, None)  # nor does this test's import outlive it


@contextlib.contextmanager
def environ(values: dict[str, str]):
    """This process's environment with `values` set, restored after (unset names unset again)."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def runs_of_jobs(instance, image: str, runs: list[tuple[str, dict]]):
    """The Definitions as a code location in `image` (what a run launcher launches from), and one created run per
    (job name, extra run tags), tagged as Dagster tags a launched run of that job: (workspace, [(job name, run)])."""
    from dagster._core.test_utils import create_run_for_test, in_process_test_workspace
    from dagster._core.types.loadable_target_origin import LoadableTargetOrigin

    origin = LoadableTargetOrigin(module_name="synth_cpt.definitions")
    with in_process_test_workspace(instance, origin, container_image=image) as workspace:
        repo = workspace.get_code_location(workspace.code_location_names[0]).get_repository("__repository__")
        created = []
        for job_name, tags in runs:
            remote_job = repo.get_full_job(job_name)
            run = create_run_for_test(
                instance, job_name=job_name, tags={**remote_job.run_tags, **tags},
                remote_job_origin=remote_job.get_remote_origin(), job_code_origin=remote_job.get_python_origin(),
            )  # fmt: skip
            created.append((job_name, run))
        yield workspace, created
