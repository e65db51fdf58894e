"""The ingest half end to end: `synth-cpt ingest` against datatrove's heuristic filters, side by side.

Both get the same fresh drop: two JSONL files of ~3 KB documents made by `benchmarks/ingest.generate`
(Portuguese and English paragraphs of the sample corpus, 1% broken records), half the size each.

- **ours**: the real command, `synth-cpt --config <cfg> ingest --settle 0`, on a fresh storage root and
  a fresh Dagster instance (DAGSTER_HOME in a temp dir with the repo's dagster.yaml): crawl_drops of
  both files, raw_corpus, tokenizer and quality_subsets of every partition, every check, every event.
  The config is the shipped defaults plus a target tokenizer (`tokenizer.model_file`), as a continued
  pretraining run has one (its model's): a SentencePiece model trained on the sample corpus before any
  clock starts, or `--tokenizer FILE`. `--tokenizer trained` leaves it unset, so the tokenizer asset
  trains one on raw_corpus (the shipped default when no target model is named); by default ours runs
  both ways and the second RESULT line is the trained one.
- **datatrove** (0.10.1): a `LocalPipelineExecutor` with tasks=2, workers=2 (one task per file):
  JsonlReader -> GopherRepetitionFilter -> GopherQualityFilter -> FineWebQualityFilter -> JsonlWriter,
  every filter with its defaults, so English: every document mixes Portuguese and English paragraphs
  (`generate` draws them from both), so no one language fits a file, and with English stop words about
  80% of the documents pass Gopher's rules and go on through FineWeb's filter (48,260 of 60,185 kept at
  200 MB). Word tokenization is spaCy's blank tokenizer (offline). Its reader is JsonlReader with one change: lines are read as bytes and a line
  that is not a JSON object is skipped. As shipped, JsonlReader stops reading a file at the first
  invalid UTF-8 byte and its task dies on a JSON array, so it would not read the drop at all.

Each side runs in its own process, wall time from start to exit. `docs` is the documents ours
published in crawl_drops (valid records; datatrove's kept count is printed beside it).

    python benchmarks/ingest_half.py [--mb 200] [--tokenizer target|trained|both|FILE] [--profile TOP]

`--profile TOP` runs ours only, in this process under cProfile, and prints the TOP functions by own
time and by cumulative time, then each Dagster run's wall time read from the instance's events
(IH_PROF_DUMP=FILE also writes the pstats file). Wall and CPU seconds are printed for each side: CPU
(user + system of the whole process tree) says what a side cost when other jobs share the machine.

RESULT ingest_half ratio=<datatrove_s/ours_s> ours_s=... datatrove_s=... docs=... (target tokenizer)
RESULT ingest_half_trained ratio=... (with --tokenizer both, the default: the tokenizer trained here)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

FILES = ("2026-12-05_a.jsonl", "2026-12-05_b.jsonl")


def make_drop(folder: Path, megabytes: int) -> int:
    """Two files of half the size each, different seeds (so different documents)."""
    from ingest import generate

    folder.mkdir(parents=True, exist_ok=True)
    return sum(generate(folder / name, max(1, megabytes // 2), seed=i) for i, name in enumerate(FILES))


def ours_setup(work: Path, drops: Path, tokenizer: str | None) -> tuple[list[str], dict[str, str]]:
    """The command line and environment of a fresh `synth-cpt ingest`: new storage root, new instance."""
    home, dagster_home = work / "home", work / "dagster_home"
    dagster_home.mkdir(parents=True)
    shutil.copy(REPO / "dagster.yaml", dagster_home / "dagster.yaml")
    config = {"storage_root": str(home), "drops": {"location": str(drops), "settle_seconds": 0}}
    if tokenizer:
        config["tokenizer"] = {"model_file": str(Path(tokenizer).resolve())}
    (work / "config.yaml").write_text(json.dumps(config))  # JSON is YAML
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SYNTH_CPT_", "DAGSTER_"))}
    env.update(DAGSTER_HOME=str(dagster_home), SYNTH_CPT_HOME=str(home), COLUMNS="200")
    return ["--config", str(work / "config.yaml"), "ingest", "--settle", "0"], env


def target_tokenizer(folder: Path) -> str:
    """A stand-in for the target model's tokenizer: SentencePiece on the sample corpus (not the drop)."""
    from ingest import paragraphs

    from synth_cpt.corpus.tokenizer import train_model

    path = folder / "target.model"
    path.write_bytes(train_model(paragraphs(), 8000, 1234, 0.9995))
    return str(path)


