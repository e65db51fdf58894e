"""EntiGraph (METHODS §5): entity extraction, relation planning and the relation corpus, with the test double."""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from synth_cpt.synthesis.entigraph import (
    GAP,
    Budget,
    DocumentContexts,
    entity_key,
    entity_requests,
    extract_entity_graphs,
    merge_entities,
    normalize_entity,
    relation_corpus,
    relation_jobs,
    relation_plan,
)
from synth_cpt.synthesis.prompts import load_prompt, prompts_dir
from synth_cpt_tests.doubles import DeterministicTestBackend, FlakyJsonTestBackend
from synth_cpt_tests.test_synthesis_units import SOURCE, doc, engine_with, gate
from synth_cpt_tests.test_synthesis_units import counter as counter  # noqa: F401 (a fixture)

NAMES = ("entities", "pair", "triple")


def shipped(root: Path | None = None, **limits: int) -> dict:
    """The shipped EntiGraph prompts; `limits` overrides a prompt's chunking.max_input_tokens (copied under `root`)."""
    if not limits:
        return {n: load_prompt("entigraph", n) for n in NAMES}
    for name in NAMES:
        data = yaml.safe_load((prompts_dir() / "entigraph" / f"{name}.yaml").read_text(encoding="utf-8"))
        data["chunking"]["max_input_tokens"] = limits.get(name, data["chunking"]["max_input_tokens"])
        (root / "entigraph").mkdir(parents=True, exist_ok=True)
        (root / "entigraph" / f"{name}.yaml").write_text(yaml.safe_dump(data, allow_unicode=True))
    return {n: load_prompt("entigraph", n, root=root) for n in NAMES}


def relation_reply(p):
    return "Texto sobre como as entidades do documento se relacionam umas com as outras, em várias frases curtas e claras."


# -- step 1 ------------------------------------------------------------------------------------------


def test_entities_are_normalized_and_merged_without_a_cap_unless_one_is_set():
    assert normalize_entity('  "São  Paulo". ') == "São Paulo"
    assert normalize_entity("!!!") is None and normalize_entity(42) is None and normalize_entity("x" * 200) is None
    assert merge_entities([["São Paulo", "Lisboa"], ["sao paulo", "Cabral", "LISBOA"]]) == ["São Paulo", "Lisboa", "Cabral"]
    assert merge_entities([[f"e{i}" for i in range(30)], [f"f{i}" for i in range(30)]]) == [f"e{i}" for i in range(30)] + [
        f"f{i}" for i in range(30)
    ]
    assert merge_entities([["a", "b", "c"]], 2) == ["a", "b"]


def test_entities_of_every_chunk_are_kept_when_no_cap_is_set(tmp_path, counter):
    """A document of several chunks keeps every entity its chunks list (the paper: as many as possible);
    today's default cap of 24 dropped the rest."""
    prompts = shipped(tmp_path / "p", entities=40)
    document = doc(1, " ".join(f"Na parte {k}, o navio {k} chegou ao porto {k} com {k + 3} pessoas a bordo." for k in range(6)))
    asks = entity_requests(prompts["entities"], document, prompt_count=counter.count, seed=3)
    distinct = len({req.messages for _, req in asks})  # the double answers the same chunk text the same
    assert distinct * 10 > 24

    def reply(p):
        tag = hashlib.sha256(p.request.messages[-1][1].encode()).hexdigest()[:8]
        return json.dumps({"summary": "Resumo.", "entities": [f"Entidade {tag} {i}" for i in range(10)]})

    engine = engine_with(tmp_path, DeterministicTestBackend(reply=reply))
    graphs = extract_entity_graphs(engine, prompts["entities"], [document], prompt_count=counter.count, scope="eg", seed=3)
    assert graphs.entities.height == 10 * distinct and graphs.summaries["n_entities"].to_list() == [10 * distinct]
    capped = extract_entity_graphs(engine, prompts["entities"], [document], prompt_count=counter.count, scope="eg", seed=3, max_entities=5)
    assert capped.entities.height == 5


