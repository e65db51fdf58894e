"""The ingest half in few runs: `synth-cpt ingest` runs one Dagster run per drop, then one per corpus
partition, with raw_corpus of the last partition, the tokenizer and quality_subsets of that partition in
one run; every asset partition is still materialized, with its checks, in the instance. A configured
target tokenizer is published as it is (never trained); drops share one worker pool with the same
results; a budgeted subset tokenizes in growing slices with the rule's result."""

import contextlib
import hashlib
import shutil
from pathlib import Path

import polars as pl
import pytest

from synth_cpt.core.config import parse_config
from synth_cpt.core.layout import CRAWL_DROPS, QUALITY_SUBSETS, RAW_CORPUS, TOKENIZER
from synth_cpt.core.storage import LocalStorage
from synth_cpt.corpus.subsets import CHUNK, select_budgeted
from synth_cpt.corpus.tokenizer import TokenCounter, model_key, published_tokenizer, train_model
from synth_cpt.ingest.drops import ingest_drop, published_prefix, worker_pool
from synth_cpt.ingest.sources import list_drops

from .conftest import EN_TEXT, PT_TEXT, SAMPLE_DROPS, environ
from .test_cli_ingest import _cli, _env
from .test_corpus import _frame, _longest_prefix, counter  # noqa: F401 - counter is a fixture

pytestmark = pytest.mark.e2e

CHECKS = {
    CRAWL_DROPS: {"documents_valid", "quarantine_rate"},
    RAW_CORPUS: {"documents_valid"},
    TOKENIZER: {"model_loads"},
    QUALITY_SUBSETS: {"documents_valid", "tokens_within_budget"},
}


