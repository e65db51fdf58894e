"""Synthesis machinery with the deterministic test double: prompts, chunking, fidelity, EntiGraph, routing."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from synth_cpt.core.config import SynthesisConfig
from synth_cpt.core.storage import LocalStorage
from synth_cpt.corpus.tokenizer import TokenCounter, train_model
from synth_cpt.generation.cache import GenerationCache
from synth_cpt.generation.engine import GenerationEngine
from synth_cpt.synthesis import fidelity as fid
from synth_cpt.synthesis.chunking import chunk_document, join_outputs, tail_within
from synth_cpt.synthesis.entigraph import Budget
from synth_cpt.synthesis.prompts import OutputSpec, PromptError, load_kind, load_prompt, prompts_dir
from synth_cpt.synthesis.rewrite import rewrite_documents
from synth_cpt.synthesis.routing import check_routing, why_not_routed
from synth_cpt.synthesis.rows import SourceDocument
from synth_cpt.text.sentences import sentence_spans
from synth_cpt_tests.conftest import EN_TEXT, PT_TEXT
from synth_cpt_tests.doubles import DeterministicTestBackend, SteppingTestBackend

PT_ABBREVIATIONS = (
    "O Sr. Silva chegou às 10h. A Dra. Ana, p.ex., não veio. Custou R$ 3,50 (aprox.) e a U.S.P. fechou! "
    "Veja a pág. 3 do relatório. Fim da história."
)


@pytest.fixture(scope="module")
def counter() -> TokenCounter:
    texts = [PT_TEXT, EN_TEXT, PT_ABBREVIATIONS] * 20
    return TokenCounter(train_model(texts, vocab_size=600, seed=1, character_coverage=1.0))


def never_identified(texts):
    return ["", *[""] * (len(texts) - 1)], [0.0] * len(texts)


def gate(counter, identify=never_identified) -> fid.GateContext:
    return fid.GateContext(count=counter.count, identify=identify, min_language_confidence=0.5)


def engine_with(tmp_path: Path, backend: DeterministicTestBackend) -> GenerationEngine:
    return GenerationEngine(backend, GenerationCache(LocalStorage(tmp_path / "cache")), model="double", model_fingerprint="fp-double")


def doc(i: int, text: str, language: str = "pt") -> SourceDocument:
    return SourceDocument(f"d{i:03d}", text, language, "drop-a", "a.jsonl", i, None)


def write_prompt(root: Path, kind: str, stem: str, **fields) -> Path:
    data = {"name": stem, "kind": kind, "description": "a test prompt", "user": "Reescreva: {{ text }}", **fields}
    path = root / kind / f"{stem}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, allow_unicode=True))
    return path


# -- the prompt library ------------------------------------------------------------------------------


def test_shipped_library_loads_and_renders_in_both_languages():
    rewrite = load_kind("rewrite")
    assert {"easy", "medium", "hard", "qa", "diverse_qa", "distill", "extract_knowledge", "knowledge_list", "faithful", "guided"} <= set(
        rewrite
    )
    for kind in ("rewrite", "entigraph", "judge"):
        for prompt in load_kind(kind).values():
            for language in ("pt", "en"):
                messages = prompt.messages(language, text="Um texto.", context="", entities=["A", "B"], summary="", title="",
                                           source="Um texto.", rewrite="Outro texto.")  # fmt: skip
                assert messages[-1]["content"], (prompt.path, language)
            assert prompt.sha == __import__("hashlib").sha256(Path(prompt.path).read_bytes()).hexdigest()
    assert rewrite["faithful"].spec.chunking.autoregressive
    assert load_prompt("entigraph", "entities").spec.json_schema is not None


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"name": "other"}, "name: 'other' must equal the file name"),
        ({"user": "{{ txt }}"}, r"user: unknown variables \['txt'\]"),
        ({"user": {"pt": "{% if %}"}}, "user.pt: Jinja2 syntax error"),
        ({"sampling": {"max_tokens": 5}}, "sampling: .*output.max_tokens"),
        ({"sampling": {"temperature": "hot"}}, "sampling: .*'temperature' must be a number"),
        ({"output": {"length_ratio": [2, 1]}}, "output.length_ratio"),
        ({"output": {"shape": "poem"}}, "output.shape"),
        ({"chunking": {"autoregressive": True}}, "chunking: .*context_tokens"),
        ({"schema": {"type": "object", "properties": {"a": {"type": "string"}}}}, "schema: .*maxLength"),
        ({"surprise": 1}, "surprise: Extra inputs"),
        ({"sampling": {"temprature": 0.5}}, r"sampling: .*unknown fields \['temprature'\]"),
        ({"sampling": {"top_p": 7}}, "sampling: .*'top_p' must be in"),
        ({"sampling": {"temperature": -1}}, "sampling: .*'temperature' must be in"),
        ({"output": {"preambles": ["(unclosed"]}}, "output.preambles: .*not a regular expression"),
        ({"output": {"min_tokens": 50, "max_total_tokens": 10}}, "output: .*min_tokens .* above max_total_tokens"),
        ({"chunking": {"context_tokens": 100}}, "chunking: .*only used with autoregressive"),
        ({"description": None}, "description"),
    ],
)
def test_bad_prompt_file_names_the_file_and_the_field(tmp_path, fields, message):
    path = write_prompt(tmp_path, "rewrite", "p", **fields)
    with pytest.raises(PromptError, match=message) as err:
        load_prompt("rewrite", "p", root=tmp_path)
    assert str(path) in str(err.value)


def test_library_is_checked_against_the_config_at_load(tmp_path):
    """A style routed to a bucket the config lacks, or without a template for a configured language,
    fails when the Definitions load, not on the first document of a run."""
    from synth_cpt.core.config import PipelineConfig
    from synth_cpt.synthesis.routing import check_library

    config = PipelineConfig.model_validate({"languages": ["pt", "es"]})
    write_prompt(tmp_path, "rewrite", "typo", buckets=["hihg"])
    with pytest.raises(PromptError, match=r"typo.yaml: buckets: \['hihg'\] are not quality buckets"):
        check_library(config, [load_prompt("rewrite", "typo", root=tmp_path)])
    write_prompt(tmp_path, "rewrite", "ptonly", user={"pt": "Texto: {{ text }}"})
    with pytest.raises(PromptError, match=r"ptonly.yaml: system/user: no template for configured languages \['es'\]"):
        check_library(config, [load_prompt("rewrite", "ptonly", root=tmp_path)])
    write_prompt(tmp_path, "rewrite", "fallback", user={"pt": "Texto: {{ text }}", "default": "Text: {{ text }}"})
    check_library(config, [load_prompt("rewrite", "fallback", root=tmp_path)])
    check_library(PipelineConfig(), [*load_kind("rewrite").values(), *load_kind("entigraph").values(), *load_kind("judge").values()])


def test_missing_language_template_is_a_clear_error(tmp_path):
    write_prompt(tmp_path, "rewrite", "p", user={"pt": "Texto: {{ text }}"})
    prompt = load_prompt("rewrite", "p", root=tmp_path)
    assert "Texto: x" in prompt.messages("pt", text="x")[-1]["content"]
    with pytest.raises(PromptError, match="no template for language 'en'"):
        prompt.messages("en", text="x")


def test_prompts_dir_is_the_repository_folder():
    assert (prompts_dir() / "rewrite" / "medium.yaml").is_file()


# -- chunking ----------------------------------------------------------------------------------------


def test_sentences_keep_portuguese_abbreviations_together():
    spans = sentence_spans(PT_ABBREVIATIONS, "pt")
    sentences = [PT_ABBREVIATIONS[a:b].strip() for a, b in spans]
    assert sentences == [
        "O Sr. Silva chegou às 10h.",
        "A Dra. Ana, p.ex., não veio.",
        "Custou R$ 3,50 (aprox.) e a U.S.P. fechou!",
        "Veja a pág. 3 do relatório.",
        "Fim da história.",
    ]


def test_sentences_open_with_accented_capitals():
    """blingfire alone does not cut before "Às", "É", "Última": Portuguese sentences open so often."""
    text = "Ele chegou às três. Às quatro saiu. É verdade. Última frase, Sr. Ávila. Ótimo!"
    sentences = [text[a:b].strip() for a, b in sentence_spans(text, "pt")]
    assert sentences == ["Ele chegou às três.", "Às quatro saiu.", "É verdade.", "Última frase, Sr. Ávila.", "Ótimo!"]


_LONG_WORDS = ["https://exemplo.com.br/" + "caminho/" * 40 + "fim.html", "x" * 300]
_WORDS = st.sampled_from(
    ["casa", "Sr.", "Dra.", "pág.", "10h.", "3,50", "São", "Paulo.", "fim!", "ok?", "\n", "\n\n", "é", "  ", "Às", "É", *_LONG_WORDS]
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(words=st.lists(_WORDS, min_size=0, max_size=300), limit=st.integers(16, 80), split=st.sampled_from(["sentences", "lines"]))
def test_chunks_concatenate_to_the_text_and_fit_the_limit(counter, words, limit, split):
    text = " ".join(words)
    chunks = chunk_document(text, limit, counter.count, split, "pt")
    assert "".join(c.text for c in chunks) == text
    assert all(c.n_tokens <= limit for c in chunks)
    assert all(c.n_tokens == counter.count([c.text])[0] for c in chunks)
    assert [c.start for c in chunks] == sorted({c.start for c in chunks})
    if text:
        assert chunks[0].start == 0 and chunks[-1].end == len(text)


def test_chunks_cut_on_sentence_boundaries(counter):
    text = " ".join([PT_TEXT, PT_ABBREVIATIONS, PT_TEXT])
    spans = sentence_spans(text, "pt")
    limit = max(counter.count([text[a:b] for a, b in spans])) + 2  # every sentence fits: cuts fall between them
    chunks = chunk_document(text, limit, counter.count, "sentences", "pt")
    starts = {a for a, _ in spans}
    assert len(chunks) > 2 and all(c.start in starts for c in chunks)


def test_outputs_rejoin_in_order_with_the_sources_breaks(counter):
    text = "Primeira parte aqui.\n\nSegunda parte aqui.\nTerceira parte."
    chunks = chunk_document(text, 16, counter.count, "lines", "pt")
    assert [c.text for c in chunks] == ["Primeira parte aqui.\n\n", "Segunda parte aqui.\n", "Terceira parte."]
    assert join_outputs(chunks, ["<0>", " <1> ", "<2>\n"]) == "<0>\n\n<1>\n<2>"


def test_context_tail_respects_its_budget(counter):
    texts = [f"Parte {i} com algumas palavras a mais." for i in range(10)]
    for budget in range(1, 80):
        tail = tail_within(texts, budget, counter.count)
        assert counter.count([tail])[0] <= budget
        if counter.count([texts[-1]])[0] <= budget:
            assert tail.endswith(texts[-1])
    assert tail_within(texts, 0, counter.count) == ""


def test_context_tail_counts_the_blank_lines_between_texts():
    """Counts are not additive across a join: three texts of 3 tokens each fit a budget of 10 one by one
    (9), but joined with two newlines they are 13 tokens; the tail keeps the two newest (8)."""

    def words_and_newlines(texts):
        return [len(t.split()) + t.count("\n") for t in texts]

    texts = ["um dois tres", "quatro cinco seis", "sete oito nove"]
    tail = tail_within(texts, 10, words_and_newlines)
    assert tail == "quatro cinco seis\n\nsete oito nove" and words_and_newlines([tail]) == [8]


# -- fidelity rules ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "kept"),
    [
        ("Here is a paraphrase:\nThe cat sat.", "The cat sat."),
        ("Aqui está o texto reescrito:\n\nO gato sentou.", "O gato sentou."),
        ("Claro! Aqui está a versão reescrita: O gato sentou.", "O gato sentou."),
        ("Segue o texto:\nO gato sentou.", "O gato sentou."),
        ("O gato sentou: depois dormiu.", "O gato sentou: depois dormiu."),
        ("Sure, here's the rewritten version of the text:\nThe cat sat.", "The cat sat."),
        ("Texto reescrito: O gato sentou.", "O gato sentou."),
        ("**Rewritten text:** The cat sat.", "The cat sat."),
        # text that only opens with a lead-in word is never cut (it would be silently shortened)
        ("Certo dia, o rei partiu para o norte.\nDepois voltou.", "Certo dia, o rei partiu para o norte.\nDepois voltou."),
        ("Segue-se a fase dois: a colheita.", "Segue-se a fase dois: a colheita."),
        ("Claro está que o rio transbordou.\n\nA cidade sofreu.", "Claro está que o rio transbordou.\n\nA cidade sofreu."),
        ("Sure enough, the river rose: the town flooded.", "Sure enough, the river rose: the town flooded."),
        ("Eis que surge o herói: um menino.", "Eis que surge o herói: um menino."),
    ],
)
def test_preambles_are_stripped_in_both_languages(raw, kept):
    assert fid.strip_preamble(raw) == kept


@pytest.mark.parametrize(
    ("text", "finish", "code"),
    [
        ("Desculpe, não posso reescrever este texto.", "stop", fid.REFUSAL),
        ("I'm sorry, but I can't help with that.", "stop", fid.REFUSAL),
        ("O gato sentou e dormiu no tapete.", "length", fid.TRUNCATED),
        ("   ", "stop", fid.EMPTY),
        ("O texto. Aqui está o texto reescrito: nada.", "stop", fid.PREAMBLE),
        ("O gato sentou e dormiu no tapete.", "stop", None),
        ("Infelizmente, não posso ajudar com isso.", "stop", fid.REFUSAL),
        ("Não consigo reescrever este texto.", "stop", fid.REFUSAL),
        ("I cannot rewrite this passage.", "stop", fid.REFUSAL),
        ("Não consigo imaginar um dia mais bonito do que este.", "stop", None),
        ("I can't believe how fast the river rose that year.", "stop", None),
    ],
)
def test_piece_rules(text, finish, code):
    assert fid.clean_piece(text, finish, OutputSpec()).reason_code == code


def test_truncated_output_kept_when_the_style_allows_it():
    assert fid.clean_piece("Uma lista de fatos", "length", OutputSpec(allow_truncated=True)).ok


def test_reasoning_is_dropped_after_the_marker():
    out = OutputSpec(answer_after=("Rewrite:", "Reescrita:"))
    piece = fid.clean_piece("Raciocínio: o texto é um anúncio.\nReescrita: O produto custa 10 reais.", "stop", out)
    assert piece.ok and piece.text == "O produto custa 10 reais."
    assert fid.clean_piece("Só raciocínio.", "stop", out).reason_code == fid.NO_ANSWER


SOURCE = "Em 1500, Pedro Álvares Cabral chegou ao Brasil com 13 navios. A frota partiu de Lisboa em março."


@pytest.mark.parametrize(
    ("output", "spec", "identify", "code"),
    [
        ("Cabral chegou em 1500 ao Brasil, com 13 navios vindos de Lisboa, em março daquele ano.", {}, None, None),
        ("Cabral chegou ao Brasil.", {"min_number_coverage": 0.5, "length_ratio": None}, None, fid.NUMBERS),
        ("Em 1500 e 13 navios chegaram; a frota partiu em março, muito longe daqui.", {"min_entity_coverage": 0.5}, None, fid.ENTITIES),
        (SOURCE, {}, None, fid.COPY),
        ("Sim.", {"min_tokens": 8}, None, fid.TOO_SHORT),
        ("Em 1500 " * 80, {"length_ratio": (0.3, 3.0)}, None, fid.LENGTH_RATIO),
        ("Cabral chegou em 1500 ao Brasil com 13 navios de Lisboa.", {"shape": "qa"}, None, fid.SHAPE),
        ("Pergunta: Quando Cabral chegou?\nResposta: Em 1500, com 13 navios.", {"shape": "qa", "length_ratio": None}, None, None),
        ("- Cabral chegou em 1500\n- Eram 13 navios\n- Partiram de Lisboa", {"shape": "list", "length_ratio": None}, None, None),
        ("Cabral arrived in Brazil in 1500 with 13 ships from Lisbon in March.", {}, ("en", 0.98), fid.WRONG_LANGUAGE),
        ("Cabral chegou em 1500 ao Brasil, com 13 navios de Lisboa, em março.", {}, ("en", 0.2), None),
    ],
)
def test_document_rules_portuguese(counter, output, spec, identify, code):
    ident = (lambda texts: ([identify[0]] * len(texts), [identify[1]] * len(texts))) if identify else never_identified
    verdict = fid.check_document(SOURCE, output, "pt", OutputSpec(**spec), gate(counter, ident))
    assert verdict.reason_code == code, verdict.reason
    assert verdict.figures["source_tokens"] == counter.count([SOURCE])[0]
    assert verdict.figures["n_tokens"] == counter.count([output])[0]


def test_coverage_matches_whole_numbers_and_words():
    assert fid.coverage(fid.numbers("Foram 5 ou 15.", "pt"), fid.numbers("Custou 1500 reais.", "pt")) == 0.0
    assert fid.coverage(fid.numbers("Foram 1500 navios.", "pt"), fid.numbers("Em 1.500 navios.", "pt")) == 1.0
    assert fid.coverage(fid.numbers("Mede 3,5 metros.", "pt"), fid.numbers("Mede 35 metros.", "pt")) == 0.0
    assert fid.coverage(fid.numbers("Mede 3,5 metros.", "pt"), fid.numbers("São 3,50 metros.", "pt")) == 1.0
    assert fid.coverage(fid.numbers("It is 1.5 m.", "en"), fid.numbers("It is 15 m.", "en")) == 0.0
    assert fid.coverage({"ana"}, "Comeu uma banana.") == 0.0
    assert fid.coverage({"ana", "sao paulo"}, "A Ana foi a São Paulo.") == 1.0


def test_too_long_is_its_own_reason(counter):
    verdict = fid.check_document(
        SOURCE, SOURCE.replace("navios", "barcos"), "pt", OutputSpec(min_tokens=0, max_total_tokens=5), gate(counter)
    )
    assert verdict.reason_code == fid.TOO_LONG, verdict.reason


@pytest.mark.parametrize(
    ("text", "language", "values"),
    [
        ("Custou 1.500 reais em 2024, ou 3,5%.", "pt", {"1500", "2024", "3.5"}),
        ("Mede 3,5 m; custa 1.234,5 reais; pesa 1.234 kg.", "pt", {"3.5", "1234.5", "1234"}),
        ("Custou R$ 3,50.", "pt", {"3.5"}),
        ("Em 1500, 13 navios.", "pt", {"1500", "13"}),
        ("Versão 1.5 e 1.2345.", "pt", {"1", "5", "2345"}),  # a dot that is no thousands group ends the number
        ("It is 3.5 m and costs 1,234.5 dollars, 1,234 in all.", "en", {"3.5", "1234.5", "1234"}),
        ("A 3,5 split.", "en", {"3", "5"}),
    ],
)
def test_numbers_are_read_by_the_language_of_the_text(text, language, values):
    from decimal import Decimal

    assert fid.numbers(text, language) == {Decimal(v) for v in values}


def test_number_coverage_reads_the_documents_language(counter):
    """A Portuguese source with "3,5" is covered by a rewrite that says "3,5" (not by one that says "35")."""
    source = "O tubo mede 3,5 metros e custa 1.234 reais na loja do centro da cidade."
    spec = OutputSpec(min_number_coverage=1.0, length_ratio=None, max_copy_similarity=None, min_tokens=0)
    kept = fid.check_document(source, "Na loja do centro, o tubo de 3,5 metros sai por 1234 reais.", "pt", spec, gate(counter))
    assert kept.ok and kept.figures["number_coverage"] == 1.0
    lost = fid.check_document(source, "Na loja do centro, o tubo de 35 metros sai por 1234 reais.", "pt", spec, gate(counter))
    assert lost.reason_code == fid.NUMBERS and lost.figures["number_coverage"] == 0.5


def test_entity_extraction():
    names = fid.named_entities("Ontem o Pedro foi a São Paulo. Depois voltou ao Rio de Janeiro com a Ana.")
    assert names == {"pedro", "sao paulo", "rio de janeiro", "ana"}


# -- rewriting with the test double --------------------------------------------------------------------


def reversed_chunk(p) -> str:
    """The test double's rewrite: the words of the chunk (after "Texto:") in reverse order, so its length
    is the source's and no 4-gram is copied; a chunk that asks for it ("RECUSE") gets a refusal."""
    chunk = p.request.messages[-1][1].split("Texto:", 1)[1]
    return "Desculpe, não posso reescrever este texto." if "RECUSE" in chunk else " ".join(reversed(chunk.split()))


