"""The Dagster resources: the pipeline (config and storage) and the LLM (generation settings)."""

from __future__ import annotations

import os

from dagster import ConfigurableResource
from dagster_aws.s3 import S3Resource

from synth_cpt.core.config import PipelineConfig, current_config, load_config
from synth_cpt.core.storage import Storage, open_storage
from synth_cpt.generation.settings import LLMSettings


def open_location(uri: str) -> Storage:
    """A storage root or drops location; S3 goes through dagster-aws's S3Resource (credentials from the
    AWS chain, AWS_ENDPOINT_URL honoured)."""
    if uri.startswith("s3://"):
        return open_storage(uri, s3=S3Resource(endpoint_url=os.environ.get("AWS_ENDPOINT_URL")).get_client())
    return open_storage(uri)


class PipelineResource(ConfigurableResource):
    """Config file (default: $SYNTH_CPT_CONFIG or the shipped defaults) and storage root."""

    config_path: str | None = None

    def load(self) -> PipelineConfig:
        return load_config(self.config_path) if self.config_path else current_config()

    def storage(self) -> Storage:
        return open_location(self.load().storage_uri())

    def drops(self) -> Storage:
        """The configured drops location."""
        return open_location(self.load().drops_uri())


class LLM(ConfigurableResource, LLMSettings):
    """Generation settings (every field is in core.config.GenerationConfig). The Definitions build it from the
    config's `generation:` section, so every run uses the configured model; the launchpad can override a field
    per run. Defaults run the embedded SmolLM2-135M on the CPU build of vLLM."""

    @classmethod
    def from_config(cls, config: PipelineConfig) -> "LLM":
        """The config's generation section, with SYNTH_CPT_MODEL / SYNTH_CPT_ENDPOINTS applied."""
        return cls(**config.generation_settings().model_dump())
