"""Two tokenizers, two jobs (DESIGN.md "Configuration and tokenizers"): the generator's cuts what is sent
(chunks, autoregressive context, EntiGraph's chunks, `prompts render`), the target's counts what is kept
(rows' n_tokens, `tokens`). The two here differ six-fold: a near character-level SentencePiece target and a
word-level Hugging Face generator, so a chunk cut by the wrong one is visibly wrong."""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import polars as pl
import pytest
import yaml
from tokenizers import Tokenizer, models, pre_tokenizers
from tokenizers.trainers import WordLevelTrainer

from synth_cpt.core.config import load_config
from synth_cpt.core.layout import QUALITY_SUBSETS, SYNTHETIC_ROWS, partition_file
from synth_cpt.core.storage import LocalStorage
from synth_cpt.corpus.tokenizer import TokenCounter, build_tokenizer, train_model
from synth_cpt.generation.cache import GenerationCache
from synth_cpt.generation.engine import GenerationEngine
from synth_cpt.generation.settings import LLMSettings
from synth_cpt.synthesis import fidelity as fid
from synth_cpt.synthesis.entigraph import Budget, entity_requests, extract_entity_graphs, relation_corpus, relation_jobs
from synth_cpt.synthesis.preview import preview
from synth_cpt.synthesis.prompts import load_prompt, prompts_dir
from synth_cpt.synthesis.rewrite import document_chunks, rewrite_documents
from synth_cpt.synthesis.rows import SourceDocument
from synth_cpt.synthesis.steps import SOURCE_COLUMNS, partition_inputs, rewrite_step

from .conftest import EN_TEXT, PT_TEXT, make_config
from .doubles import DeterministicTestBackend
from .test_model_identity import fake_model

LIMIT = 40  # max_input_tokens of the test prompts: generator tokens


def _word_level(texts: list[str]) -> bytes:
    """A Hugging Face tokenizer.json with one token per word or punctuation run (a coarse generator)."""
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(texts, WordLevelTrainer(special_tokens=["[UNK]"]))
    return tok.to_str().encode()


@pytest.fixture(scope="module")
def target() -> TokenCounter:
    """Near character-level: 300 pieces, 256 of them bytes."""
    return TokenCounter(train_model([PT_TEXT, EN_TEXT] * 20, vocab_size=300, seed=1, character_coverage=1.0))


@pytest.fixture(scope="module")
def generator_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("generator") / "tokenizer.json"
    path.write_bytes(_word_level([PT_TEXT, EN_TEXT] * 20))
    return path


@pytest.fixture(scope="module")
def generator(generator_file) -> TokenCounter:
    return TokenCounter(generator_file.read_bytes())


def never_identified(texts):
    return [""] * len(texts), [0.0] * len(texts)


def gate(counter: TokenCounter) -> fid.GateContext:
    return fid.GateContext(count=counter.count, identify=never_identified)


def engine_with(tmp_path: Path, backend: DeterministicTestBackend) -> GenerationEngine:
    return GenerationEngine(backend, GenerationCache(LocalStorage(tmp_path / "cache")), model="double", model_fingerprint="fp-double")


def doc(i: int, text: str) -> SourceDocument:
    return SourceDocument(f"d{i:03d}", text, "pt", "drop-a", "a.jsonl", i, None)


def long_text(i: int, parts: int = 4) -> str:
    return " ".join(f"Documento {i}, parte {k}. {PT_TEXT}" for k in range(parts))


def echo_prompt(root: Path, name: str = "echo", **chunking):
    """A rewrite style whose user message is exactly the chunk (and the carried context, when autoregressive)."""
    user = "{% if context %}ANTES: {{ context }}\nAGORA: {% endif %}{{ text }}" if chunking.get("autoregressive") else "{{ text }}"
    data = {
        "name": name, "kind": "rewrite", "description": "echo", "user": user,
        "chunking": {"max_input_tokens": LIMIT, **chunking},
        "output": {"length_ratio": None, "max_copy_similarity": None, "min_tokens": 0},
    }  # fmt: skip
    path = root / "rewrite" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, allow_unicode=True))
    return load_prompt("rewrite", name, root=root)