def test_rewrite_rows_carry_lineage_and_rerun_sends_nothing(tmp_path, counter):
    prompt = load_prompt("rewrite", "medium")
    docs = [doc(1, PT_TEXT), doc(2, " ".join([PT_TEXT] * 3)), doc(3, "RECUSE. " + PT_TEXT)]
    backend = DeterministicTestBackend(reply=reversed_chunk)
    engine = engine_with(tmp_path, backend)
    result = rewrite_documents(engine, prompt, docs, prompt_count=counter.count, gate=gate(counter), scope="rewrites_medium/pt/high")
    rows, rejects = result.frames()
    assert sorted(rows["doc_id"].to_list()) == ["d001", "d002"]
    assert rejects.select("doc_id", "reason_code").rows() == [("d003", fid.REFUSAL)]
    n_chunks = {d.doc_id: len(chunk_document(d.text, 300, counter.count, "sentences", "pt")) for d in docs}
    assert n_chunks["d002"] == 2  # chunked
    for row in rows.to_dicts():
        assert len(row["request_ids"]) == len(row["chunk_starts"]) == row["chunks"] == row["chunks_kept"] == n_chunks[row["doc_id"]]
        assert row["n_tokens"] == counter.count([row["text"]])[0]
        assert row["judge_request_ids"] is None
    all_ids = [rid for ids in rows["request_ids"].to_list() for rid in ids]
    cached = engine.cache.finished(all_ids)
    assert sorted(cached["request_id"].to_list()) == sorted(all_ids) and len(all_ids) == 3
    assert rows["prompt_sha"].to_list() == [prompt.sha] * 2 and rows["model_fingerprint"].to_list() == ["fp-double"] * 2
    sent = len(backend.sent)
    again = rewrite_documents(engine, prompt, docs, prompt_count=counter.count, gate=gate(counter), scope="rewrites_medium/pt/high")
    assert len(backend.sent) == sent and again.batch.metadata()["sent"] == 0
    assert again.frames()[0].equals(rows)