def ours_documents(work: Path) -> int:
    from synth_cpt.core.storage import LocalStorage
    from synth_cpt.ingest.drops import ingested_drops

    return sum(m["documents"] for m in ingested_drops(LocalStorage(work / "home")))


def run_ours(work: Path, drops: Path, tokenizer: str | None) -> dict:
    args, env = ours_setup(work, drops, tokenizer)
    exe = Path(sys.executable).with_name("synth-cpt")
    proc, seconds, cpu = timed([str(exe), *args], env=env, cwd=work)
    if proc.returncode != 0:
        raise SystemExit(f"synth-cpt ingest exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return {"seconds": seconds, "cpu": cpu, "documents": ours_documents(work), "runs": run_walls(work / "dagster_home", env)}


def timed(cmd: list[str], env: dict[str, str] | None = None, cwd: Path | None = None) -> tuple[subprocess.CompletedProcess, float, float]:
    """Run `cmd` to its end: (the process, wall seconds, CPU seconds of it and every process under it).

    CPU is user + system time, polled every 0.2 s over the process tree (datatrove's workers are children of
    a forkserver, which no rusage of ours counts): what a side cost the machine, which the load of other
    jobs changes less than wall time. A process that ends between two polls loses its last 0.2 s at most."""
    import psutil

    seen: dict[tuple[int, float], float] = {}
    start = time.perf_counter()
    with (
        subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc,
        ThreadPoolExecutor(1) as pool,
    ):
        root = psutil.Process(proc.pid)
        reader = pool.submit(proc.communicate)  # drains both pipes while this thread polls
        while not reader.done():
            with contextlib.suppress(psutil.Error):
                for p in [root, *root.children(recursive=True)]:
                    with contextlib.suppress(psutil.Error):
                        t = p.cpu_times()
                        seen[(p.pid, p.create_time())] = t.user + t.system
            time.sleep(0.2)
        stdout, stderr = reader.result()
    seconds = time.perf_counter() - start
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr), seconds, sum(seen.values())


