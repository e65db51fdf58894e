"""`synth-cpt ingest` on the shipped sample corpus, through a real Dagster instance, checked with DuckDB."""

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest
from dagster import AssetKey, DagsterInstance, RunsFilter

from .conftest import REPO, environ, short_prompt_library

pytestmark = pytest.mark.e2e


def _cli(args, env):
    exe = Path(sys.executable).with_name("synth-cpt")
    return subprocess.run([str(exe), *args], env=env, capture_output=True, text=True, timeout=600, cwd=env["WORKDIR"])


@pytest.fixture(scope="module")
def ingested(tmp_path_factory):
    base = tmp_path_factory.mktemp("e2e")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SYNTH_CPT_", "DAGSTER_"))}
    env.update(DAGSTER_HOME=str(base / "dagster_home"), SYNTH_CPT_HOME=str(base / "home"), WORKDIR=str(base), COLUMNS="200")
    (base / "dagster_home").mkdir()
    shutil.copy(REPO / "dagster.yaml", base / "dagster_home" / "dagster.yaml")
    first = _cli(["ingest"], env)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-5000:]
    return base, env, first


def test_outputs_checked_with_duckdb(ingested):
    base, _, first = ingested
    home = base / "home"
    docs = duckdb.sql(f"select count(*), count(distinct drop_id) from read_parquet('{home}/crawl_drops/*/v/*/docs.parquet')").fetchall()[0]
    assert docs[0] > 1500 and docs[1] == 7
    q = dict(
        duckdb.sql(f"select reason_code, count(*) from read_parquet('{home}/crawl_drops/*/v/*/quarantine.parquet') group by 1").fetchall()
    )
    # one broken record of each kind in the Debian Edu drop; short fortune cookies add undetected languages
    assert q.pop("language_not_detected") >= 1
    assert q == {
        "empty_text": 1, "invalid_json": 1, "invalid_utf8": 1,
        "missing_text": 1, "non_string_text": 1, "not_object": 1, "null_text": 1,
    }  # fmt: skip
    raw = f"read_parquet('{home}/raw_corpus/*/*/part-0.parquet', union_by_name=true)"
    dup = duckdb.sql(f"select count(*) - count(distinct doc_id || language) from {raw}").fetchall()[0][0]
    assert dup == 0, "raw_corpus is deduplicated"
    wrong = duckdb.sql(
        f"select count(*) from {raw} where (quality = 'high' and quality_score <= 2.5) or (quality = 'low' and (quality_score < 0.5 or quality_score > 2.0))"
    ).fetchall()[0][0]
    assert wrong == 0
    per_lang = dict(duckdb.sql(f"select language, count(*) from {raw} group by 1").fetchall())
    assert per_lang["pt"] > 100 and per_lang["en"] > 100
    subsets = duckdb.sql(
        f"select language, quality, sum(n_tokens), count(*) from read_parquet('{home}/quality_subsets/*/*/part-0.parquet') group by all"
    ).fetchall()
    assert {(language, quality) for language, quality, _, n in subsets if n >= 40} == {
        ("pt", "high"),
        ("pt", "low"),
        ("en", "high"),
        ("en", "low"),
    }, "the demo fills every partition"
    for language, quality, tokens, _ in subsets:
        assert 0 < tokens <= 60_000, (language, quality, tokens)
    sources = dict(duckdb.sql(f"select quality_score_source, count(*) from {raw} group by 1").fetchall())
    assert sources.get("fields", 0) > 0 and sources.get("heuristic", 0) > 0, "both the mapped-score path and the heuristic run"
    pointer = json.loads((home / "tokenizer" / "current.json").read_text())
    import sentencepiece as spm

    pieces = spm.SentencePieceProcessor(model_file=str(home / pointer["prefix"] / "tokenizer.model")).get_piece_size()
    assert pointer["info"]["vocab_size"] == pieces, "the published model's own size"
    assert pieces <= pointer["info"]["requested_vocab_size"]
    for table in ("crawl drops", "partitions (language|quality)", "quarantined records by reason"):
        assert table in first.stdout


