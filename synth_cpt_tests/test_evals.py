"""Intrinsic evals: diversity, template-aware near duplicates, copying, contamination, and eval_scores of a partition."""

import json

import polars as pl
import pytest

from synth_cpt.core.config import PipelineConfig
from synth_cpt.evals import diversity as dv
from synth_cpt.evals.scores import lm_eval_npm, plots, score_partition
from synth_cpt.text.heuristics import heuristic_scores

from .conftest import EN_TEXT, PT_TEXT
from .test_lineage import materialized  # noqa: F401  (fixture)
from .test_mix_build import tokenizer  # noqa: F401  (fixture)


def test_distinct_n_and_compression():
    assert dv.distinct_n(["a b c d"], 1) == 1.0 and dv.distinct_n(["a a a a"], 1) == 0.25
    assert dv.distinct_n(["a b a b"], 2) == pytest.approx(2 / 3)
    assert dv.distinct_n([], 1) is None
    assert dv.compression_ratio(["o gato " * 200]) > dv.compression_ratio([PT_TEXT]) > 1


def test_templates_do_not_make_unrelated_qa_rewrites_twins():
    """Every QA rewrite opens the same way: without stripping the markers, short unrelated ones collide."""
    qa = [
        "Pergunta: Quem fundou a escola?\nResposta: Maria fundou a escola em 1990.",
        "Pergunta: Onde fica o rio?\nResposta: O rio fica ao norte da cidade.",
    ]
    assert dv.strip_template(qa[0]).startswith("Quem fundou")
    assert dv.near_duplicates(qa) == []
    assert dv.near_duplicates([PT_TEXT, PT_TEXT + " Fim.", "Outro texto bem diferente sobre rios e montanhas do norte."]) == [0, 1]


def test_near_duplicate_rate_is_the_share_of_texts_with_a_near_twin():
    """Both texts of a near-identical pair have a twin: 2 pairs + 1 unique text -> 4 of 5 (the old count, one per pair, said 2/5)."""
    texts = [
        PT_TEXT,
        EN_TEXT,
        PT_TEXT + " Fim.",
        "Outro texto bem diferente sobre rios e montanhas do norte do país.",
        EN_TEXT.replace("Undo", "Redo", 1),
    ]
    assert dv.near_duplicates(texts) == [0, 1, 2, 4]
    assert dv.near_duplicate_rate(texts) == 4 / 5
    assert dv.near_duplicate_rate(["Pergunta: " + PT_TEXT, "Resposta: " + PT_TEXT]) == 1.0, "after strip_template"
    assert dv.near_duplicate_rate([]) is None and dv.near_duplicate_rate([PT_TEXT]) == 0.0
    assert "estimated Jaccard >= 0.8" in dv.near_duplicate_meaning(0.8)


@pytest.mark.parametrize("threshold", [0.5, 0.7, 0.8, 0.9])
def test_near_duplicates_are_every_text_with_a_twin_at_the_threshold(threshold):
    """LSH only proposes candidates: the answer is exactly the pairwise one (estimated Jaccard >= threshold), at the borderline too."""
    words = PT_TEXT.split()
    texts = [" ".join(words[: 20 + 2 * i]) for i in range(20)] + [" ".join(reversed(words[: 20 + 3 * i])) for i in range(8)]
    hashes = [dv._minhash(t, 128, 1) for t in texts]
    jaccard = {(i, j): hashes[i].jaccard(hashes[j]) for i in range(len(texts)) for j in range(len(texts)) if i != j}
    expected = sorted({i for (i, _), j in jaccard.items() if j >= threshold})
    assert any(threshold <= j < threshold + 0.05 for j in jaccard.values()), "the set has pairs just above the threshold"
    assert any(threshold - 0.05 <= j < threshold for j in jaccard.values()), "and just below it"
    assert dv.near_duplicates(texts, threshold) == expected
    assert dv.near_duplicate_rate(texts, threshold) == len(expected) / len(texts)