def test_unparseable_entity_json_is_asked_again_with_a_new_attempt_and_a_rerun_sends_nothing(tmp_path):
    """The first answer of every chunk is not JSON: the second attempt (a new request id) parses. Before,
    the rejected answer was a cached success, so the document was rejected on every rerun."""
    prompts = shipped()
    docs = [doc(1, SOURCE), doc(2, SOURCE + " Outra frase sobre Lisboa.")]
    count = lambda texts: [len(t.split()) for t in texts]  # noqa: E731
    first_asks = [req for d in docs for _, req in entity_requests(prompts["entities"], d, prompt_count=count, seed=3)]
    assert len(first_asks) == 2  # one chunk each

    backend = FlakyJsonTestBackend(bad_times=1)
    engine = engine_with(tmp_path, backend)
    graphs = extract_entity_graphs(engine, prompts["entities"], docs, prompt_count=count, scope="eg", seed=3, max_attempts=3)
    _, rejects = graphs.result.frames()
    assert rejects.height == 0 and graphs.summaries.height == 2
    retried = engine.request_ids([replace(r, attempt=1) for r in first_asks])
    assert backend.sent == engine.request_ids(first_asks) + retried
    assert sorted(graphs.summaries["request_ids"].to_list()) == sorted([[rid] for rid in retried]), "made from the attempt that parsed"
    assert graphs.attempts == {"d001": 2, "d002": 2} and graphs.metadata() == {"documents_retried": 2, "attempts_max": 2}
    assert graphs.result.batch.metadata()["sent"] == 4 and graphs.result.batch.metadata()["rejected"] == 2

    again_backend = DeterministicTestBackend()
    again = extract_entity_graphs(
        engine_with(tmp_path, again_backend), prompts["entities"], docs, prompt_count=count, scope="eg", seed=3, max_attempts=3
    )
    assert again_backend.sent == [] and again.summaries.equals(graphs.summaries)


def test_entity_json_that_never_parses_is_rejected_after_max_attempts_and_not_asked_again(tmp_path):
    prompts = shipped()
    document = doc(1, SOURCE)
    count = lambda texts: [len(t.split()) for t in texts]  # noqa: E731
    (ask,) = [req for _, req in entity_requests(prompts["entities"], document, prompt_count=count, seed=3)]
    engine = engine_with(tmp_path, FlakyJsonTestBackend(bad_times=99))
    graphs = extract_entity_graphs(engine, prompts["entities"], [document], prompt_count=count, scope="eg", seed=3, max_attempts=3)
    _, rejects = graphs.result.frames()
    ids = engine.request_ids([replace(ask, attempt=k) for k in range(3)])
    assert graphs.summaries.height == 0 and rejects.height == 1
    row = rejects.row(0, named=True)
    assert row["request_ids"] == ids and row["chunk_index"] == 0
    assert row["reason"] == "chunk 0: invalid JSON: Expecting value at char 0 (after 3 attempts)"
    assert graphs.metadata() == {"documents_retried": 1, "attempts_max": 3}

    rerun = FlakyJsonTestBackend(bad_times=99)
    extract_entity_graphs(
        engine_with(tmp_path, rerun), prompts["entities"], [document], prompt_count=count, scope="eg", seed=3, max_attempts=3
    )
    assert rerun.sent == [], "every attempt is cached"
    more = FlakyJsonTestBackend(bad_times=0)
    extended = extract_entity_graphs(
        engine_with(tmp_path, more), prompts["entities"], [document], prompt_count=count, scope="eg", seed=3, max_attempts=4
    )
    assert more.sent == engine.request_ids([replace(ask, attempt=3)]) and extended.summaries.height == 1


# -- steps 2 and 3: the plan ---------------------------------------------------------------------------


@pytest.mark.parametrize("n", [0, 1, 2, 3, 5, 9])
@pytest.mark.parametrize("triples", [None, 0, 4])
def test_relation_plan_is_every_pair_then_the_budgeted_triples(n, triples):
    names = [f"e{i}" for i in range(n)]
    plan = relation_plan(names, "doc", 7, triples)
    pairs, trios = [c for c in plan if len(c) == 2], [c for c in plan if len(c) == 3]
    assert plan == pairs + trios  # pairs first
    assert sorted(pairs) == list(itertools.combinations(names, 2)), "every pair, always"
    expected = math.comb(n, 3) if triples is None else min(triples, math.comb(n, 3))
    assert len(trios) == expected and len(set(trios)) == expected
    assert set(trios) <= set(itertools.combinations(names, 3))
    assert relation_plan(names, "doc", 7, triples) == plan  # same seed, same plan
    if triples is None:
        assert sorted(trios) == list(itertools.combinations(names, 3))


