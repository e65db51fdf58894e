"""Generation assets: `rewrites_<style>` (one per prompts/rewrite/<style>.yaml), `entity_graphs` and
`entigraph_corpus`, each `[language|quality]` and reading `quality_subsets`.

One engine load and one engine run per run: the generation assets are one multi-asset that can be
subset. A run of any selection of them, for one partition or a range (a single-run backfill,
`synth-cpt synthesize`), is one step, which builds the engine once; every selected asset of every
partition then generates in its own thread (`synthesis.schedule`), all feeding one `JointBackend`, and
is published from the step's thread as it finishes (entigraph_corpus after its entity_graphs). The
engine's backend is also shared by every later step in the same process (`LLMSettings.shared_backend`).
The `gpu` pool (one slot, `make instance`) keeps two runs from holding two engines on one machine.
Assets stay separately materializable and each keeps its own checks, metadata and lineage.

Two tokenizers (DESIGN.md "Configuration and tokenizers"): the generator's cuts what is sent (chunks,
autoregressive context), the target's counts what is kept (rows' n_tokens, `tokens`, the gate's length
rules). `chunking_counter` picks the generator's; each asset records it as `chunking_tokenizer`.
"""

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dagster import (
    AssetExecutionContext,
    AssetKey,
    AssetMaterialization,
    AssetsDefinition,
    AssetSpec,
    AutomationCondition,
    BackfillPolicy,
    MaterializeResult,
    MetadataValue,
    multi_asset,
)

from synth_cpt.core.config import PipelineConfig
from synth_cpt.core.contracts import SYNTHETIC, SYNTHETIC_REJECTS
from synth_cpt.core.layout import ENTIGRAPH_CORPUS, ENTITY_GRAPHS, QUALITY_SUBSETS, SYNTHETIC_ROWS, rewrite_asset
from synth_cpt.core.layout import SYNTHETIC_REJECTS as REJECTS_FILE
from synth_cpt.core.publish import CandidateRejected
from synth_cpt.core.storage import Storage
from synth_cpt.corpus.tokenizer import TokenCounter
from synth_cpt.defs.checks import check_result, partition_check, publish_spec, rejected_result
from synth_cpt.defs.partitions import corpus_partitions, split_corpus_key
from synth_cpt.defs.resources import LLM, PipelineResource
from synth_cpt.generation.backends import Prepared
from synth_cpt.generation.joint import JointBackend
from synth_cpt.generation.prompt_archive import archive_prompt
from synth_cpt.generation.requests import ChatRequest
from synth_cpt.generation.settings import LLMSettings, release_engines
from synth_cpt.synthesis.entigraph import Budget
from synth_cpt.synthesis.outputs import publish_tables
from synth_cpt.synthesis.prompts import Prompt, PromptError, judge_for, load_kind, load_prompt
from synth_cpt.synthesis.routing import check_library, check_routing, why_not_routed
from synth_cpt.synthesis.rows import table
from synth_cpt.synthesis.schedule import Task, run_tasks
from synth_cpt.synthesis.steps import (
    PASS_RATE,
    ROWS_VALID,
    StepOutput,
    empty_step,
    entigraph_corpus_step,
    entity_graphs_step,
    partition_inputs,
    rewrite_step,
)

GROUP = "synthesis"
ENTIGRAPH_PROMPTS = ("entities", "pair", "triple")
_ROWS = "every row has a synth_id, leads to a subset document and to its generations, names its prompt and model, has text in the partition's language."
_PASS = "accepted / (accepted + rejected) is at least synthesis.min_pass_rate."


def chunking_counter(
    llm: LLMSettings, storage_root: str, target: TokenCounter, log: Callable[[str], None]
) -> tuple[TokenCounter, dict[str, Any]]:
    """The counter that cuts chunks and context (the generator's tokenizer, else the target's) and what to
    record about it. The assets and `synth-cpt prompts render` both call this, so a preview chunks as a run does."""
    path = llm.generator_tokenizer_file(storage_root, log=log)
    if path is None:
        log(
            f"chunks are cut by the target tokenizer ({target.kind}, sha256 {target.sha256[:12]}): the generator's tokenizer "
            "is not known (set generation.tokenizer to the served model's tokenizer.json)"
        )
        return target, {"tokenizer": "target", "kind": target.kind, "sha256": target.sha256}
    counter = TokenCounter(Path(path).read_bytes(), name=str(path))
    log(f"chunks are cut by the generator's tokenizer {path} ({counter.kind}, sha256 {counter.sha256[:12]}); rows by the target's")
    return counter, {"tokenizer": "generator", "kind": counter.kind, "sha256": counter.sha256, "file": str(path)}


