"""Running Great Expectations 1.x suites (built in `core.contracts`) on candidate outputs.

dagster-ge only supports GX < 1.0, so suites are run here with an ephemeral GX context and the
outcome is handed to Dagster as a plain `Outcome`. GX reads pandas, so callers pass only the narrow
columns a suite needs (text lengths, not texts).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

import polars as pl

os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")


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


def narrow(path: str, columns: list[str] | None = None, text_column: str | None = "text") -> pl.DataFrame:
    """The columns a suite needs (default: all) of a Parquet file, the text as its length `text_chars`:
    GX copies what it gets into pandas, so a suite over millions of rows must get little."""
    lf = pl.scan_parquet(path)
    cols = [c for c in lf.collect_schema().names() if columns is None or c in columns]
    return lf.select([pl.col(c).str.len_chars().alias("text_chars") if c == text_column else pl.col(c) for c in cols]).collect()


def columns_outcome(path: str, expected: list[str]) -> Outcome:
    """The file's columns are exactly the contract's (read from the Parquet footer, not the rows)."""
    actual = pl.scan_parquet(path).collect_schema().names()
    missing, extra = sorted(set(expected) - set(actual)), sorted(set(actual) - set(expected))
    success = not missing and not extra
    detail = {"success": success, "missing": missing, "unexpected": extra}
    failures = [] if success else [f"columns: missing {missing}, unexpected {extra}"]
    return Outcome(success, failures, {"columns": detail})


def merge(outcomes: dict[str, Outcome]) -> Outcome:
    """Several suites as one outcome, their details prefixed by suite name."""
    return Outcome(
        all(o.success for o in outcomes.values()),
        [f for o in outcomes.values() for f in o.failures],
        {f"{name}.{k}": v for name, o in outcomes.items() for k, v in o.details.items()},
    )