def test_two_drops_make_nine_runs_and_every_partition_is_materialized_and_checked(tmp_path):
    from dagster import DagsterEventType, DagsterInstance, DagsterRunStatus

    env = _env(tmp_path)
    drops = tmp_path / "drops"
    drops.mkdir()
    names = ["2026-11-01_en_gimp-help.jsonl.zst", "2026-11-02_pt_debian-edu.jsonl"]
    for name in names:
        shutil.copy(SAMPLE_DROPS / name, drops / name)
    target = tmp_path / "target" / "target.model"
    target.parent.mkdir()
    target.write_bytes(train_model([PT_TEXT, EN_TEXT] * 30, vocab_size=400, seed=1, character_coverage=1.0))
    (tmp_path / "config.yaml").write_text(f"tokenizer:\n  model_file: {target}\n")
    out = _cli(["--config", "config.yaml", "ingest", "--drops", str(drops), "--settle", "0"], env, tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "skipped" not in out.stderr and "failed runs" not in out.stderr

    with environ({"DAGSTER_HOME": env["DAGSTER_HOME"]}):
        instance = DagsterInstance.get()
        records = list(reversed(instance.get_run_records()))  # oldest first
        runs = [r.dagster_run for r in records]
        assert all(r.status == DagsterRunStatus.SUCCESS for r in runs)
        shape = [(tuple(sorted(k.to_user_string() for k in r.asset_selection)), r.tags.get("dagster/partition")) for r in runs]
        corpus = [p for (assets, p) in shape if assets == (RAW_CORPUS,)]
        last = shape[5][1]
        assert shape[:2] == [((CRAWL_DROPS,), names[0]), ((CRAWL_DROPS,), names[1])]
        assert len(corpus) == 3 and shape[2:5] == [((RAW_CORPUS,), p) for p in corpus] and last not in corpus
        assert shape[5] == ((QUALITY_SUBSETS, RAW_CORPUS, TOKENIZER), last), "the last partition's three steps are one run"
        assert shape[6:] == [((QUALITY_SUBSETS,), p) for p in corpus] and len(shape) == 9
        materialized, checked = [], {}
        for run in runs:
            for event in instance.all_logs(run.run_id):
                if not event.is_dagster_event:
                    continue
                dagster_event = event.dagster_event
                if dagster_event.event_type == DagsterEventType.ASSET_MATERIALIZATION:
                    m = dagster_event.event_specific_data.materialization
                    materialized.append((m.asset_key.to_user_string(), m.partition))
                elif dagster_event.event_type == DagsterEventType.ASSET_CHECK_EVALUATION:
                    c = dagster_event.event_specific_data
                    assert c.passed, c
                    checked.setdefault((c.asset_key.to_user_string(), c.partition), set()).add(c.check_name)
        partitions = [*corpus, last]
        expected = [
            *((CRAWL_DROPS, n) for n in names),
            *((RAW_CORPUS, p) for p in partitions),
            (TOKENIZER, None),
            *((QUALITY_SUBSETS, p) for p in partitions),
        ]
        assert sorted(materialized, key=str) == sorted(expected, key=str), "each asset partition materialized once"
        assert checked == {(asset, p): CHECKS[asset] for asset, p in expected}, "every check of every asset partition, passed"

    storage = LocalStorage(tmp_path / "home")
    info = published_tokenizer(storage)["info"]
    assert info["source"] == "model_file" and info["trained_on_documents"] == 0 and "corpus_documents" not in info
    assert storage.read_bytes(model_key(storage)) == target.read_bytes(), "the target tokenizer is published as it is"
    assert info["sha256"] == hashlib.sha256(target.read_bytes()).hexdigest()


def test_drops_ingested_through_one_kept_pool_equal_drops_ingested_with_their_own(tmp_path, monkeypatch):
    from synth_cpt.ingest import drops as drops_module

    starts: list[int] = []
    start_pool = drops_module._start_pool

    def counted(workers):
        starts.append(workers)
        return start_pool(workers)

    monkeypatch.setattr(drops_module, "_start_pool", counted)
    drops = tmp_path / "drops"
    drops.mkdir()
    names = ["2026-11-01_pt_gimp-help.jsonl.gz", "2026-11-02_pt_debian-edu.jsonl"]
    for name in names:
        shutil.copy(SAMPLE_DROPS / name, drops / name)
    location = LocalStorage(drops)

    def ingest_all(home: Path, keep_pool: bool) -> list[pl.DataFrame]:
        # batches small enough that each drop goes to the worker processes in several batches
        cfg = parse_config(f'{{"storage_root": "{home}", "limits": {{"batch_bytes": 20000, "workers": 2}}}}', "test")
        storage = LocalStorage(home)
        listed = {d.relative_path: d for d in list_drops(location, cfg.drops.patterns).drops}
        assert all(listed[n].size > 2 * cfg.limits.batch_bytes for n in names)
        frames = []
        with worker_pool(cfg) if keep_pool else contextlib.nullcontext():
            for name in names:
                ingest_drop(cfg, storage, location, listed[name])
                frames.append(storage.read_parquet(f"{published_prefix(storage, name)}/docs.parquet"))
        return frames

    kept = ingest_all(tmp_path / "kept", keep_pool=True)
    assert starts == [2], "one pool of 2 workers for both drops"
    own = ingest_all(tmp_path / "own", keep_pool=False)
    assert starts == [2, 2, 2], "then a pool per drop"
    for a, b in zip(kept, own, strict=True):
        assert a.height > 0 and a.equals(b)
    # a kept pool whose worker died is broken for good: the next drop gets a pool of its own
    cfg = parse_config(f'{{"storage_root": "{tmp_path / "broken"}", "limits": {{"batch_bytes": 20000, "workers": 2}}}}', "test")
    listed = {d.relative_path: d for d in list_drops(location, cfg.drops.patterns).drops}
    with worker_pool(cfg):
        pool = drops_module._POOLS[-1][1]
        next(iter(pool._processes.values())).kill()
        with contextlib.suppress(Exception):
            pool.submit(sum, [1]).result(timeout=30)  # the pool notices the dead worker
        assert pool._broken
        ingest_drop(cfg, LocalStorage(tmp_path / "broken"), location, listed[names[0]])
    assert starts == [2, 2, 2, 2, 2]


def test_a_budget_past_the_first_chunk_takes_the_rules_prefix(counter):  # noqa: F811 - the fixture
    frame = _frame(CHUNK + 700)
    ordered = frame.sort(["quality_score", "doc_id"], descending=[True, False])
    budget = sum(counter.count(ordered["text"].to_list()[: CHUNK + 300]))  # fills the first chunk and part of the second
    subset, stats = select_budgeted(frame, counter, budget - 1, "score", 1)
    ids, tokens, stopped = _longest_prefix(ordered, counter, budget - 1)
    assert subset["doc_id"].to_list() == ids and len(ids) == CHUNK + 299
    assert (stats.documents, stats.tokens, stats.stopped_at_doc_tokens) == (len(ids), tokens, stopped)
    assert subset["n_tokens"].to_list() == counter.count(subset["text"].to_list())
    assert isinstance(counter, TokenCounter)
