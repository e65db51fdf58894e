"""Every number a rewrite writes is right (issue 16): n_tokens counts the stored text, requests fit the
engine, the judge reads chunk against chunk, and Nemotron-CC segments are dropped one by one."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import polars as pl
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, models, pre_tokenizers
from tokenizers.trainers import WordLevelTrainer

from synth_cpt.core.config import PipelineConfig
from synth_cpt.core.contracts import check_synthetic
from synth_cpt.corpus.tokenizer import TokenCounter, train_model
from synth_cpt.synthesis import fidelity as fid
from synth_cpt.synthesis.chunking import chunk_document, join_outputs
from synth_cpt.synthesis.fit import CHAT_TEMPLATE_TOKENS, utf8_bytes
from synth_cpt.synthesis.prompts import PromptError, load_kind, load_prompt, prompts_dir
from synth_cpt.synthesis.rewrite import rewrite_documents
from synth_cpt.synthesis.routing import check_library
from synth_cpt_tests.conftest import EN_TEXT, PT_TEXT
from synth_cpt_tests.doubles import DeterministicTestBackend
from synth_cpt_tests.test_synthesis_units import doc, engine_with, gate, write_prompt

NEMOTRON = ("diverse_qa", "distill", "extract_knowledge", "knowledge_list")


@pytest.fixture(scope="module")
def counter() -> TokenCounter:
    return TokenCounter(train_model([PT_TEXT, EN_TEXT] * 20, vocab_size=600, seed=1, character_coverage=1.0))


def _chunk_of(p) -> str:
    """The source chunk of a rewrite request (after the template's "Texto:" / "Text:" label)."""
    user = p.request.messages[-1][1]
    return user.split("Texto:" if "Texto:" in user else "Text:", 1)[1]


def styled_reply(p) -> str:
    """A test double's answer in the shape each shipped style asks for: the chunk's words reversed (same
    length, same numbers, no copied 4-gram), as QA pairs, a list, or after a reasoning marker; and the
    judge's verdict, faithful."""
    if p.request.json_schema:
        return json.dumps({"verdict": "faithful", "reason": "ok"})
    words = list(reversed(_chunk_of(p).split()))
    style = load_kind("rewrite")[p.request.prompt_name.split("/", 1)[1]].spec.output
    body = " ".join(words)
    if style.shape == "qa":
        body = f"Pergunta: {' '.join(words[: len(words) // 2])}?\nResposta: {' '.join(words[len(words) // 2 :])}"
    elif style.shape == "list":
        body = f"- {' '.join(words[: len(words) // 2])}\n- {' '.join(words[len(words) // 2 :])}"
    return f"Raciocínio: útil.\n{style.answer_after[-1]} {body}" if style.answer_after else body


_WORDS = st.sampled_from(
    ["casa", "rio", "Lisboa", "3,5", "1.234", "1.234,5", "2024", "Sr.", "fim.", "ok?", "\n", "\n\n", "é", "  ", "São", "Paulo", "navios"]
)


@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(words=st.lists(_WORDS, min_size=1, max_size=400))
def test_every_accepted_row_counts_the_text_it_stores(tmp_path_factory, counter, words):
    """For every shipped style (diverse_qa stores the source before its questions), n_tokens is the target
    tokenizer's count of the row's own text. PT_TEXT is accepted by every style, so the check is never empty."""
    tmp = tmp_path_factory.mktemp("rows")
    docs = [doc(0, PT_TEXT), doc(1, " ".join(words))]
    for name, prompt in load_kind("rewrite").items():
        engine = engine_with(tmp / name, DeterministicTestBackend(reply=styled_reply))
        rows, _ = rewrite_documents(engine, prompt, docs, prompt_count=counter.count, gate=gate(counter), scope=f"s/{name}").frames()
        assert "d000" in rows["doc_id"].to_list(), name
        assert rows["n_tokens"].to_list() == counter.count(rows["text"].to_list()), name


def test_kept_source_is_counted_with_the_output(tmp_path, counter):
    """diverse_qa keeps the original before its questions: the row's n_tokens is of both."""
    engine = engine_with(tmp_path, DeterministicTestBackend(reply=styled_reply))
    rows, _ = rewrite_documents(
        engine, load_prompt("rewrite", "diverse_qa"), [doc(0, PT_TEXT)], prompt_count=counter.count, gate=gate(counter), scope="s"
    ).frames()
    text = rows["text"][0]
    assert text.startswith(PT_TEXT + "\n\nPergunta:") and rows["n_tokens"][0] == counter.count([text])[0]
    assert rows["n_tokens"][0] > counter.count([text.removeprefix(PT_TEXT + "\n\n")])[0]


def test_rows_valid_fails_on_a_row_whose_n_tokens_is_not_its_texts(tmp_path, counter):
    engine = engine_with(tmp_path, DeterministicTestBackend(reply=styled_reply))
    docs = [doc(0, PT_TEXT), doc(1, EN_TEXT, "pt")]
    rows, _ = rewrite_documents(
        engine, load_prompt("rewrite", "medium"), docs, prompt_count=counter.count, gate=gate(counter), scope="s"
    ).frames()
    assert rows.height == 2
    good = check_synthetic(rows, "pt", ["d000", "d001"], count=counter.count)
    assert good.success and good.details["tokens.n_tokens_match_text"]["success"]
    wrong_id = rows["synth_id"][1]
    forged = rows.with_columns(n_tokens=pl.when(pl.col("synth_id") == wrong_id).then(pl.col("n_tokens") - 1).otherwise(pl.col("n_tokens")))
    bad = check_synthetic(forged, "pt", ["d000", "d001"], count=counter.count)
    assert not bad.success and bad.details["tokens.n_tokens_match_text"]["wrong"] == [wrong_id]
    assert bad.failures == [
        f"1 rows' n_tokens differ from the target tokenizer's count of their text, e.g. {wrong_id} "
        f"({rows['n_tokens'][1] - 1} != {rows['n_tokens'][1]})"
    ]


# -- requests that fit the engine -------------------------------------------------------------------


def words(texts: list[str]) -> list[int]:
    """A counting double: one token per whitespace-separated word."""
    return [len(t.split()) for t in texts]


def test_a_prompt_that_cannot_fit_the_engine_fails_at_load_with_its_numbers(tmp_path):
    path = write_prompt(
        tmp_path, "rewrite", "big", buckets=["high"], system="um dois três", user="quatro cinco: {{ text }}",
        chunking={"max_input_tokens": 3000}, output={"max_tokens": 1000},
    )  # fmt: skip
    style = load_prompt("rewrite", "big", root=tmp_path)
    total = 3 + 3 + CHAT_TEMPLATE_TOKENS + 3000 + 1000  # the user template counted with a one-word placeholder for the text
    fits = PipelineConfig.model_validate({"generation": {"max_model_len": total}})
    assert check_library(fits, [style], count=words) == []
    small = PipelineConfig.model_validate({"generation": {"max_model_len": total - 1}})
    with pytest.raises(PromptError) as err:
        check_library(small, [style], count=words)
    assert (
        f"prompt {path}: largest request {total} tokens (template 6 + chat template {CHAT_TEMPLATE_TOKENS} + input 3000 "
        f"+ output 1000) > the engine's context {total - 1}"
    ) in str(err.value)


def test_autoregressive_context_counts_and_unrouted_styles_are_not_checked(tmp_path):
    """The context counts, and so does the template text shown only when there is context (the longer branch)."""
    write_prompt(
        tmp_path, "rewrite", "chain", buckets=["high"], user="{% if context %}o texto até aqui: {{ context }}{% endif %} {{ text }}",
        chunking={"max_input_tokens": 100, "autoregressive": True, "context_tokens": 500}, output={"max_tokens": 100},
    )  # fmt: skip
    write_prompt(tmp_path, "rewrite", "idle", buckets=[], chunking={"max_input_tokens": 9000})
    styles = [load_prompt("rewrite", n, root=tmp_path) for n in ("chain", "idle")]
    total = 6 + CHAT_TEMPLATE_TOKENS + 100 + 500 + 100  # "o texto até aqui: x x"
    assert check_library(PipelineConfig.model_validate({"generation": {"max_model_len": total}}), styles, count=words) == []
    with pytest.raises(PromptError, match=rf"chain.yaml: largest request {total} tokens .*\+ context 500 \+ output 100\)"):
        check_library(PipelineConfig.model_validate({"generation": {"max_model_len": total - 1}}), styles, count=words)


def test_the_judge_request_is_checked_when_judging_is_on(tmp_path):
    """The judge holds a source chunk and its rewrite: template + the style's input and max_tokens + its own."""
    write_prompt(tmp_path, "rewrite", "long", buckets=["high"], chunking={"max_input_tokens": 2000}, output={"max_tokens": 1600})
    shutil.copytree(prompts_dir() / "judge", tmp_path / "judge")
    style, judge = load_prompt("rewrite", "long", root=tmp_path), load_prompt("judge", "fidelity", root=tmp_path)
    judge_template = max(sum(words([m["content"] for m in judge.messages(lang, source="x", rewrite="x")])) for lang in ("pt", "en"))
    total = judge_template + CHAT_TEMPLATE_TOKENS + 2000 + 1600 + judge.spec.output.max_tokens
    config = {"generation": {"max_model_len": total - 1}, "synthesis": {"judge": True}}
    with pytest.raises(PromptError) as err:
        check_library(PipelineConfig.model_validate(config), [style, judge], count=words)
    assert f"judging {tmp_path / 'rewrite' / 'long.yaml'}: largest request {total} tokens" in str(err.value)
    assert "source chunk 2000 + rewritten chunk 1600" in str(err.value)
    config["synthesis"]["judge"] = False  # judging off: only the style's own request, which fits
    assert check_library(PipelineConfig.model_validate(config), [style], count=words) == []
    # a style whose file says judge: true is judged whatever the config says
    write_prompt(
        tmp_path, "rewrite", "long", buckets=["high"], chunking={"max_input_tokens": 2000}, output={"max_tokens": 1600}, judge=True
    )
    with pytest.raises(PromptError, match="judging"):
        check_library(PipelineConfig.model_validate(config), [load_prompt("rewrite", "long", root=tmp_path)], count=words)


def test_the_context_comes_from_the_model_folder_when_max_model_len_is_null(tmp_path):
    write_prompt(tmp_path, "rewrite", "mid", buckets=["high"], chunking={"max_input_tokens": 1000}, output={"max_tokens": 1000})
    style = load_prompt("rewrite", "mid", root=tmp_path)
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"max_position_embeddings": 2000}))
    with pytest.raises(PromptError, match=r"the engine's context 2000"):
        check_library(PipelineConfig.model_validate({"generation": {"max_model_len": None, "model": str(folder)}}), [style], count=words)
    unknown = PipelineConfig.model_validate({"generation": {"max_model_len": None, "model": "org/not-a-folder"}})
    assert check_library(unknown, [style], count=words) == [
        "prompt sizes against the engine's context: not checked: generation.max_model_len is null and 'org/not-a-folder' "
        "is not a local model folder with a config.json"
    ]


