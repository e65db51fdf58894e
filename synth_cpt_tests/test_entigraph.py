"""EntiGraph (METHODS §5): entity extraction, relation planning and the relation corpus, with the test double."""

from __future__ import annotations

import json
import math

import pytest

from synth_cpt.synthesis.entigraph import Budget, extract_entity_graphs, merge_entities, normalize_entity, relation_corpus, relation_plan
from synth_cpt.synthesis.prompts import load_prompt
from synth_cpt_tests.doubles import DeterministicTestBackend
from synth_cpt_tests.test_synthesis_units import SOURCE, doc, engine_with, gate
from synth_cpt_tests.test_synthesis_units import counter as counter  # noqa: F401 (a fixture)

# -- EntiGraph ---------------------------------------------------------------------------------------


def test_entities_are_normalized_and_merged():
    assert normalize_entity('  "São  Paulo". ') == "São Paulo"
    assert normalize_entity("!!!") is None and normalize_entity(42) is None and normalize_entity("x" * 200) is None
    assert merge_entities([["São Paulo", "Lisboa"], ["sao paulo", "Cabral", "LISBOA"]], 10) == ["São Paulo", "Lisboa", "Cabral"]
    assert merge_entities([["a", "b", "c"]], 2) == ["a", "b"]


@pytest.mark.parametrize("n", [0, 1, 2, 5, 9])
def test_relation_plan_enumerates_pairs_then_triples_deterministically(n):
    names = [f"e{i}" for i in range(n)]
    full = relation_plan(names, "doc", 7, None)
    assert len(full) == math.comb(n, 2) + math.comb(n, 3)
    assert len(set(full)) == len(full)
    pairs = [c for c in full if len(c) == 2]
    assert full[: len(pairs)] == pairs  # pairs first
    assert relation_plan(names, "doc", 7, None) == full  # same seed, same order
    capped = relation_plan(names, "doc", 7, 4)
    assert capped == full[:4]
    if n >= 4:
        assert relation_plan(names, "doc", 8, None) != full  # the seed matters
    assert all(len(c) == 2 for c in relation_plan(names, "doc", 7, None, triples=False))


def test_budget_arithmetic():
    assert Budget(relations=8).per_document(400) == 8
    assert Budget(relations=None, tokens=2000).per_document(400) == 5
    assert Budget(relations=3, tokens=2000).per_document(400) == 3
    assert "2,000 // max_tokens 400 = 5" in Budget(relations=None, tokens=2000).arithmetic(400)


def test_entity_graphs_and_corpus_with_the_double(tmp_path, counter):
    prompts = {n: load_prompt("entigraph", n) for n in ("entities", "pair", "triple")}

    def reply(p):
        if p.request.json_schema:
            return json.dumps({"summary": "Resumo do documento.", "entities": ["Cabral", "Lisboa", "cabral", "Brasil", " . "]})
        return "Texto sobre como " + " e ".join(p.request.messages[-1][1].split("\n")[0:1]) + " se relacionam no documento."

    engine = engine_with(tmp_path, DeterministicTestBackend(reply=reply))
    docs = [doc(1, SOURCE), doc(2, SOURCE + " Outra frase sobre Lisboa.")]
    graphs = extract_entity_graphs(engine, prompts["entities"], docs, prompt_count=counter.count, scope="eg", seed=3)
    assert graphs.summaries.height == 2
    assert graphs.entities.filter(graphs.entities["doc_id"] == "d001")["entity"].to_list() == ["Cabral", "Lisboa", "Brasil"]
    budget = Budget(relations=4)
    result, figures = relation_corpus(
        engine, prompts["pair"], prompts["triple"], prompts["entities"].sha, docs, graphs.summaries, graphs.entities,
        prompt_count=counter.count, gate=gate(counter), scope="ec", seed=3, budget=budget,
    )  # fmt: skip
    assert figures.pairs_possible == 6 and figures.triples_possible == 2
    assert figures.pairs_planned == 6 and figures.triples_planned == 2  # 3 pairs + 1 triple per document
    rows, rejects = result.frames()
    assert rows.filter(rows["kind"] == "entigraph_summary").height == 2
    assert rows.height + rejects.height == 2 + 8
    for row in rows.filter(rows["kind"] != "entigraph_summary").to_dicts():
        assert len(row["request_ids"]) == 1 and len(row["entities"]) in (2, 3)