def assert_cut_by_generator(chunks: list[str], generator: TokenCounter, target: TokenCounter, limit: int = LIMIT) -> None:
    assert len(chunks) > 1
    assert max(generator.count(chunks)) <= limit, "every chunk fits the generator's limit"
    assert max(target.count(chunks)) > limit, "the target counter did not cut them (it would have kept each under the limit)"


# -- rewrites --------------------------------------------------------------------------------------------


def test_rewrite_step_chunks_by_the_generator_and_counts_rows_by_the_target(tmp_path, target, generator):
    storage = LocalStorage(tmp_path / "home")
    docs = [doc(i, long_text(i)) for i in range(3)]
    frame = pl.DataFrame([{c: getattr(d, c) for c in SOURCE_COLUMNS} for d in docs], schema_overrides={"title": pl.String})
    storage.write_parquet(partition_file(QUALITY_SUBSETS, "pt", "high"), frame)
    inputs = partition_inputs(storage, make_config(tmp_path), "pt", "high", target.count, generator.count)
    assert inputs.count == target.count and inputs.prompt_count == generator.count and inputs.gate.count == target.count

    seen: list[str] = []
    backend = DeterministicTestBackend(reply=lambda p: seen.append(p.request.messages[-1][1]) or p.request.messages[-1][1])
    prompt = echo_prompt(tmp_path / "p")
    step = rewrite_step(engine_with(tmp_path, backend), inputs, prompt, None, "rewrites_echo", 0.0)

    assert_cut_by_generator(seen, generator, target)
    expected = {c.text.strip() for d in docs for c in document_chunks(prompt, d, generator.count)}
    assert sorted(seen) == sorted(expected), "what was sent is the generator's chunks of each document, a repeated chunk once"
    rows = step.tables[SYNTHETIC_ROWS]
    assert rows.height == 3
    assert rows["n_tokens"].to_list() == target.count(rows["text"].to_list()), "rows are counted by the target tokenizer"
    assert step.tokens == sum(target.count(rows["text"].to_list())) != sum(generator.count(rows["text"].to_list()))


def test_autoregressive_context_is_bounded_by_the_generator(tmp_path, target, generator):
    prompt = echo_prompt(tmp_path / "p", "chain", autoregressive=True, context_tokens=60)
    contexts: list[str] = []

    def reply(p):
        user = p.request.messages[-1][1]
        if user.startswith("ANTES: "):
            context, user = user.removeprefix("ANTES: ").split("\nAGORA: ", 1)
            contexts.append(context)
        return user

    engine = engine_with(tmp_path, DeterministicTestBackend(reply=reply))
    result = rewrite_documents(engine, prompt, [doc(1, long_text(1))], prompt_count=generator.count, gate=gate(target), scope="s")
    rows, _ = result.frames()
    assert rows.height == 1 and rows["n_tokens"][0] == target.count([rows["text"][0]])[0]
    assert len(contexts) == len(document_chunks(prompt, doc(1, long_text(1)), generator.count)) - 1, "every chunk but the first"
    assert max(generator.count(contexts)) <= 60 < max(target.count(contexts))


def test_preview_chunks_with_the_generator_as_the_run_does(tmp_path, target, generator):
    """What `prompts render` shows is what the engine received, chunk by chunk, with two different counters."""
    prompt = echo_prompt(tmp_path / "p", "chain", autoregressive=True, context_tokens=60)
    backend = DeterministicTestBackend(reply=lambda p: "R " + p.request.messages[-1][1][-30:])
    engine = engine_with(tmp_path, backend)
    document = doc(1, long_text(1))
    kwargs = dict(storage=engine.cache.storage, seed=7, budget=Budget(4), relation_prompts={}, engine=engine)
    rewrite_documents(engine, prompt, [document], prompt_count=generator.count, gate=gate(target), scope="rewrites_chain/pt/high", seed=7)
    shown = preview(prompt, document, "high", prompt_count=generator.count, **kwargs)
    assert [engine.request_ids([item.request])[0] for item in shown] == backend.sent
    assert [item.header["source_tokens"] for item in shown] == [c.n_tokens for c in document_chunks(prompt, document, generator.count)]
    assert len(preview(prompt, document, "high", prompt_count=target.count, **kwargs)) != len(shown)