@pytest.mark.parametrize("profile", ["study", "nemotron", "rewire", "k2"])
def test_shipped_prompts_fit_the_default_context_even_counted_by_bytes(profile):
    """With max_model_len 4096 and templates counted as UTF-8 bytes (an upper bound of their tokens)."""
    config = PipelineConfig.model_validate({"synthesis": {"profile": profile}})
    assert config.generation.max_model_len == 4096
    prompts = [*load_kind("rewrite").values(), *load_kind("entigraph").values()]
    assert check_library(config, prompts, count=utf8_bytes) == []


def _word_level_tokenizer(path: Path) -> Path:
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([PT_TEXT, EN_TEXT], WordLevelTrainer(special_tokens=["[UNK]"]))
    path.write_text(tok.to_str())
    return path


def test_prompts_check_command_reports_what_cannot_fit(tmp_path, monkeypatch, capsys):
    from synth_cpt.cli.prompts import cmd_prompts

    tokenizer = _word_level_tokenizer(tmp_path / "tokenizer.json")
    shutil.copytree(prompts_dir(), tmp_path / "prompts")
    monkeypatch.setenv("SYNTH_CPT_PROMPTS", str(tmp_path / "prompts"))
    monkeypatch.setenv("SYNTH_CPT_HOME", str(tmp_path / "home"))
    for max_model_len, code in ((4096, 0), (3000, 2)):
        config = tmp_path / f"c{max_model_len}.yaml"
        config.write_text(
            yaml.safe_dump(
                {"synthesis": {"profile": "nemotron"}, "generation": {"tokenizer": str(tokenizer), "max_model_len": max_model_len}}
            )
        )
        args = argparse.Namespace(action="check", name=None, kind=None, doc=None, config=str(config))
        assert cmd_prompts(args) == code
        captured = capsys.readouterr()
        table = " ".join(captured.out.split())  # the table, as rich wrapped it
        assert f"engine context: {max_model_len} (generation.max_model_len)" in table
        assert ("NO" in [cell.strip() for cell in table.split("│")]) == bool(code)
        if code:
            assert f"prompt {tmp_path / 'prompts' / 'rewrite' / 'distill.yaml'}: largest request" in captured.err
            assert "> the engine's context 3000" in captured.err


