"""Which rewrite styles run on which quality bucket: configuration, never code.

By default every style runs on the buckets its prompt file names (`buckets:`); a shipped profile or
the config's `routing` replaces that. A style added as a file joins the graph with its own buckets.
"""

from __future__ import annotations

from synth_cpt.core.config import PipelineConfig, SynthesisConfig
from synth_cpt.synthesis.prompts import Prompt, PromptError


def check_library(config: PipelineConfig, prompts: list[Prompt]) -> None:
    """Prompt files against the pipeline they serve, at load: a style's buckets must exist, and every
    prompt needs a template for every configured language (or a `default`), or a run would fail
    midway on the first document of a language it cannot write for."""
    buckets = set(config.quality.buckets)
    for prompt in prompts:
        unknown = sorted(set(prompt.spec.buckets) - buckets)
        if unknown:
            raise PromptError(f"prompt {prompt.path}: buckets: {unknown} are not quality buckets of the config (there are {sorted(buckets)})")
        missing = prompt.missing_languages(config.languages)
        if missing:
            raise PromptError(
                f"prompt {prompt.path}: system/user: no template for configured languages {missing} "
                "(add one per language, or a `default` template)"
            )


def check_routing(config: SynthesisConfig, styles: dict[str, Prompt]) -> None:
    """A routing that names a style with no prompt file fails at load, not at materialization."""
    routes = config.routes() or {}
    unknown = sorted({s for names in routes.values() for s in names} - set(styles))
    if unknown:
        source = "synthesis.routing" if config.routing is not None else f"profile {config.profile!r}"
        raise PromptError(f"{source} routes styles {unknown} that have no file in prompts/rewrite/ (there are {sorted(styles)})")


def why_not_routed(config: SynthesisConfig, prompt: Prompt, bucket: str) -> str | None:
    """None when `prompt`'s style runs on `bucket`; else the reason, for the empty partition's metadata."""
    routes = config.routes()
    if routes is None:
        if bucket in prompt.spec.buckets:
            return None
        return f"style {prompt.name!r} applies to buckets {list(prompt.spec.buckets)} (its prompt file), not {bucket!r}"
    if prompt.name in routes.get(bucket, ()):
        return None
    source = "synthesis.routing" if config.routing is not None else f"profile {config.profile!r}"
    return f"{source} does not route style {prompt.name!r} to bucket {bucket!r} (it routes {list(routes.get(bucket, ()))})"
