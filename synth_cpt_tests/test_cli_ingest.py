"""`synth-cpt ingest` from a terminal: fresh files are waited for (never skipped), a step with no input
is skipped with one line, a drop kept out says why, no stack trace reaches the screen, and the exit
status says how it went (0 all good, 1 a blocking check or run failed, 2 usage)."""

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from synth_cpt.core.storage import LocalStorage
from synth_cpt.ingest import quarantine as Q
from synth_cpt.ingest.drops import published_prefix

from .conftest import REPO, SAMPLE_DROPS, make_config, write_jsonl

pytestmark = pytest.mark.e2e


def _env(base: Path) -> dict[str, str]:
    """A throwaway instance and home; nothing from the caller's SYNTH_CPT_* / DAGSTER_* leaks in."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SYNTH_CPT_", "DAGSTER_"))}
    env.update(DAGSTER_HOME=str(base / "dagster_home"), SYNTH_CPT_HOME=str(base / "home"), COLUMNS="200")
    (base / "dagster_home").mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "dagster.yaml", base / "dagster_home" / "dagster.yaml")
    return env


def _cli(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("synth-cpt")
    return subprocess.run([str(exe), *args], env=env, capture_output=True, text=True, timeout=600, cwd=cwd)


def _kept_out_cells(stdout: str) -> str:
    """The crawl drops table's last column, its folded lines joined again."""
    rows = [line.split("│") for line in stdout.splitlines() if line.count("│") == 8]
    return " ".join(cells[-2].strip() for cells in rows).strip()