# -- the judge, chunk by chunk ------------------------------------------------------------------------


def chunked_judge_reply(p) -> str:
    """Rewrites: the chunk reversed. The judge: unfaithful when the source chunk it is shown says FALSO."""
    if p.request.json_schema:
        source = p.request.messages[-1][1].split("Rewrite:")[0].split("Reescrita:")[0]
        return json.dumps({"verdict": "unfaithful" if "FALSO" in source else "faithful", "reason": "r"})
    return " ".join(reversed(_chunk_of(p).split()))


def test_the_judge_compares_each_chunk_with_its_rewrite(tmp_path, counter):
    prompt, judge = load_prompt("rewrite", "medium"), load_prompt("judge", "fidelity")
    good = doc(1, " ".join([PT_TEXT] * 3))
    bad = doc(2, " ".join([PT_TEXT, PT_TEXT, "FALSO: " + PT_TEXT]))
    engine = engine_with(tmp_path, DeterministicTestBackend(reply=chunked_judge_reply))
    result = rewrite_documents(engine, prompt, [good, bad], prompt_count=counter.count, gate=gate(counter), scope="s", judge=judge)
    rows, rejects = result.frames()
    chunks = chunk_document(good.text, 300, counter.count, "sentences", "pt")
    bad_chunks = chunk_document(bad.text, 300, counter.count, "sentences", "pt")
    assert len(chunks) == 2 and len(bad_chunks) == 2 and "FALSO" in bad_chunks[1].text
    assert rows["doc_id"].to_list() == ["d001"]
    judge_ids = rows["judge_request_ids"][0].to_list()
    by_id = {r["request_id"]: r for r in engine.cache.load().to_dicts()}
    rewrites = [by_id[rid]["text"] for rid in rows["request_ids"][0]]
    assert len(judge_ids) == len(rewrites) == 2, "one verdict per chunk"
    for k, rid in enumerate(judge_ids):  # the judge saw chunk k of the source and chunk k of the rewrite, nothing else
        assert json.loads(by_id[rid]["messages"]) == [
            {"role": m[0], "content": m[1]} for m in judge.request("pt", source=chunks[k].text, rewrite=rewrites[k]).messages
        ]
    assert rows["text"][0] == join_outputs(chunks, rewrites)
    assert rejects.select("doc_id", "reason_code", "chunk_index").rows() == [("d002", fid.JUDGE, 1)]
    assert len(rejects["request_ids"][0]) == 4  # two rewrites, two verdicts