def run_walls(dagster_home: Path, env: dict[str, str]) -> list[tuple[str, float]]:
    """(what ran, seconds) per Dagster run of the instance, from its start and end events."""
    code = (
        "import json\nfrom dagster import DagsterInstance, RunsFilter\ni = DagsterInstance.get()\n"
        "out = []\nfor r in reversed(i.get_run_records(RunsFilter())):\n"
        "    run = r.dagster_run\n    sel = sorted(k.to_user_string() for k in (run.asset_selection or []))\n"
        "    part = run.tags.get('dagster/partition', '') or run.tags.get('synth_cpt/partitions', '')\n"
        "    out.append([', '.join(sel) + (' ' + part if part else ''), (r.end_time or 0) - (r.start_time or 0)])\n"
        "print(json.dumps(out))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], env={**env, "DAGSTER_HOME": str(dagster_home)}, capture_output=True, text=True)
    return [tuple(x) for x in json.loads(proc.stdout)] if proc.returncode == 0 else []


def run_datatrove(drops: Path, out: Path) -> dict:
    """The datatrove pipeline in this process (the child): see the module docstring."""
    import orjson
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.filters import FineWebQualityFilter, GopherQualityFilter, GopherRepetitionFilter
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter

    class TolerantJsonlReader(JsonlReader):
        """JsonlReader reading bytes, skipping lines that are not JSON objects (see the module docstring)."""

        def read_file(self, filepath: str):
            with self.data_folder.open(filepath, "rb", compression=self.compression) as f:
                for li, line in enumerate(f):
                    with self.track_time():
                        try:
                            data = orjson.loads(line)
                        except orjson.JSONDecodeError:
                            continue
                        document = self.get_document_from_dict(data, filepath, li) if isinstance(data, dict) else None
                    if document:
                        yield document

    executor = LocalPipelineExecutor(
        pipeline=[
            TolerantJsonlReader(str(drops), glob_pattern="*.jsonl"),
            GopherRepetitionFilter(),
            GopherQualityFilter(),
            FineWebQualityFilter(),
            JsonlWriter(str(out / "output")),
        ],
        tasks=2,
        workers=2,
        logging_dir=str(out / "logs"),
        skip_completed=False,
    )
    executor.run()
    kept = 0
    for path in (out / "output").glob("*.jsonl.gz"):
        import gzip

        with gzip.open(path, "rb") as f:
            kept += sum(1 for _ in f)
    return {"kept": kept}


def measure_datatrove(drops: Path, out: Path) -> dict:
    proc, seconds, cpu = timed([sys.executable, __file__, "--child", str(drops), str(out)])
    if proc.returncode != 0:
        raise SystemExit(f"datatrove failed:\n{proc.stderr[-4000:]}")
    return {"seconds": seconds, "cpu": cpu, **json.loads(proc.stdout.strip().splitlines()[-1])}


def profile_ours(work: Path, drops: Path, tokenizer: str | None, top: int) -> None:
    """`synth-cpt ingest` in this process under cProfile, then each run's wall time from the instance."""
    import cProfile
    import pstats

    args, env = ours_setup(work, drops, tokenizer)
    os.environ.clear()
    os.environ.update(env)
    from synth_cpt.cli import main

    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.enable()
    code = main(args)
    profiler.disable()
    seconds = time.perf_counter() - start
    print(f"synth-cpt ingest in one process: exit {code}, {seconds:.2f} s wall (workers are other processes)")
    stats = pstats.Stats(profiler)
    for key, title in (("tottime", "own time"), ("cumulative", "cumulative")):
        print(f"--- top {top} by {title}")
        stats.sort_stats(key).print_stats(top)
    if os.environ.get("IH_PROF_DUMP"):
        stats.dump_stats(os.environ["IH_PROF_DUMP"])
    print("--- Dagster runs (wall s)")
    for what, s in run_walls(work / "dagster_home", env):
        print(f"{s:8.2f}  {what}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=200, help="size of the drop in MB, split over two files (default 200)")
    parser.add_argument(
        "--tokenizer",
        default="both",
        help="target: a target tokenizer made beforehand; trained: none configured; both (default); or a tokenizer file",
    )
    parser.add_argument("--profile", type=int, metavar="TOP", help="profile ours in this process and print the TOP costs (no datatrove)")
    parser.add_argument("--child", nargs=2, metavar=("DROPS", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_datatrove(Path(args.child[0]), Path(args.child[1]))))
        return
    with tempfile.TemporaryDirectory(prefix="synth-cpt-bench-half-") as tmp:
        drops = Path(tmp, "drops")
        size = make_drop(drops, args.mb)
        print(f"generated {len(FILES)} files, {size / 1e6:,.1f} MB in all")
        modes = {"both": ["target", "trained"]}.get(args.tokenizer, [args.tokenizer])
        files = {m: (target_tokenizer(Path(tmp)) if m == "target" else None if m == "trained" else m) for m in modes}
        if args.profile:
            profile_ours(Path(tmp, "ours"), drops, files[modes[0]], args.profile)
            return
        ours = {}
        for mode in modes:
            Path(tmp, mode).mkdir()
            ours[mode] = run_ours(Path(tmp, mode), drops, files[mode])
            r = ours[mode]
            print(f"ours ({mode} tokenizer): {r['seconds']:.1f} s wall, {r['cpu']:.1f} s CPU, {len(r['runs'])} Dagster runs")
            for what, s in ours[mode]["runs"]:
                print(f"  {s:7.2f} s  {what}")
        base = measure_datatrove(drops, Path(tmp, "datatrove"))
    print(f"datatrove: {base['seconds']:.1f} s wall, {base['cpu']:.1f} s CPU, {base['kept']:,} documents kept")
    for i, (mode, result) in enumerate(ours.items()):
        name = "ingest_half" if i == 0 else f"ingest_half_{mode}"
        ratio = base["seconds"] / result["seconds"]
        print(f"{mode}: CPU ratio {base['cpu'] / result['cpu']:.2f} (datatrove {base['cpu']:.0f} s, ours {result['cpu']:.0f} s)")
        print(
            f"RESULT {name} ratio={ratio:.2f} ours_s={result['seconds']:.1f} datatrove_s={base['seconds']:.1f} docs={result['documents']}"
        )


if __name__ == "__main__":
    main()