def test_freshly_copied_files_are_waited_for_then_ingested(tmp_path):
    env = _env(tmp_path)
    (tmp_path / "config.yaml").write_text("drops:\n  settle_seconds: 6\n")  # the default --settle comes from here
    drops = tmp_path / "drops"
    shutil.copytree(SAMPLE_DROPS, drops)  # as `cp`: every file changed just now
    out = _cli(["--config", "config.yaml", "ingest", "--drops", str(drops)], env, tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    waiting = [line for line in out.stderr.splitlines() if line.startswith("waiting for ")]
    assert len(waiting) == 7 and all("settled in" in line and "(--settle 6)" in line for line in waiting), out.stderr
    assert "7 new or changed, 0 unchanged" in out.stderr and "still being written" not in out.stderr
    assert "skipped" not in out.stderr and "failed runs" not in out.stderr
    assert out.stdout.count(" yes ") == 7, out.stdout
    home = tmp_path / "home"
    assert len(list(home.glob("quality_subsets/*/*/part-0.parquet"))) == 4, "every step ran on the waited-for drops"


def test_a_drop_that_is_not_what_its_name_says_is_kept_out_with_its_damage_and_nothing_downstream_fails(tmp_path):
    env = _env(tmp_path)
    drops = tmp_path / "drops"
    write_jsonl(drops / "fake.jsonl.zst", [{"text": "Olá, isto não está comprimido."}])  # plain JSONL under a .zst name
    out = _cli(["ingest", "--drops", str(drops), "--settle", "0"], env, tmp_path)
    both = out.stdout + out.stderr
    assert out.returncode == 1, both[-3000:]
    assert "Traceback" not in both and "Stack Trace" not in both and "dagster - ERROR" not in both
    assert "waiting" not in out.stderr, "--settle 0 takes files at once"
    # the table says why: the damage with its reason code
    assert _kept_out_cells(out.stdout).startswith("unreadable_file: not zstd-compressed data"), out.stdout
    # downstream steps have no input: one line each, and no run is launched to fail
    lines = out.stderr.splitlines()
    for partition in ("pt|high", "pt|low", "en|high", "en|low"):
        assert any(line.startswith(f"raw_corpus {partition}: skipped, no accepted drop") for line in lines), out.stderr
        assert f"quality_subsets {partition}: skipped, raw_corpus {partition} is not published" in lines
    assert any(line.startswith("tokenizer: skipped, no accepted drop in raw_corpus yet") for line in lines)
    failed = [line for line in lines if line.startswith("  - ")]
    assert len(failed) == 1 and failed[0].startswith("  - crawl_drops fake.jsonl.zst: blocking check quarantine_rate failed")
    assert "unreadable_file: not zstd-compressed data" in failed[0] and "(run " in failed[0]
    # the published quarantine names the damage in a row of its own
    storage = LocalStorage(tmp_path / "home")
    quarantine = storage.read_parquet(f"{published_prefix(storage, 'fake.jsonl.zst')}/quarantine.parquet")
    assert quarantine["reason_code"].to_list() == [Q.UNREADABLE_FILE]
    assert quarantine["reason"][0].startswith("no record could be read from the file: not zstd-compressed data")
    # nothing changed: nothing is ingested again, and the status still says the drop is kept out
    again = _cli(["ingest", "--drops", str(drops), "--settle", "0"], env, tmp_path)
    assert again.returncode == 1 and "0 new or changed, 1 unchanged" in again.stderr and "failed runs" not in again.stderr
    assert "kept out by the quarantine_rate check since an earlier run: fake.jsonl.zst" in again.stderr
    assert _kept_out_cells(again.stdout).startswith("unreadable_file: not zstd-compressed data")


def test_usage_errors_exit_2(tmp_path):
    env = _env(tmp_path)
    missing = _cli(["ingest", "--drops", str(tmp_path / "no-such-folder")], env, tmp_path)
    assert missing.returncode == 2 and "is not a folder" in missing.stderr and "Traceback" not in missing.stderr, missing.stderr
    negative = _cli(["ingest", "--drops", str(tmp_path), "--settle", "-1"], env, tmp_path)
    assert negative.returncode == 2 and "--settle" in negative.stderr


def test_a_file_that_changes_while_waited_for_is_waited_for_again(tmp_path):
    from synth_cpt.cli.ingest import wait_until_settled

    cfg = make_config(tmp_path)
    drop = write_jsonl(tmp_path / "drops" / "d.jsonl", [{"text": "a"}])
    said: list[str] = []
    touches = iter([True, False])

    def sleep(seconds: float) -> None:
        time.sleep(seconds)
        if next(touches):  # the copy goes on: the file changes again
            drop.write_bytes(drop.read_bytes() + b'{"text": "b"}\n')

    listing, plan = wait_until_settled(LocalStorage(tmp_path / "drops"), LocalStorage(tmp_path / "home"), cfg, 0.5, said.append, sleep)
    assert [d.relative_path for d in plan.new] == ["d.jsonl"] and not plan.unsettled
    assert len(said) == 2 and all(line.startswith("[yellow]waiting[/yellow] for d.jsonl: changed ") for line in said), said


def test_waiting_has_an_end(tmp_path, monkeypatch):
    from synth_cpt.cli import ingest

    monkeypatch.setattr(ingest, "WAIT_LIMIT_SECONDS", 0.0)  # the limit is then twice --settle
    cfg = make_config(tmp_path)
    drop = write_jsonl(tmp_path / "drops" / "d.jsonl", [{"text": "a"}])

    def sleep(seconds: float) -> None:  # a file that never stops changing
        time.sleep(seconds)
        drop.write_bytes(drop.read_bytes() + b'{"text": "b"}\n')

    said: list[str] = []
    _, plan = ingest.wait_until_settled(LocalStorage(tmp_path / "drops"), LocalStorage(tmp_path / "home"), cfg, 0.3, said.append, sleep)
    assert [d.relative_path for d in plan.unsettled] == ["d.jsonl"] and not plan.new
    assert "still changing after" in said[-1] and "left for the next run" in said[-1]


def test_quality_cutpoints_wait_for_a_published_drop(tmp_path):
    """With percentile bucketing and no drop yet, the cut points are skipped with the reason, not published empty."""
    from synth_cpt.cli.ingest import missing_input
    from synth_cpt.core.config import load_config
    from synth_cpt.core.layout import QUALITY_CUTPOINTS

    config = load_config(str(REPO / "synth_cpt/defaults/nemotron.yaml"))
    storage = LocalStorage(tmp_path / "home")
    assert missing_input(QUALITY_CUTPOINTS, "pt", storage, config) == "no drop is published in crawl_drops yet"


def test_steps_a_failed_run_never_started_are_requeued_once_by_their_op():
    from synth_cpt.cli.ingest import to_requeue

    ops = {"raw_corpus": "raw_corpus", "tokenizer": "tokenizer", "subsets": "quality_subsets", "scores": "quality_subsets"}
    run = ["raw_corpus", "tokenizer", "subsets", "scores"]
    # the tokenizer's step failed: the multi-asset op after it never started, both its assets go again
    assert to_requeue(run, "pt|high", {"raw_corpus", "tokenizer"}, set(), ops.get) == ["subsets", "scores"]
    # once only: an asset requeued before for this partition is not requeued again
    assert to_requeue(run, "pt|high", {"raw_corpus"}, {("tokenizer", "pt|high")}, ops.get) == ["subsets", "scores"]
    assert to_requeue(run, "en|low", {"raw_corpus"}, {("tokenizer", "pt|high")}, ops.get) == ["tokenizer", "subsets", "scores"]
    # a run that started no step would start none again; a run whose steps all started leaves nothing
    assert to_requeue(run, "pt|high", set(), set(), ops.get) == []
    assert to_requeue(run, "pt|high", {"raw_corpus", "tokenizer", "quality_subsets"}, set(), ops.get) == []