def test_a_style_file_can_turn_the_judge_on(tmp_path, counter):
    """faithful.yaml says `judge: true`: its rewrites are judged though no judge is passed (synthesis.judge off)."""
    from synth_cpt.synthesis.steps import PartitionInputs, rewrite_step

    assert load_prompt("rewrite", "faithful").spec.judge
    assert not any(p.spec.judge for name, p in load_kind("rewrite").items() if name != "faithful")
    engine = engine_with(tmp_path, DeterministicTestBackend(reply=chunked_judge_reply))
    inputs = PartitionInputs("pt", "high", [doc(1, PT_TEXT)], ["d001"], counter.count, counter.count, gate(counter), 0)
    step = rewrite_step(engine, inputs, load_prompt("rewrite", "faithful"), None, "rewrites_faithful", 0.0)
    rows = step.tables["rows.parquet"]
    assert rows.height == 1 and len(rows["judge_request_ids"][0]) == 1
    assert step.outcomes["rows_valid"].success and step.outcomes["rows_valid"].details["lineage.generations_resolve"]["referenced"] == 2
    assert set(step.metadata["prompt_sha"]) == {"rewrite/faithful", "judge/fidelity"}


# -- Nemotron-CC segments -------------------------------------------------------------------------------


def test_the_nemotron_styles_drop_a_failed_segment():
    styles = load_kind("rewrite")
    assert {n for n, p in styles.items() if p.spec.chunking.on_failed_chunk == "drop_chunk"} == set(NEMOTRON)


def test_autoregressive_styles_cannot_drop_chunks(tmp_path):
    path = write_prompt(tmp_path, "rewrite", "p", chunking={"autoregressive": True, "context_tokens": 10, "on_failed_chunk": "drop_chunk"})
    with pytest.raises(PromptError, match="autoregressive chunking cannot drop chunks") as err:
        load_prompt("rewrite", "p", root=tmp_path)
    assert str(path) in str(err.value)