# -- EntiGraph --------------------------------------------------------------------------------------------


def entigraph_prompts(root: Path) -> dict:
    """The shipped EntiGraph prompts with a small chunk limit."""
    for name in ("entities", "pair", "triple"):
        data = yaml.safe_load((prompts_dir() / "entigraph" / f"{name}.yaml").read_text(encoding="utf-8"))
        data["chunking"]["max_input_tokens"] = LIMIT
        (root / "entigraph").mkdir(parents=True, exist_ok=True)
        (root / "entigraph" / f"{name}.yaml").write_text(yaml.safe_dump(data, allow_unicode=True))
    return {name: load_prompt("entigraph", name, root=root) for name in ("entities", "pair", "triple")}


def test_entigraph_chunks_by_the_generator_and_counts_rows_by_the_target(tmp_path, target, generator):
    prompts = entigraph_prompts(tmp_path / "p")
    document = doc(1, long_text(1) + " O Cabral saiu de Lisboa para o Brasil com treze navios e muitas pessoas a bordo.")
    asks = entity_requests(prompts["entities"], document, prompt_count=generator.count, seed=3)
    assert_cut_by_generator([ch.text for ch, _ in asks], generator, target)

    def reply(p):
        if p.request.json_schema:
            return json.dumps({"summary": "Resumo do documento sobre o Debian Edu.", "entities": ["Cabral", "Lisboa", "Brasil"]})
        return "Texto sobre como " + p.request.messages[-1][1][-200:] + " se relacionam no documento."

    engine = engine_with(tmp_path, DeterministicTestBackend(reply=reply))
    graphs = extract_entity_graphs(engine, prompts["entities"], [document], prompt_count=generator.count, scope="eg", seed=3)
    assert graphs.summaries["request_ids"].to_list() == [engine.request_ids([r for _, r in asks])]
    budget = Budget(triples=1)
    jobs = relation_jobs(document, ["Cabral", "Lisboa", "Brasil"], prompts["pair"], prompts["triple"],
                         prompt_count=generator.count, seed=3, budget=budget)  # fmt: skip
    assert [len(j.entities) for j in jobs] == [2, 2, 2, 3], "every pair of three entities and the one budgeted triple"
    carried = [j.context.summary + j.context.text for j in jobs]
    assert all(sum(generator.count([j.context.summary, j.context.text])) <= LIMIT for j in jobs) and LIMIT < max(target.count(carried))
    result, _ = relation_corpus(
        engine, prompts["pair"], prompts["triple"], prompts["entities"].sha, [document], graphs.summaries, graphs.entities,
        prompt_count=generator.count, gate=gate(target), scope="ec", seed=3, budget=budget,
    )  # fmt: skip
    rows, _ = result.frames()
    assert set(rows["kind"].to_list()) == {"entigraph_summary", "entigraph_pair", "entigraph_triple"}
    assert rows["n_tokens"].to_list() == target.count(rows["text"].to_list())


# -- where the generator's tokenizer comes from ---------------------------------------------------------