def test_a_failed_chunk_rejects_the_whole_document(tmp_path, counter):
    prompt = load_prompt("rewrite", "medium")
    long_doc = doc(1, " ".join([PT_TEXT] * 3))
    engine = engine_with(tmp_path, DeterministicTestBackend())
    requests = [
        prompt.request("pt", text=c.text, context="", title="")
        for c in chunk_document(long_doc.text, prompt.spec.chunking.max_input_tokens, counter.count, "sentences", "pt")
    ]
    engine.backend.fail_ids = {requests[1].request_id("fp-double")}
    result = rewrite_documents(engine, prompt, [long_doc], prompt_count=counter.count, gate=gate(counter), scope="s")
    rows, rejects = result.frames()
    assert rows.height == 0 and rejects["reason_code"].to_list() == [fid.FAILED] and rejects["chunk_index"].to_list() == [1]


def chain_prompt(tmp_path: Path):
    """An autoregressive style whose user message shows the carried context (ANTES) and the chunk (AGORA)."""
    write_prompt(
        tmp_path / "p", "rewrite", "chain", user="{% if context %}ANTES: {{ context }}\n{% endif %}AGORA: {{ text }}",
        chunking={"max_input_tokens": 40, "autoregressive": True, "context_tokens": 200},
        output={"length_ratio": None, "max_copy_similarity": None, "min_tokens": 0},
    )  # fmt: skip
    return load_prompt("rewrite", "chain", root=tmp_path / "p")


