"""Which rewrite styles run on which quality bucket: configuration, never code; and the prompt library
checked against the config it serves, when the Definitions load.

By default every style runs on the buckets its prompt file names (`buckets:`); a shipped profile or
the config's `routing` replaces that. A style added as a file joins the graph with its own buckets.
"""

from __future__ import annotations

from synth_cpt.core.config import PipelineConfig, SynthesisConfig
from synth_cpt.synthesis.chunking import Count
from synth_cpt.synthesis.fit import check_fit, engine_context, request_sizes, template_counter
from synth_cpt.synthesis.prompts import Prompt, PromptError, judge_for


def routed(config: SynthesisConfig, style: Prompt) -> bool:
    """Whether `style` runs on some bucket (by the routing or profile, else by its file's buckets)."""
    routes = config.routes()
    return bool(style.spec.buckets) if routes is None else any(style.name in names for names in routes.values())


def check_library(config: PipelineConfig, prompts: list[Prompt], count: Count | None = None) -> list[str]:
    """Prompt files against the pipeline they serve, at load: a style's buckets must exist, every
    prompt needs a template for every configured language (or a `default`), or a run would fail
    midway on the first document of a language it cannot write for; and the largest request of every
    routed style, EntiGraph prompt and judge must fit the engine's context (synthesis/fit.py).
    `count`: what counts the templates (default: the generator's tokenizer if a file of it is at hand,
    else UTF-8 bytes). Returns notes (a check that could not be made, and why)."""
    configured_judge = next((p for p in prompts if p.kind == "judge"), None)
    styles = [p for p in prompts if p.kind == "rewrite" and routed(config.synthesis, p)]
    judges = {s.name: j for s in styles if (j := judge_for(s, configured_judge)) is not None}
    for judge in {j.path: j for j in judges.values()}.values():
        if judge not in prompts:
            prompts = [*prompts, judge]
    _check_files(config, prompts)
    generation, root = config.generation_settings(), config.storage_uri()
    context_size, source = engine_context(generation, root)
    if context_size is None:
        return [f"prompt sizes against the engine's context: {source}"]
    notes = []
    if generation.backend == "openai" and not generation.tokenizer:
        notes.append(
            "prompt sizes against the engine's context: chunks are cut by the target tokenizer (the served model's is not known), "
            "so input limits are not in the generator's tokens and a request may not fit as checked: set generation.tokenizer"
        )
    if count is None:
        count, _ = template_counter(generation, root)
    others = [p for p in prompts if p.kind == "entigraph"]
    check_fit(request_sizes(styles, others, judges, config.languages, count), context_size)
    return notes


def _check_files(config: PipelineConfig, prompts: list[Prompt]) -> None:
    buckets = set(config.quality.buckets)
    for prompt in prompts:
        unknown = sorted(set(prompt.spec.buckets) - buckets)
        if unknown:
            raise PromptError(
                f"prompt {prompt.path}: buckets: {unknown} are not quality buckets of the config (there are {sorted(buckets)})"
            )
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