def test_triples_are_a_seeded_shuffle_that_depends_on_the_document_only():
    names = [f"e{i}" for i in range(9)]
    trios = lambda seed, doc_id, k: [c for c in relation_plan(names, doc_id, seed, k) if len(c) == 3]  # noqa: E731
    assert trios(7, "doc", 4) == trios(7, "doc", None)[:4], "the budget cuts the shuffled enumeration"
    assert trios(7, "doc", None) != sorted(trios(7, "doc", None)), "shuffled"
    assert trios(8, "doc", 4) != trios(7, "doc", 4) and trios(7, "other", 4) != trios(7, "doc", 4)


def test_budget_arithmetic():
    assert Budget(8).triples_limit(400) == 8
    assert Budget(0).triples_limit(400) == 0
    assert Budget(None).triples_limit(400) is None
    assert Budget(None, 2000).triples_limit(400) == 5
    assert Budget(3, 2000).triples_limit(400) == 3
    assert Budget(8).arithmetic(400) == "every pair, then triples: triples_per_document 8 per document"
    assert Budget(None, 2000).arithmetic(400) == "every pair, then triples: tokens_per_document 2,000 // max_tokens 400 = 5 per document"
    assert Budget(3, 2000).arithmetic(400) == (
        "every pair, then triples: min(triples_per_document 3, tokens_per_document 2,000 // max_tokens 400 = 5) = 3 per document"
    )
    assert Budget(None, None).arithmetic(400) == "every pair and every triple per document (no triple budget)"


def test_a_budget_of_four_writes_every_pair_and_four_triples(tmp_path, counter):
    """Today a budget of 4 took 4 pairs and no triple; the paper writes every pair, then triples."""
    prompts = shipped()

    def reply(p):
        if p.request.json_schema:
            return json.dumps(
                {"summary": "Resumo do documento.", "entities": ["Cabral", "Lisboa", "cabral", "Brasil", "Debian", "Escola", " . "]}
            )
        return relation_reply(p)

    engine = engine_with(tmp_path, DeterministicTestBackend(reply=reply))
    docs = [doc(1, SOURCE), doc(2, SOURCE + " Outra frase sobre Lisboa.")]
    graphs = extract_entity_graphs(engine, prompts["entities"], docs, prompt_count=counter.count, scope="eg", seed=3)
    assert graphs.entities.filter(graphs.entities["doc_id"] == "d001")["entity"].to_list() == [
        "Cabral",
        "Lisboa",
        "Brasil",
        "Debian",
        "Escola",
    ]
    result, figures = relation_corpus(
        engine, prompts["pair"], prompts["triple"], prompts["entities"].sha, docs, graphs.summaries, graphs.entities,
        prompt_count=counter.count, gate=gate(counter), scope="ec", seed=3, budget=Budget(4),
    )  # fmt: skip
    rows, rejects = result.frames()
    assert rejects.height == 0
    assert figures.metadata() == {
        "documents_with_entities": 2, "pairs_possible": 20, "triples_possible": 20, "pairs_planned": 20, "triples_planned": 8,
        "pairs_written": 20, "triples_written": 8, "relations_with_whole_document": 28, "relations_with_summary_and_passages": 0,
        "budget": "every pair, then triples: triples_per_document 4 per document",
    }  # fmt: skip
    assert figures.per_document == {"d001": 14, "d002": 14}
    by_kind = rows.group_by("kind").len().sort("kind").rows()
    assert by_kind == [("entigraph_pair", 20), ("entigraph_summary", 2), ("entigraph_triple", 8)]
    pairs = rows.filter(rows["kind"] == "entigraph_pair")
    assert sorted(tuple(e) for e in pairs.filter(pairs["doc_id"] == "d001")["entities"].to_list()) == sorted(
        itertools.combinations(["Cabral", "Lisboa", "Brasil", "Debian", "Escola"], 2)
    )


# -- steps 2 and 3: what a relation request carries ------------------------------------------------------


def test_a_document_that_fits_is_carried_whole(tmp_path, counter):
    """Today the request carried only the chunk that mentioned most entities; the paper sends the document."""
    prompts = shipped()
    document = doc(1, " ".join(f"Parte {k}. {SOURCE}" for k in range(3)))
    assert counter.count([document.text])[0] <= prompts["pair"].spec.chunking.max_input_tokens
    jobs = relation_jobs(document, ["Cabral", "Lisboa", "Brasil"], prompts["pair"], prompts["triple"],
                         prompt_count=counter.count, seed=3, budget=Budget(1), summary="Um resumo.")  # fmt: skip
    assert [j.kind for j in jobs] == ["entigraph_pair"] * 3 + ["entigraph_triple"]
    for job in jobs:
        user = job.request.messages[-1][1]
        assert job.context.whole and job.context.text == document.text and job.context.summary == ""
        assert user.startswith("Documento:\n" + document.text + "\n\n") and "Um resumo." not in user