def test_generator_tokenizer_file_by_backend(tmp_path, monkeypatch, generator_file):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # the hash memo's fallback stays out of the user's cache
    folder = fake_model(tmp_path / "models" / "m")
    (folder / "tokenizer.json").write_bytes(generator_file.read_bytes())
    root = str(tmp_path / "store")
    assert LLMSettings(model=str(folder)).generator_tokenizer_file(root) == folder / "tokenizer.json"
    served = tmp_path / "served" / "tokenizer.json"
    served.parent.mkdir()
    served.write_bytes(generator_file.read_bytes())
    assert LLMSettings(model=str(folder), tokenizer=str(served)).generator_tokenizer_file(root) == served, "the field overrides the folder"
    openai = {"backend": "openai", "endpoints": ["http://127.0.0.1:9/v1"], "served_model_name": "m"}
    assert LLMSettings(**openai, tokenizer=str(served)).generator_tokenizer_file(root) == served
    assert LLMSettings(**openai).generator_tokenizer_file(root) is None
    (folder / "tokenizer.json").unlink()
    assert LLMSettings(model=str(folder)).generator_tokenizer_file(root) is None
    with pytest.raises(FileNotFoundError, match="generation.tokenizer"):
        LLMSettings(**openai, tokenizer=str(tmp_path / "missing.json")).generator_tokenizer_file(root)


def test_chunking_counter_picks_the_generator_and_says_which(tmp_path, target, generator, generator_file):
    from synth_cpt.defs.synthesis import chunking_counter

    openai = {"backend": "openai", "endpoints": ["http://127.0.0.1:9/v1"], "served_model_name": "m"}
    said: list[str] = []
    counter, recorded = chunking_counter(LLMSettings(**openai, tokenizer=str(generator_file)), str(tmp_path), target, said.append)
    assert counter.count([PT_TEXT]) == generator.count([PT_TEXT]) != target.count([PT_TEXT])
    assert recorded == {
        "tokenizer": "generator", "kind": "huggingface", "sha256": hashlib.sha256(generator_file.read_bytes()).hexdigest(),
        "file": str(generator_file),
    }  # fmt: skip
    counter, recorded = chunking_counter(LLMSettings(**openai), str(tmp_path), target, said.append)
    assert counter is target and recorded == {"tokenizer": "target", "kind": "sentencepiece", "sha256": target.sha256}
    assert len(said) == 2 and "generator's tokenizer" in said[0] and "target tokenizer" in said[1]


def test_prompts_render_chunks_with_the_generator(tmp_path, isolated_env, capsys, target, generator, generator_file):
    """`synth-cpt prompts render` picks the counter as the assets do: its chunks are the generator's."""
    from synth_cpt.cli.prompts import cmd_prompts

    model = tmp_path / "target.model"
    model.write_bytes(train_model([PT_TEXT, EN_TEXT] * 20, vocab_size=300, seed=1, character_coverage=1.0))
    generation = {"backend": "openai", "endpoints": ["http://127.0.0.1:9/v1"], "served_model_name": "m", "tokenizer": str(generator_file)}
    path = tmp_path / "pipeline.yaml"
    path.write_text(
        yaml.safe_dump({"storage_root": str(tmp_path / "home"), "tokenizer": {"model_file": str(model)}, "generation": generation})
    )
    storage = LocalStorage(tmp_path / "home")
    build_tokenizer(storage, load_config(path), [])
    document = doc(1, long_text(1, parts=12))
    frame = pl.DataFrame([{c: getattr(document, c) for c in SOURCE_COLUMNS}], schema_overrides={"title": pl.String})
    storage.write_parquet(partition_file(QUALITY_SUBSETS, "pt", "high"), frame)

    args = argparse.Namespace(action="render", name="medium", kind="rewrite", doc=document.doc_id, config=str(path))
    assert cmd_prompts(args) == 0
    out = capsys.readouterr()
    headers = [json.loads(line[4:]) for line in out.out.splitlines() if line.startswith("=== {")]
    medium = load_prompt("rewrite", "medium")
    expected = document_chunks(medium, document, generator.count)
    assert [h["source_tokens"] for h in headers] == [c.n_tokens for c in expected] and len(expected) > 1
    assert len(document_chunks(medium, document, target.count)) != len(expected)
    said = " ".join(out.err.split())  # the terminal (stderr here), as rich wrapped it
    assert "chunks are cut by the generator's tokenizer" in said and f"(huggingface, sha256 {generator.sha256[:12]})" in said