def test_copying_and_contamination():
    assert dv.copy_overlap(PT_TEXT, PT_TEXT) == 1.0
    assert dv.copy_overlap("palavras totalmente novas que não existem na fonte original deste texto", PT_TEXT) == 0.0
    bench = ["linha sem nada", "um texto " + " ".join(PT_TEXT.split()[3:20]) + " e mais"]
    hits = dv.contamination(["nada aqui", PT_TEXT], bench)
    assert [(i, row) for i, row, _ in hits] == [(1, 1)] and len(hits[0][2].split()) == 13


def test_eval_scores_npm_applies_the_configured_aliases_and_scales(tmp_path):
    """eval_scores reads lm-eval results as `synth-cpt npm --alias/--scale` would, from `evals.lm_eval_aliases/_scales`."""
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"results": {"boolq_ptbr": {"acc,none": 75.0}, "massive": {"f1_macro,none": 10.0}}}))

    def npm_with(**evals):
        return lm_eval_npm(PipelineConfig.model_validate({"evals": {"lm_eval_results": [str(results)], **evals}}).evals)

    bare = npm_with()
    assert bare["unmatched"] == ["boolq_ptbr"] and bare["all"]["tasks"] == 0  # massive 10.0 cannot be on 0-1
    aliases = {"boolq_ptbr": "boolq_pt_greedy"}
    both = npm_with(lm_eval_aliases=aliases, lm_eval_scales={"*": "0-100"})
    npms = {t["task"]: t["npm"] for t in both["tasks"]}
    assert npms == {"boolq_pt_greedy": 50.0, "massive_greedy": pytest.approx(100 * (10.0 - 0.5847) / (100 - 0.5847))}
    assert both["unmatched"] == [] and both["warnings"] == [] and both["nan"] == []
    assert both["aliases_given"] == aliases and both["scales_given"] == {"*": "0-100"}
    one = npm_with(lm_eval_aliases=aliases, lm_eval_scales={"massive": "0-100"})  # boolq still says the file is in percent
    assert [t["task"] for t in one["tasks"]] == ["massive_greedy"] and one["scales_given"] == {"massive_greedy": "0-100"}
    assert one["nan"] == [f"boolq_pt_greedy: acc = 75 left out: {results} is written in percent (see its warning)"]
    assert lm_eval_npm(PipelineConfig().evals) is None


