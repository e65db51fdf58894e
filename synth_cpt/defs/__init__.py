"""Dagster wiring of every domain. Partitioned asset checks are "preview" in Dagster 1.13 and we rely on them
knowingly: the warning is silenced here, before any module of the package defines one."""

import warnings

from dagster import PreviewWarning

warnings.filterwarnings("ignore", category=PreviewWarning, message=".*partitions_def on an AssetCheckSpec.*")