def test_autoregressive_chains_carry_context_and_advance_together(tmp_path, counter):
    prompt = chain_prompt(tmp_path)

    def reply(p):
        user = p.request.messages[-1][1]
        return "R[" + user.split("AGORA: ", 1)[1][:12] + "]"

    backend = SteppingTestBackend(max_in_flight=2, reply=reply)
    engine = engine_with(tmp_path, backend)
    docs = [doc(i, " ".join(f"Documento {i}, parte {k}. {PT_TEXT}" for k in range(n))) for i, n in ((1, 2), (2, 1), (3, 3))]
    chunks = {d.doc_id: chunk_document(d.text, 40, counter.count, "sentences", "pt") for d in docs}
    result = rewrite_documents(engine, prompt, docs, prompt_count=counter.count, gate=gate(counter), scope="s")
    rows, _ = result.frames()
    assert rows.height == 3 and len(backend.batches) == 1, "every chain in one engine run"
    # chunk k is sent only after chunk k-1 is back, and with no barrier between positions: at every step
    # the engine holds as many requests as it can while chains have chunks left
    position = {rid: (r["doc_id"], k) for r in rows.to_dicts() for k, rid in enumerate(r["request_ids"])}
    when = {(kind, position[rid]): i for i, (kind, rid) in enumerate(backend.events)}
    assert all(when[("add", (d, k))] > when[("done", (d, k - 1))] for d, k in position.values() if k > 0)
    last_done = {d: when[("done", (d, len(c) - 1))] for d, c in chunks.items()}
    steps = [i for i, (kind, _) in enumerate(backend.events) if kind == "done"]
    assert backend.in_flight == [min(2, sum(t >= i for t in last_done.values())) for i in steps]
    by_id = {r["request_id"]: r for r in engine.cache.load().to_dicts()}
    for row in rows.to_dicts():
        ids = row["request_ids"]
        assert len(ids) == len(chunks[row["doc_id"]])
        for k, rid in enumerate(ids):
            user = json.loads(by_id[rid]["messages"])[-1]["content"]
            assert ("ANTES:" in user) == (k > 0)
            if k > 0:  # carries the previous chunk's rewritten text
                assert by_id[ids[k - 1]]["text"].strip() in user
        assert row["text"].count("R[") == len(ids)