def test_a_dropped_segment_leaves_the_rest_of_the_document(tmp_path, counter):
    prompt = load_prompt("rewrite", "knowledge_list")
    lines = [f"Linha {i}: {PT_TEXT}" for i in range(12)]
    kept_doc = doc(1, "\n".join(lines))
    refused = doc(2, "\n".join(f"RECUSE {line}" for line in lines))
    chunks = chunk_document(kept_doc.text, prompt.spec.chunking.max_input_tokens, counter.count, "lines", "pt")
    assert len(chunks) == 3

    def reply(p):
        chunk = _chunk_of(p)
        if "RECUSE" in chunk or chunk.strip() == chunks[1].text.strip():
            return "Desculpe, não posso reescrever este texto."
        return "\n".join(f"- {' '.join(reversed(line.split()))}" for line in chunk.strip().split("\n"))

    requests = [prompt.request("pt", text=c.text, context="", title="") for c in chunks]
    engine = engine_with(tmp_path, DeterministicTestBackend(reply=reply))
    result = rewrite_documents(engine, prompt, [kept_doc, refused], prompt_count=counter.count, gate=gate(counter), scope="s")
    rows, rejects = result.frames()
    row = rows.row(0, named=True)
    assert rows.height == 1 and (row["doc_id"], row["chunks"], row["chunks_kept"]) == ("d001", 3, 2)
    ids = engine.request_ids(requests)
    assert row["request_ids"] == [ids[0], ids[2]] and row["chunk_starts"] == [chunks[0].start, chunks[2].start]
    outputs = [reply(type("P", (), {"request": r})) for r in (requests[0], requests[2])]
    assert row["text"] == join_outputs([chunks[0], chunks[2]], outputs)
    assert row["source_tokens"] == counter.count([chunks[0].text + chunks[2].text])[0]
    assert row["n_tokens"] == counter.count([row["text"]])[0]
    got = rejects.select("doc_id", "reason_code", "chunk_index", "chunk_dropped").rows()
    assert got == [
        ("d001", fid.REFUSAL, 1, True),
        ("d002", fid.NO_CHUNK_KEPT, None, False),
        ("d002", fid.REFUSAL, 0, True), ("d002", fid.REFUSAL, 1, True), ("d002", fid.REFUSAL, 2, True),
    ]  # fmt: skip
    assert rejects.filter(pl.col("chunk_dropped"))["request_ids"].list.len().to_list() == [1, 1, 1, 1]
    rates = result.pass_rates()
    assert (rates["candidates"], rates["pass_rate"]) == (2, 0.5)
    assert rates["rejected_by_reason"] == {fid.NO_CHUNK_KEPT: 1}
    assert rates["dropped_chunks_by_reason"] == {fid.REFUSAL: 4}


def test_a_request_that_failed_rejects_the_document_even_when_segments_may_be_dropped(tmp_path, counter):
    """A failed request is retried by the next run: dropping its segment would publish a shortened row now
    and a different one then. So it rejects the document, and the rerun publishes it whole."""
    prompt = load_prompt("rewrite", "knowledge_list")
    kept_doc = doc(1, "\n".join(f"Linha {i}: {PT_TEXT}" for i in range(12)))
    chunks = chunk_document(kept_doc.text, prompt.spec.chunking.max_input_tokens, counter.count, "lines", "pt")
    assert len(chunks) == 3

    def reply(p):
        return "\n".join(f"- {' '.join(reversed(line.split()))}" for line in _chunk_of(p).strip().split("\n"))

    failing = prompt.request("pt", text=chunks[1].text, context="", title="").request_id("fp-double")
    engine = engine_with(tmp_path, DeterministicTestBackend(reply=reply, fail_ids={failing}))
    rows, rejects = rewrite_documents(engine, prompt, [kept_doc], prompt_count=counter.count, gate=gate(counter), scope="s").frames()
    assert rows.height == 0 and rejects.select("doc_id", "reason_code", "chunk_index", "chunk_dropped").rows() == [
        ("d001", fid.FAILED, 1, False)
    ]
    engine.backend.fail_ids = set()
    rows, rejects = rewrite_documents(engine, prompt, [kept_doc], prompt_count=counter.count, gate=gate(counter), scope="s").frames()
    assert (rows.height, rejects.height) == (1, 0) and (rows["chunks"][0], rows["chunks_kept"][0]) == (3, 3)


def test_a_failed_segment_still_rejects_the_document_by_default(tmp_path, counter):
    prompt = load_prompt("rewrite", "medium")
    assert prompt.spec.chunking.on_failed_chunk == "reject_document"
    long_doc = doc(1, " ".join([PT_TEXT] * 3))
    first = chunk_document(long_doc.text, 300, counter.count, "sentences", "pt")[0]
    engine = engine_with(tmp_path, DeterministicTestBackend())
    engine.backend.fail_ids = {prompt.request("pt", text=first.text, context="", title="").request_id("fp-double")}
    rows, rejects = rewrite_documents(engine, prompt, [long_doc], prompt_count=counter.count, gate=gate(counter), scope="s").frames()
    assert rows.height == 0 and rejects.select("reason_code", "chunk_index", "chunk_dropped").rows() == [(fid.FAILED, 0, False)]
