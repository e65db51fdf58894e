"""Great Expectations 1.x validations behind the Dagster asset checks.

dagster-ge only supports GX < 1.0, so suites are run here with an ephemeral GX context and the
outcome is handed to `@asset_check` functions as a plain `Outcome`. GX reads pandas, so callers pass
only the narrow columns a suite needs (text lengths, not texts).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

import polars as pl

os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")


class CandidateRejected(Exception):
    """A computed partition failed its suite: it was not published (readers keep the previous good
    version) and the candidate was kept at `kept` for inspection."""

    def __init__(self, outcome: "Outcome", kept: str) -> None:
        super().__init__("; ".join(outcome.failures)[:500])
        self.outcome = outcome
        self.kept = kept


@dataclass
class Outcome:
    success: bool
    failures: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)


def _gx():
    import great_expectations as gx

    logging.getLogger("great_expectations").setLevel(logging.ERROR)
    return gx


def run_suite(name: str, frame: pl.DataFrame, expectations: list[Any]) -> Outcome:
    """Validate `frame` against `expectations`; one `details` entry per expectation."""
    gx = _gx()
    context = gx.get_context(mode="ephemeral")
    try:
        context.variables.progress_bars = gx.data_context.types.base.ProgressBarsConfig(globally=False)
    except Exception:  # older/newer layouts: progress bars are cosmetic
        pass
    source = context.data_sources.add_pandas(f"{name}_source")
    asset = source.add_dataframe_asset(name=name)
    batch_def = asset.add_batch_definition_whole_dataframe(f"{name}_batch")
    suite = gx.ExpectationSuite(name=f"{name}_suite")
    for exp in expectations:
        suite.add_expectation(exp)
    batch = batch_def.get_batch(batch_parameters={"dataframe": frame.to_pandas()})
    result = batch.validate(suite)
    outcome = Outcome(success=bool(result.success))
    for r in result.results:
        cfg = r.expectation_config
        label = f"{cfg.type}({cfg.kwargs.get('column', '')})".replace("()", "")
        observed = {
            k: v
            for k, v in (r.result or {}).items()
            if k in ("observed_value", "unexpected_count", "unexpected_percent", "partial_unexpected_list")
        }
        outcome.details[label] = {"success": bool(r.success), **{k: _plain(v) for k, v in observed.items()}}
        if not r.success:
            outcome.failures.append(f"{label}: {observed}")
    return outcome


def _plain(v: Any) -> Any:
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v][:10]
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    return str(v)


def expect():
    """The GX expectations module, imported lazily (GX takes seconds to import)."""
    return _gx().expectations


def document_suite(expected_columns: list[str], language: str, bounds: Any | None) -> list[Any]:
    """Schema, non-empty text, unique doc_id, language of the partition, scores inside the bucket."""
    gxe = expect()
    suite = [
        gxe.ExpectTableColumnsToMatchSet(column_set=expected_columns, exact_match=True),
        gxe.ExpectColumnValuesToNotBeNull(column="doc_id"),
        gxe.ExpectColumnValuesToBeUnique(column="doc_id"),
        gxe.ExpectColumnValuesToBeBetween(column="text_chars", min_value=1),
        gxe.ExpectColumnValuesToBeInSet(column="language", value_set=[language]),
    ]
    if bounds is not None:
        lo = bounds.gt if bounds.gt is not None else bounds.ge
        hi = bounds.lt if bounds.lt is not None else bounds.le
        suite.append(
            gxe.ExpectColumnValuesToBeBetween(
                column="quality_score", min_value=lo, max_value=hi, strict_min=bounds.gt is not None, strict_max=bounds.lt is not None
            )
        )
    return suite