def test_preview_renders_exactly_what_is_sent(tmp_path, counter):
    """`prompts render` builds requests with the steps' own functions: before generation an
    autoregressive chunk after the first is unknown; after it, every previewed request is one the
    engine received, in order."""
    from synth_cpt.synthesis.preview import preview

    prompt = chain_prompt(tmp_path)
    backend = DeterministicTestBackend(reply=lambda p: "R[" + p.request.messages[-1][1][-12:] + "]")
    engine = engine_with(tmp_path, backend)
    document = doc(1, " ".join(f"Documento 1, parte {k}. {PT_TEXT}" for k in range(3)))
    kwargs = dict(storage=engine.cache.storage, prompt_count=counter.count, seed=7, budget=Budget(4), relation_prompts={}, engine=engine)
    before = preview(prompt, document, "high", **kwargs)
    assert (
        len(before) == len(chunk_document(document.text, 40, counter.count, "sentences", "pt")) >= 3
        and before[0].request is not None
        and all(i.request is None and i.note for i in before[1:])
    )
    rewrite_documents(engine, prompt, [document], prompt_count=counter.count, gate=gate(counter), scope="rewrites_chain/pt/high", seed=7)
    after = preview(prompt, document, "high", **kwargs)
    assert [engine.request_ids([i.request])[0] for i in after] == backend.sent
    assert "ANTES: R[" in after[1].request.messages[-1][1]