def test_eval_scores_of_a_partition(materialized, tokenizer, tmp_path):  # noqa: F811
    storage, _ = materialized
    bench = tmp_path / "bench.jsonl"
    bench.write_text(json.dumps({"text": " ".join(PT_TEXT.split()[:15])}) + "\n")
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"results": {"boolq_pt": {"acc,none": 0.75}}}))
    config = PipelineConfig.model_validate({"evals": {"benchmarks": [str(bench)], "lm_eval_results": [str(results)]}})
    report = score_partition(storage, config, "pt", "high", tokenizer.count)
    sets = {r["set"]: r for r in report.scores.to_dicts()}
    assert set(sets) == {"original", "rewrite:easy", "mix:demo"}
    assert sets["original"]["rows"] == 10 and sets["rewrite:easy"]["rows"] == 12
    published = storage.read_parquet(storage.read_json("rewrites_easy/pt/high/current.json")["prefix"] + "/rows.parquet")
    assert sets["rewrite:easy"]["tokens"] == published["n_tokens"].sum(), "the rows' own project-tokenizer counts"
    assert sets["original"]["tokens"] == sum(
        tokenizer.count(storage.read_parquet("quality_subsets/pt/high/part-0.parquet")["text"].to_list())
    )
    # every measure, recomputed with the library from what the run published (every set is under max_texts: scored whole)
    originals = storage.read_parquet("quality_subsets/pt/high/part-0.parquet")
    mix_prefix = storage.read_json("training_mix_demo/pt/high/current.json")["prefix"]
    shards = sorted(k for k in storage.list(mix_prefix) if k.rsplit("/", 1)[1].startswith("shard-") and k.endswith(".parquet"))
    texts = {"original": originals["text"].to_list(), "rewrite:easy": published["text"].to_list(),
             "mix:demo": pl.concat([storage.read_parquet(k) for k in shards])["text"].to_list()}  # fmt: skip
    for name, found in texts.items():
        row = sets[name]
        assert row["scored"] == row["rows"] == len(found)
        assert [row[f"distinct_{n}"] for n in (1, 2, 3, 4)] == [dv.distinct_n(found, n) for n in (1, 2, 3, 4)]
        assert row["near_duplicate_rate"] == dv.near_duplicate_rate(found, config.evals.near_duplicate_threshold)
        assert row["heuristic_score_mean"] == pytest.approx(float(heuristic_scores(pl.Series(found)).mean()), rel=1e-12)
    for name in ("original", "rewrite:easy"):  # one file, one row group: scored in file order
        assert sets[name]["compression_ratio"] == dv.compression_ratio(texts[name])
    sources = dict(originals.select("doc_id", "text").iter_rows())
    overlaps = [dv.copy_overlap(t, sources[d]) for d, t in published.select("doc_id", "text").iter_rows()]
    assert sets["rewrite:easy"]["copy_overlap_mean"] == sum(overlaps) / len(overlaps) and None not in overlaps
    assert sets["original"]["copy_overlap_mean"] is None and sets["mix:demo"]["copy_overlap_mean"] is None
    ids = {"original": originals["doc_id"].to_list(), "rewrite:easy": published["doc_id"].to_list(),
           "mix:demo": pl.concat([storage.read_parquet(k) for k in shards])["doc_id"].to_list()}  # fmt: skip
    bench_texts = [json.loads(bench.read_text())["text"]]
    expected = sorted(
        (name, ids[name][i], str(bench), row, gram) for name in texts for i, row, gram in dv.contamination(texts[name], bench_texts)
    )
    contaminated = sorted(
        tuple(c.values()) for c in report.contamination.select("set", "doc_id", "benchmark", "benchmark_row", "ngram").to_dicts()
    )
    assert contaminated == expected and {c[0] for c in contaminated} == {"original", "rewrite:easy", "mix:demo"}
    assert report.npm["all"] == {"npm": 50.0, "tasks": 1, "of": 44, "missing": 43} and len(report.npm["missing"]) == 43
    assert report.npm["translated"] == {"npm": 50.0, "tasks": 1, "of": 32, "missing": 31} and report.npm["native"]["tasks"] == 0
    figures = plots(report)
    assert set(figures) == {"quality_score_by_origin", "diversity_by_set"} and all(v.startswith("![") for v in figures.values())


def test_eval_scores_sample_large_sets_but_count_them_whole(materialized, tokenizer):  # noqa: F811
    storage, _ = materialized
    config = PipelineConfig.model_validate({"evals": {"max_texts": 5}})
    sets = {r["set"]: r for r in score_partition(storage, config, "pt", "high", tokenizer.count).scores.to_dicts()}
    assert sets["rewrite:easy"]["rows"] == 12 and sets["rewrite:easy"]["scored"] == 5
    assert sets["mix:demo"]["rows"] > 5 and sets["mix:demo"]["scored"] == 5
    assert sets["original"]["rows"] == 10 and sets["original"]["scored"] == 5


def test_eval_scores_of_a_partition_with_nothing_published(tmp_path, tokenizer):  # noqa: F811
    from synth_cpt.core.contracts import check_scores
    from synth_cpt.core.storage import LocalStorage

    report = score_partition(LocalStorage(tmp_path), PipelineConfig(), "pt", "high", tokenizer.count)
    assert report.scores.height == 0 and "near_duplicate_rate" in report.scores.columns
    assert check_scores(report.scores).success