def test_a_longer_document_is_carried_as_its_summary_and_the_passages_that_mention_the_entities(tmp_path, counter):
    limit = 120
    prompts = shipped(tmp_path / "p", pair=limit, triple=limit)
    filler = "As salas têm computadores novos e os alunos usam a rede todos os dias."
    sentences = [filler] * 12
    sentences[2] = "Cabral chegou ao porto com os navios."
    sentences[9] = "Em Lisboa, o rei recebeu as notícias."
    document = doc(1, " ".join(sentences))
    summary = "O texto fala de Cabral e de Lisboa."
    assert counter.count([document.text])[0] > limit

    (job,) = relation_jobs(document, ["Cabral", "Lisboa"], prompts["pair"], prompts["triple"],
                           prompt_count=counter.count, seed=3, budget=Budget(0), summary=summary)  # fmt: skip
    contexts = DocumentContexts(prompts["pair"], document, summary, counter.count)
    mentioning = [p for p in contexts.passages if any(entity_key(n) in entity_key(p.text) for n in ("Cabral", "Lisboa"))]
    assert len(mentioning) == 2 and mentioning[0].end != mentioning[1].start and len(contexts.passages) > 2
    context = job.context
    assert not context.whole and context.summary == summary
    assert list(context.chunks) == mentioning, "the passages that mention the entities, in document order"
    assert context.text == mentioning[0].text + GAP + mentioning[1].text
    assert counter.count([context.summary])[0] + counter.count([context.text])[0] <= limit, "within the prompt's input limit"
    user = job.request.messages[-1][1]
    assert user.startswith(f"Resumo do documento:\n{summary}\n\nTrechos do documento:\n{context.text}\n\n")

    result, figures = relation_corpus(
        engine_with(tmp_path, DeterministicTestBackend(reply=relation_reply)), prompts["pair"], prompts["triple"], "sha",
        [document], *_graph(document, summary, ["Cabral", "Lisboa"]), prompt_count=counter.count, gate=gate(counter), scope="ec",
        seed=3, budget=Budget(0),
    )  # fmt: skip
    rows, _ = result.frames()
    pair = rows.filter(rows["kind"] == "entigraph_pair").row(0, named=True)
    assert pair["chunk_starts"] == [c.start for c in mentioning]
    assert (figures.with_whole_document, figures.with_passages) == (0, 1)


def test_passages_beyond_the_limit_are_left_out_most_relevant_first(counter, tmp_path):
    """More passages mention the entities than fit: those naming more of them are kept, in document order."""
    limit = 60
    prompts = shipped(tmp_path / "p", pair=limit, triple=limit)
    sentences = [f"Cabral viu o navio número {k} no mar." for k in range(10)]
    sentences[6] = "Cabral e Lisboa aparecem juntos nesta frase."
    document = doc(1, " ".join(sentences))
    (job,) = relation_jobs(document, ["Cabral", "Lisboa"], prompts["pair"], prompts["triple"],
                           prompt_count=counter.count, seed=3, budget=Budget(0), summary="")  # fmt: skip
    both = [p for p in job.context.chunks if "Lisboa" in p.text]
    assert both and counter.count([job.context.text])[0] <= limit
    assert [c.index for c in job.context.chunks] == sorted(c.index for c in job.context.chunks)
    assert len(job.context.chunks) < len(DocumentContexts(prompts["pair"], document, "", counter.count).passages)


def _graph(document, summary, names):
    from synth_cpt.core.contracts import ENTITIES, ENTITY_SUMMARIES
    from synth_cpt.synthesis.rows import table

    summaries = table(
        [{"doc_id": document.doc_id, "drop_id": document.drop_id, "source_file": document.source_file, "source_line": document.source_line,
          "language": "pt", "summary": summary, "n_entities": len(names), "request_ids": ["r"], "prompt_sha": "s", "model": "m",
          "model_fingerprint": "fp"}],
        ENTITY_SUMMARIES,
    )  # fmt: skip
    entities = table([{"doc_id": document.doc_id, "entity": n, "position": i} for i, n in enumerate(names)], ENTITIES)
    return summaries, entities