def test_an_interrupted_chain_resumes_from_the_cache(tmp_path, counter):
    """A chain whose chunk failed is rejected whole; the next run follows its cached chunks without
    sending them and sends only from the failed chunk on."""
    prompt = chain_prompt(tmp_path)
    reply = lambda p: "R[" + p.request.messages[-1][1].split("AGORA: ", 1)[1][:12] + "]"  # noqa: E731
    document = doc(1, " ".join(f"Documento 1, parte {k}. {PT_TEXT}" for k in range(2)))
    n = len(chunk_document(document.text, 40, counter.count, "sentences", "pt"))
    probe = DeterministicTestBackend(reply=reply)
    rewrite_documents(engine_with(tmp_path / "probe", probe), prompt, [document], prompt_count=counter.count, gate=gate(counter), scope="s")
    third = probe.sent[2]  # the id of chunk 2, which depends on chunks 0 and 1
    failing = DeterministicTestBackend(reply=reply, fail_ids={third})
    first = rewrite_documents(engine_with(tmp_path, failing), prompt, [document], prompt_count=counter.count, gate=gate(counter), scope="s")
    assert first.frames()[0].height == 0 and first.rejects[0]["reason_code"] == fid.FAILED and len(failing.sent) == 3
    again = DeterministicTestBackend(reply=reply)
    second = rewrite_documents(engine_with(tmp_path, again), prompt, [document], prompt_count=counter.count, gate=gate(counter), scope="s")
    assert second.frames()[0].height == 1 and again.sent == probe.sent[2:] and len(probe.sent) == n
    assert second.batch.metadata()["cache_hits"] == 2