class EngineLease:
    """The step's engine, built on first use by whichever of its threads needs it first, behind one
    `JointBackend`: every run of every thread feeds the one engine run. Counts the model loads it caused."""

    def __init__(
        self, context: AssetExecutionContext, llm: LLM, storage: Storage, storage_root: str, prompts: list[Prompt] | None = None
    ) -> None:
        self.context, self.llm, self.storage, self.root = context, llm, storage, storage_root
        self.prompts = prompts or []
        self.engine = None
        self.joint: JointBackend | None = None
        self.loads_before = 0
        self.load_seconds_before = 0.0
        self._lock = threading.Lock()

    def get(self):
        with self._lock:
            if self.engine is None:
                engine = self.llm.engine(self.storage, self.root, log=self.context.log.info)
                self.loads_before = engine.backend.loads
                self.load_seconds_before = engine.backend.load_seconds
                self.joint = JointBackend(engine.backend, log=self.context.log.info, probes=prompt_probes(self.prompts))
                self.engine = engine.with_backend(self.joint)
            return self.engine

    def close(self) -> None:
        if self.joint is not None:
            self.joint.close()

    def figures(self, used: bool = True) -> dict[str, float | int | str]:
        """Loads caused by this step, and whether its engine speculates (`speculation`: on|off, with why); an
        output that generated nothing (`used` False) reports none."""
        if self.engine is None or not used:
            return {"engine_loads": 0, "engine_load_seconds": 0.0, "speculation": "off (no engine was needed)"}
        backend = self.engine.backend
        return {
            "model": self.engine.model,
            "model_fingerprint": self.engine.fingerprint,
            "engine": backend.name,
            "engine_loads": backend.loads - self.loads_before,
            "engine_load_seconds": round(backend.load_seconds - self.load_seconds_before, 2),
            "speculation": self.engine.speculation(),
        }


def prompt_probes(prompts: list[Prompt]) -> list[Prepared]:
    """One empty request per prompt of the run, with its sampling: what the engine's load decides speculation from,
    the same whichever of the run's threads loads it."""
    return [Prepared(ChatRequest.chat([], p.sampling(), prompt_name=p.id), f"probe:{p.id}", 0) for p in prompts]


def _publish(context: AssetExecutionContext, storage: Storage, asset: str, partition: str, step: StepOutput, lease, ranged: bool):
    """Validate, then publish: the step's checks are yielded, and the output only if they passed. The
    prompt files the rows name are archived by SHA first, so `lineage` can always print their text.
    A step of one partition yields results (an output, so downstream steps of the same run go on); a step
    of a range (a single-run backfill) yields events that name their partition, since Dagster would give a
    result every partition of the range."""
    language, quality = split_corpus_key(partition)

    def check(result):
        return partition_check(result, partition) if ranged else result

    started = time.monotonic()
    for prompt in step.prompts:
        archive_prompt(storage, prompt.sha, prompt.raw)
    manifest = {k: v for k, v in step.metadata.items() if k not in ("examples",) and isinstance(v, (int, float, str, dict, type(None)))}
    try:
        pointer = publish_tables(storage, asset, language, quality, step.tables, step.outcomes, manifest)
    except CandidateRejected as rejected:
        for name, outcome in step.outcomes.items():
            if name != rejected.check_name:
                yield check(check_result(outcome, check_name=name, asset_key=asset))
        failed = {k: MetadataValue.json(step.metadata[k]) for k in ("failed_requests", "failed_by_reason") if step.metadata.get(k)}
        # what the step spent anyway, and what the next run sends again
        yield check(rejected_result(context, rejected, asset_key=asset, **lease.figures(step.engine_used), **failed))
        return False
    for name, outcome in step.outcomes.items():
        yield check(check_result(outcome, check_name=name, asset_key=asset))
    metadata = {
        "dagster/row_count": step.rows,
        "dagster/uri": storage.uri(pointer["prefix"]),
        "version": pointer["version"],
        "tokens": step.tokens,
        "publish_seconds": round(time.monotonic() - started, 2),
        **lease.figures(step.engine_used),
    }
    for key, value in step.metadata.items():
        if key == "examples":
            metadata["examples"] = MetadataValue.md(value)
        elif isinstance(value, dict):
            metadata[key] = MetadataValue.json(value)
        elif value is not None:
            metadata[key] = value
    context.log.info(
        f"{asset} {language}|{quality}: {step.rows:,} rows, {step.tokens:,} tokens, pass rate {step.metadata.get('pass_rate', 1.0)}"
    )
    yield (
        AssetMaterialization(asset_key=asset, partition=partition, metadata=metadata)
        if ranged
        else MaterializeResult(asset_key=asset, metadata=metadata)
    )
    return True