def test_runs_are_recorded_in_the_instance(ingested):
    base, env, _ = ingested
    code = (
        "from dagster import DagsterInstance, AssetKey\n"
        "i = DagsterInstance.get()\n"
        "runs = i.get_runs()\n"
        "print(len(runs), sum(r.is_success for r in runs))\n"
        "print(sorted(i.get_dynamic_partitions('crawl_drops')))\n"
        "print(i.get_latest_materialization_event(AssetKey('tokenizer')) is not None)\n"
        "from dagster import AssetCheckKey\n"
        "checks = [AssetCheckKey(AssetKey(a), n) for a, n in [('crawl_drops', 'quarantine_rate'), ('raw_corpus', 'documents_valid'),"
        " ('tokenizer', 'model_loads'), ('quality_subsets', 'tokens_within_budget')]]\n"
        "print(all(i.event_log_storage.get_asset_check_execution_history(c, limit=1) for c in checks))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    lines = out.stdout.split("\n")
    n_runs, n_ok = map(int, lines[0].split())
    # 7 drops + 3 raw_corpus + (raw_corpus, tokenizer and quality_subsets of the last partition: one run) + 3 quality_subsets
    assert n_runs == 14 and n_ok == 14
    assert "2026-11-02_pt_debian-edu.jsonl" in lines[1]
    assert lines[2] == "True"
    assert lines[3] == "True", "the blocking checks ran with their assets"


def test_rerun_ingests_nothing_new_and_is_deterministic(ingested):
    base, env, _ = ingested
    home = base / "home"

    def digest():
        return {
            p.relative_to(home).as_posix(): hashlib.sha256(
                str(duckdb.sql(f"select * from read_parquet('{p}') order by all").fetchall()).encode()
            ).hexdigest()
            for p in sorted(home.glob("quality_subsets/*/*/part-0.parquet"))
        }

    before = digest()
    again = _cli(["ingest"], env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "0 new or changed, 7 unchanged" in again.stderr.replace("\n", " ")
    assert digest() == before


def test_bad_config_fails_with_a_clear_message(ingested, tmp_path):
    base, env, _ = ingested
    bad = tmp_path / "bad.yaml"
    bad.write_text("quality:\n  combine: median\n")
    out = _cli(["--config", str(bad), "ingest"], env)
    assert out.returncode == 2
    assert str(bad) in out.stderr and "quality.combine" in out.stderr


def test_prompts_render_shows_what_is_sent_for_a_real_document(ingested):
    base, env, _ = ingested
    home = base / "home"
    doc_id, text = duckdb.sql(
        f"select doc_id, text from read_parquet('{home}/quality_subsets/pt/high/part-0.parquet') order by n_tokens desc limit 1"
    ).fetchall()[0]
    out = _cli(["prompts", "render", "medium", "--doc", doc_id[:16]], env)
    assert out.returncode == 0, out.stderr[-3000:]
    headers = [json.loads(line[4:]) for line in out.stdout.splitlines() if line.startswith("=== {")]
    assert [h["chunk"] for h in headers] == list(range(len(headers))) and headers[0]["of"] == len(headers) >= 2
    assert all(h["doc_id"] == doc_id and h["source_tokens"] <= 300 and "sampling" in h for h in headers)
    assert text.split()[0] in out.stdout and out.stdout.count("--- user ---") == len(headers)
    # autoregressive: chunk 0 is exact; later chunks carry outputs that are not generated yet, and say so
    out = _cli(["prompts", "render", "faithful", "--doc", doc_id[:16]], env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("--- user ---") == 1 and "(not known yet: carries the rewritten chunk 0" in out.stdout
    assert "O texto já reescrito termina assim" not in out.stdout  # no made-up context
    pair = _cli(["prompts", "render", "pair", "--doc", doc_id[:16]], env)
    assert pair.returncode == 2 and "entity_graphs pt|high is not published" in pair.stderr
    listing = _cli(["prompts", "list"], {**env, "COLUMNS": "300"})
    assert listing.returncode == 0 and "knowledge_list" in listing.stdout and "entities" in listing.stdout


def test_a_bad_prompt_file_is_refused_with_its_name(ingested, tmp_path):
    base, env, _ = ingested
    (tmp_path / "rewrite").mkdir()
    (tmp_path / "rewrite" / "broken.yaml").write_text("name: broken\ndescription: x\nuser: '{{ txt }}'\n")
    out = _cli(["prompts", "list"], {**env, "SYNTH_CPT_PROMPTS": str(tmp_path)})
    assert out.returncode == 2
    assert "broken.yaml" in out.stderr and "unknown variables ['txt']" in out.stderr


@pytest.mark.vllm
def test_synthesize_mix_evals_and_lineage_through_the_cli(ingested, tmp_path):
    """`synth-cpt synthesize` for two partitions and two assets (real engine): one Dagster run over both, one
    engine load, a summary of what was made and where, outputs published; the second run sends nothing and loads
    nothing.
    Then `mix`, `evals`, `lineage doc|shard|drop` and `sql` on what was made."""
    base, env, _ = ingested
    env = {**env, "SYNTH_CPT_PROMPTS": str(short_prompt_library(tmp_path / "prompts"))}
    config = tmp_path / "one.yaml"
    config.write_text("extends: defaults\nsynthesis: {max_documents: 1, min_pass_rate: 0.0}\n")
    parts = ["--partition", "pt|high", "--partition", "pt|low"]
    args = ["--config", str(config), "synthesize", *parts, "--asset", "rewrites_medium", "--asset", "entity_graphs"]
    first = _cli(args, env)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "rewrites_medium" in first.stdout and "entity_graphs" in first.stdout and "pt|high" in first.stdout
    assert "engine loads in this process: 1 (" in first.stdout and "for 2 partition(s) in 1 run(s)" in first.stdout
    with environ({"DAGSTER_HOME": env["DAGSTER_HOME"]}), DagsterInstance.get() as instance:
        runs = instance.get_runs(RunsFilter(tags={"synth_cpt/launched_by": "synth-cpt synthesize"}))
        made = instance.get_materialized_partitions(AssetKey("rewrites_medium"))
    assert [(r.tags["dagster/asset_partition_range_start"], r.tags["dagster/asset_partition_range_end"]) for r in runs] == [
        ("pt|high", "pt|low")
    ], "both partitions in one run"
    assert made == {"pt|high", "pt|low"}
    # the model and its fingerprint are printed before anything is generated, and are the ones the rows carry
    announced = re.search(r"model (\S+@sha256:[0-9a-f]{64})\s+fingerprint ([0-9a-f]{16})\s+engine: vLLM in this process", first.stderr)
    assert announced, first.stderr[-3000:]
    # a quiet console: vLLM's and Dagster's logs and warnings go to the log file named on the last line
    log_file = Path(re.search(r"warnings and engine logs: (\S+\.log)", first.stderr.replace("\n", "")).group(1))
    assert "EngineCore" in log_file.read_text(), "the engine's own processes write to the log file too"
    assert not re.search(r"^\(EngineCore|^INFO|^WARNING|\bwarnings\.warn\(|Traceback", first.stderr, re.M), first.stderr[-3000:]
    sent = int(first.stdout.split("requests sent ", 1)[1].split(",", 1)[0].replace(",", ""))
    assert sent >= 2, first.stdout  # one rewrite chunk and one entity chunk at least
    home = base / "home"
    for asset in ("rewrites_medium", "entity_graphs"):
        for quality in ("high", "low"):
            pointer = json.loads((home / asset / "pt" / quality / "current.json").read_text())
            assert pointer["files"] and all((home / pointer["prefix"] / f).is_file() for f in pointer["files"])
    generated = duckdb.sql(
        f"select distinct model, model_fingerprint from read_parquet('{home}/generations/segments/**/*.parquet')"
    ).fetchall()
    assert generated == [announced.groups()], generated
    second = _cli(args, env)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "requests sent 0," in second.stdout and "engine loads in this process: 0 (" in second.stdout

    # then the mixes, eval_scores and lineage of that partition, through the CLI
    mixes = tmp_path / "mixes.yaml"
    mixes.write_text(
        "extends: defaults\nsynthesis: {max_documents: 1, min_pass_rate: 0.0}\nmixes:\n  recipes:\n"
        "    originals_repeated: {shard_tokens: 20000, formats: [parquet, tokens]}\n"
        "    wrap_1to1: {on_shortfall: take_available, formats: [parquet, jsonl.zst]}\n"
    )
    part = ["--partition", "pt|high"]
    mix = _cli(
        ["--config", str(mixes), "mix", *part, "--asset", "training_mix_originals_repeated", "--asset", "training_mix_wrap_1to1"], env
    )
    assert mix.returncode == 0, mix.stdout[-3000:] + mix.stderr[-3000:]
    assert "training_mix_originals_repeated" in mix.stdout and "original " in mix.stdout
    shards = sorted((home / "training_mix_originals_repeated" / "pt" / "high" / "v").glob("*/shard-*.parquet"))
    subset_tokens = duckdb.sql(f"select sum(n_tokens) from read_parquet('{home}/quality_subsets/pt/high/part-0.parquet')").fetchall()[0][0]
    mixed = duckdb.sql(
        f"select sum(n_tokens), max(cnt) from (select doc_id, sum(n_tokens) n_tokens, count(*) cnt from read_parquet({[str(p) for p in shards]}) group by 1)"
    ).fetchall()[0]
    assert len(shards) >= 2 and mixed[0] == 4 * subset_tokens and mixed[1] == 4, "the originals, exactly four times"
    evals = _cli(["--config", str(mixes), "evals", *part], env)
    assert evals.returncode == 0, evals.stderr[-3000:]
    assert "mix:originals_repeated" in evals.stdout and "rewrite:medium" in evals.stdout
    example = _cli(["--config", str(mixes), "lineage", "doc", "--example", "--json"], env)
    assert example.returncode == 0, example.stderr[-3000:]
    answer = json.loads(example.stdout.split("\n", 1)[1])
    assert (answer["synthetic"] or answer["rejected"]) and answer["shards"] and answer["source"]["drop_id"]
    on_shard = _cli(["--config", str(mixes), "lineage", "shard", str(shards[0]), "--json"], env)
    assert on_shard.returncode == 0 and json.loads(on_shard.stdout)["mix"] == "originals_repeated"
    on_drop = _cli(["--config", str(mixes), "lineage", "drop", answer["source"]["drop_id"], "--json"], env)
    assert on_drop.returncode == 0 and json.loads(on_drop.stdout)["shards"]
    sql = _cli(["--config", str(mixes), "sql", "SELECT mix, origin, sum(n_tokens) AS tokens FROM shards GROUP BY ALL ORDER BY ALL"], env)
    assert sql.returncode == 0 and "originals_repeated" in sql.stdout
    bad = _cli(["--config", str(mixes), "sql", "SELECT nope FROM shards"], env)
    assert bad.returncode == 2 and "nope" in bad.stderr