# -- routing -----------------------------------------------------------------------------------------


def test_routing_default_profile_and_custom():
    styles = load_kind("rewrite")
    study = SynthesisConfig()
    assert [s for s in styles if why_not_routed(study, styles[s], "high") is None] == ["easy", "hard", "medium", "qa"]
    assert [s for s in styles if why_not_routed(study, styles[s], "low") is None] == ["easy", "hard", "medium", "qa"]
    nemotron = SynthesisConfig(profile="nemotron")
    assert [s for s in styles if why_not_routed(nemotron, styles[s], "low") is None] == ["medium"]
    assert sorted(s for s in styles if why_not_routed(nemotron, styles[s], "high") is None) == [
        "distill", "diverse_qa", "extract_knowledge", "knowledge_list",
    ]  # fmt: skip
    custom = SynthesisConfig(routing={"low": ("guided",)})
    assert "does not route" in why_not_routed(custom, styles["medium"], "low")
    assert why_not_routed(custom, styles["guided"], "low") is None
    with pytest.raises(PromptError, match="routes styles \\['nope'\\]"):
        check_routing(SynthesisConfig(routing={"low": ("nope",)}), styles)


@pytest.mark.parametrize(("verdict", "code"), [("faithful", None), ("unfaithful", fid.JUDGE), (None, fid.FAILED)])
def test_optional_judge_gates_rewrites_that_passed_the_rules(tmp_path, counter, verdict, code):
    prompt, judge = load_prompt("rewrite", "medium"), load_prompt("judge", "fidelity")

    def reply(p):
        if p.request.json_schema:  # the judge
            return json.dumps({"verdict": verdict, "reason": "ok"}) if verdict else "not json"
        return "Cabral chegou em 1500 ao Brasil, com 13 navios vindos de Lisboa, em março daquele ano."

    engine = engine_with(tmp_path, DeterministicTestBackend(reply=reply))
    result = rewrite_documents(engine, prompt, [doc(1, SOURCE)], prompt_count=counter.count, gate=gate(counter), scope="s", judge=judge)
    rows, rejects = result.frames()
    if code is None:
        assert rows.height == 1 and len(rows["judge_request_ids"][0]) == 1
        assert engine.cache.finished(rows["judge_request_ids"][0].to_list()).height == 1
    else:
        assert rows.height == 0 and rejects["reason_code"].to_list() == [code]
        assert len(rejects["request_ids"][0]) == 2  # the rewrite's generation and the judge's


def test_rows_valid_requires_every_generation_in_the_cache(tmp_path, counter):
    """The publish check follows each row's request_ids into the cache: a row naming a generation the
    cache does not hold (lost, or from another cache) fails it."""
    from synth_cpt.core.validation import Outcome
    from synth_cpt.synthesis.steps import _resolves

    engine = engine_with(tmp_path, DeterministicTestBackend(reply=lambda p: " ".join(reversed(PT_TEXT.split()))))
    result = rewrite_documents(
        engine, load_prompt("rewrite", "medium"), [doc(1, PT_TEXT)], prompt_count=counter.count, gate=gate(counter), scope="s"
    )
    rows, _ = result.frames()
    assert rows.height == 1
    good = _resolves(Outcome(True), engine, "s", rows)
    assert good.success and good.details["lineage.generations_resolve"]["referenced"] == 1
    forged = rows.with_columns(request_ids=pl.concat_list([pl.col("request_ids"), pl.lit(["f" * 64])]))
    bad = _resolves(Outcome(True), engine, "s", forged)
    assert not bad.success and "1 request_ids are not successful generations" in bad.failures[0]