def build_synthesis_assets(config: PipelineConfig) -> list[AssetsDefinition]:
    styles = load_kind("rewrite")
    check_routing(config.synthesis, styles)
    entigraph = {name: load_prompt("entigraph", name) for name in ENTIGRAPH_PROMPTS}
    judge = load_prompt("judge", "fidelity") if config.synthesis.judge else None
    if not styles:
        raise PromptError("prompts/rewrite/ holds no style")
    check_library(config, [*styles.values(), *entigraph.values(), *([judge] if judge else [])])
    parts = corpus_partitions(config)
    automation = AutomationCondition.eager() if config.synthesis.automation == "eager" else None
    common = {
        "deps": [QUALITY_SUBSETS],
        "partitions_def": parts,
        "group_name": GROUP,
        "automation_condition": automation,
        "skippable": True,
    }
    specs = [
        AssetSpec(
            rewrite_asset(name),
            description=f"Rewrites in the '{name}' style: {prompt.spec.description}",
            kinds={"vllm", "parquet"},
            metadata={"prompt_file": f"prompts/rewrite/{name}.yaml", "prompt_sha": prompt.sha},
            **common,
        )  # fmt: skip
        for name, prompt in styles.items()
    ]
    specs.append(
        AssetSpec(
            ENTITY_GRAPHS,
            description="EntiGraph step 1: a summary and the entities of every document.",
            kinds={"vllm", "parquet"},
            **common,
        )
    )
    specs.append(
        AssetSpec(
            ENTIGRAPH_CORPUS,
            description="EntiGraph steps 2-3: the summaries and budgeted relation texts of entity pairs and triples.",
            kinds={"vllm", "parquet"},
            **{**common, "deps": [ENTITY_GRAPHS, QUALITY_SUBSETS]},
        )  # fmt: skip
    )
    check_specs = [
        publish_spec(name, spec.key.to_user_string(), text, parts)
        for spec in specs
        for name, text in ((ROWS_VALID, _ROWS), (PASS_RATE, _PASS))
    ]
    order = [spec.key.to_user_string() for spec in specs]  # rewrites, then entity_graphs, then entigraph_corpus
    # per_partition: Dagster's default (None), whose runs carry `dagster/partition` for the queue's per-partition limit
    policy = BackfillPolicy.single_run() if config.synthesis.backfill == "single_run" else None

    @multi_asset(
        name="synthesis", specs=specs, check_specs=check_specs, can_subset=True, partitions_def=parts, pool="gpu",
        backfill_policy=policy,
        description="Every generation asset of every partition of the run in one step: one engine load, one engine run.",
    )  # fmt: skip
    def synthesis(context: AssetExecutionContext, pipeline: PipelineResource, llm: LLM):
        cfg, storage = pipeline.load(), pipeline.storage()
        ranged = context.has_partition_key_range
        partitions = sorted(context.partition_keys if ranged else [context.partition_key])
        selected = [a for a in order if AssetKey(a) in context.selected_asset_keys]
        target = TokenCounter.from_storage(storage)
        prompt_counter, chunking = chunking_counter(llm, cfg.storage_uri(), target, context.log.info)
        lease = EngineLease(context, llm, storage, cfg.storage_uri(), _prompts_of(cfg, selected, partitions))
        tasks = []
        errors: list[str] = []
        for partition in partitions:
            language, quality = split_corpus_key(partition)
            try:
                inputs = partition_inputs(storage, cfg, language, quality, target.count, prompt_counter.count)
            except Exception as exc:  # this partition fails; the run's others still generate and publish
                errors.append(f"{partition}: {type(exc).__name__}: {exc}")
                context.log.error(f"{partition} not run: its inputs could not be read: {type(exc).__name__}: {exc}")
                continue
            context.log.info(f"{language}|{quality}: {len(inputs.documents)} documents of {len(inputs.subset_doc_ids)} in the subset")
            tasks += _tasks(cfg, storage, inputs, lease, selected, str(partition), chunking)
        context.log.info(f"{len(tasks)} generation step(s) ({len(selected)} asset(s) x {len(partitions)} partition(s)) feed one engine run")
        steps = run_tasks(tasks)
        try:
            for done in steps:
                asset, partition = done.task.key
                if done.skipped:
                    context.log.error(f"{asset} {partition} not run: {done.skipped}")
                elif done.error is not None:
                    errors.append(f"{asset} {partition}: {type(done.error).__name__}: {done.error}")
                    context.log.error(f"{asset} {partition} failed: {type(done.error).__name__}: {done.error}")
                else:
                    try:
                        done.published = yield from _publish(context, storage, asset, partition, done.output, lease, ranged)
                    except Exception as exc:  # e.g. storage: this output is not published; the others still are
                        errors.append(f"{asset} {partition}: publishing: {type(exc).__name__}: {exc}")
                        context.log.error(f"{asset} {partition} not published: {type(exc).__name__}: {exc}")
        finally:
            lease.close()  # a step stopped early: threads still waiting on the engine end now
            steps.close()
            if lease.joint is not None:
                context.log.info(f"joint engine run: {lease.joint.figures()}")
            if release_engines():  # a step process must be able to exit (see settings.keep_engines)
                context.log.info("engine closed at the end of the step")
        if errors:
            raise RuntimeError(f"{len(errors)} generation step(s) failed: " + " | ".join(errors))

    def _prompts_of(cfg, selected: list[str], partitions: list) -> list[Prompt]:
        """Every prompt the run may send, in the assets' order."""
        used: dict[str, Prompt] = {}
        for asset in selected:
            if asset == ENTITY_GRAPHS:
                used |= {"entities": entigraph["entities"]}
            elif asset == ENTIGRAPH_CORPUS:
                used |= {name: entigraph[name] for name in ENTIGRAPH_PROMPTS}
            else:
                prompt = styles[asset.removeprefix(rewrite_asset(""))]
                if any(why_not_routed(cfg.synthesis, prompt, split_corpus_key(p)[1]) is None for p in partitions):
                    used[prompt.id] = prompt
                    checker = judge_for(prompt, judge)
                    if checker is not None:
                        used[checker.id] = checker
        return list(used.values())

    def _tasks(cfg, storage, inputs, lease, selected, partition, chunking) -> list[Task]:
        """One task per selected asset of the partition; entigraph_corpus waits for entity_graphs when both run."""
        minimum = cfg.synthesis.min_pass_rate
        e = cfg.synthesis.entigraph

        def rewrite(asset: str) -> StepOutput:
            prompt = styles[asset.removeprefix(rewrite_asset(""))]
            reason = why_not_routed(cfg.synthesis, prompt, inputs.quality)
            if reason:
                return empty_step(reason, minimum, {SYNTHETIC_ROWS: table([], SYNTHETIC), REJECTS_FILE: table([], SYNTHETIC_REJECTS)})
            return rewrite_step(lease.get(), inputs, prompt, judge, asset, minimum)

        def graphs() -> StepOutput:
            return entity_graphs_step(lease.get(), inputs, entigraph["entities"], e.max_entities, minimum, max_attempts=e.max_attempts)

        def corpus() -> StepOutput:
            budget = Budget(e.triples_per_document, e.tokens_per_document)
            return entigraph_corpus_step(lease.get(), storage, inputs, entigraph, budget, ENTIGRAPH_CORPUS, minimum)

        def chunked(make):
            def step() -> StepOutput:
                out = make()
                out.metadata["chunking_tokenizer"] = chunking
                return out

            return step

        tasks = []
        for asset in selected:
            if asset == ENTITY_GRAPHS:
                tasks.append(Task((asset, partition), chunked(graphs)))
            elif asset == ENTIGRAPH_CORPUS:
                after = (ENTITY_GRAPHS, partition) if ENTITY_GRAPHS in selected else None
                tasks.append(Task((asset, partition), chunked(corpus), after=after))
            else:
                tasks.append(Task((asset, partition), chunked(lambda a=asset: rewrite(a))))
        return tasks

    return [synthesis]
