"""`dagster dev -m synth_cpt.definitions` and workspace.yaml load the one Definitions from here."""

from synth_cpt.defs.definitions import defs

__all__ = ["defs"]
