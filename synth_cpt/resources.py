"""The Dagster resource that hands assets the pipeline config and the storage root."""

from __future__ import annotations

from dagster import ConfigurableResource

from synth_cpt.config import PipelineConfig, current_config, load_config
from synth_cpt.storage import Storage, open_storage


class PipelineResource(ConfigurableResource):
    """Config file (default: $SYNTH_CPT_CONFIG or the shipped defaults) and storage root."""

    config_path: str | None = None

    def load(self) -> PipelineConfig:
        return load_config(self.config_path) if self.config_path else current_config()

    def storage(self) -> Storage:
        return open_storage(self.load().storage_uri())
