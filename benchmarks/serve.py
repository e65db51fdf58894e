"""A UI backfill's generation, partition by partition: each run loading its own engine (what runs launched
by the daemon did) against every run sending to one `synth-cpt serve` (what they do now).

The same rewrite requests, split into `--partitions` runs of equal size, run one after another as the
`gpu` pool runs them:
  baseline   per run: `VLLMBackend` (vLLM in process, the embedded model), loaded, its share generated,
             closed (the engine closed at the end of the step, so the next run can start)
  ours       `synth-cpt serve` started once (load timed), then per run: a `ServedBackend` client sends its
             share to the server
Both decode the same requests with the same per-request seeds; no cache is involved (everything is sent).
The wall time of each side includes its model loads.

    python benchmarks/serve.py [--requests 64] [--partitions 4] [--chars 1400]

Last line: RESULT serve ratio=<baseline_s / ours_s> loads_baseline=<n> loads_ours=1 tok_s=<ours>
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))


def _prepared(requests, fingerprint: str):
    from synth_cpt.generation.backends import Prepared
    from synth_cpt.generation.requests import derived_seed

    unique = {r.request_id(fingerprint): r for r in requests}
    return [Prepared(r, rid, derived_seed(rid)) for rid, r in unique.items()]


def _run(backend, batch) -> tuple[int, int]:
    from synth_cpt.generation.backends import Feed

    tokens, failed = [0], [0]

    def on_result(p, gen) -> None:
        tokens[0] += gen.completion_tokens or 0
        failed[0] += gen.error is not None

    backend.generate(Feed(batch), on_result)
    return tokens[0], failed[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--chars", type=int, default=1400)
    args = parser.parse_args()

    from generation import build_requests

    from synth_cpt.generation.backends import VLLMBackend
    from synth_cpt.generation.serve import ServedBackend, find_server, servers_dir
    from synth_cpt.generation.settings import LLMSettings

    home = tempfile.mkdtemp(prefix="bench-serve-")
    os.environ.setdefault("SYNTH_CPT_MODELS", str(Path.home() / ".cache" / "synth-cpt" / "bench-models"))
    settings = LLMSettings(speculative="off")
    model_path, identity = settings.resolve_model(home)
    fingerprint = settings.model_fingerprint(identity)
    requests = build_requests(args.requests, args.chars)
    batch = _prepared(requests, fingerprint)
    shares = [batch[i :: args.partitions] for i in range(args.partitions)]
    print(f"{len(batch)} distinct requests in {args.partitions} runs, model {identity}")

    started = time.monotonic()
    base_tokens = base_failed = loads = 0
    for share in shares:
        backend = VLLMBackend(model_path, settings.engine_args())
        backend.prepare(share)
        loads += backend.loads
        t, f = _run(backend, share)
        base_tokens, base_failed = base_tokens + t, base_failed + f
        backend.close()
    baseline_s = time.monotonic() - started
    print(f"baseline: {baseline_s:.1f} s, {loads} loads, {base_tokens:,} output tokens, {base_failed} failed")

    env = {**os.environ, "SYNTH_CPT_HOME": home, "SYNTH_CPT_CONFIG": ""}
    started = time.monotonic()
    server = subprocess.Popen(
        [str(Path(sys.executable).with_name("synth-cpt")), "serve", "--port", "8099"], env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        record = None
        while record is None:
            if server.poll() is not None:
                raise SystemExit("synth-cpt serve exited; run it by hand to see why")
            record = find_server(servers_dir(home), fingerprint, wait_s=900)
            time.sleep(0.5)
        load_s = time.monotonic() - started
        ours_tokens = ours_failed = 0
        for share in shares:
            t, f = _run(ServedBackend(record, concurrency=settings.concurrency, timeout_s=settings.timeout_s), share)
            ours_tokens, ours_failed = ours_tokens + t, ours_failed + f
        ours_s = time.monotonic() - started
    finally:
        server.terminate()
        server.wait(120)
    print(f"ours: {ours_s:.1f} s ({load_s:.1f} s loading the server), 1 load, {ours_tokens:,} output tokens, {ours_failed} failed")
    print(f"RESULT serve ratio={baseline_s / ours_s:.2f} loads_baseline={loads} loads_ours=1 tok_s={ours_tokens / ours_s:.1f}")


if __name__ == "__main__":
    main()
