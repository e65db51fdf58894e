"""Generation throughput: one raw `vllm.LLM.chat` call against our engine, same engine, same requests.

256 chat requests are built from the sample corpus with the four rewrite prompts (styles share a
system prompt and instructions: shared prefixes), and 1 in 8 is an exact duplicate of another. Both
sides use the same loaded `vllm.LLM` (the embedded SmolLM2-135M on the CPU build by default, with
our resource's engine arguments) and the same per-request seeds; the prefix cache is reset before
each timed pass. Output tokens/s counts the tokens delivered for all 256 requests. Then our engine
runs again on the same cache, which must send zero requests.

    python benchmarks/generation.py [--requests 256] [--max-tokens 64]

Last line: RESULT generation ratio=<b/a> tok_s=<b> rerun_requests=<n>
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def build_requests(n: int, max_tokens: int):
    from synth_cpt.generation.requests import Sampling
    from synth_cpt.prompts import list_prompts, load_prompt

    drops = REPO / "synth_cpt" / "sample_corpus" / "drops"
    with gzip.open(drops / "2026-11-01_pt_gimp-help.jsonl.gz") as f:
        docs = [json.loads(line)["text"][:800] for line in f]
    prompts = [load_prompt("rewrite", name) for name in list_prompts("rewrite")]
    unique = n - n // 8
    requests = []
    for i in range(unique):
        p = prompts[i % len(prompts)]
        req = p.request(text=docs[i // len(prompts)])
        s = req.sampling
        requests.append(type(req)(req.messages, Sampling(s.temperature, s.top_p, max_tokens, s.stop, 0), req.prompt_name, req.prompt_sha))
    rng = random.Random(0)
    requests += [requests[rng.randrange(unique)] for _ in range(n - unique)]
    rng.shuffle(requests)
    return requests


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()

    from vllm import LLM as VLLM

    from synth_cpt.generation.backends import Prepared, VLLMBackend
    from synth_cpt.generation.cache import GenerationCache
    from synth_cpt.generation.engine import GenerationEngine
    from synth_cpt.generation.requests import derived_seed
    from synth_cpt.generation.resource import LLM
    from synth_cpt.storage import LocalStorage

    requests = build_requests(args.requests, args.max_tokens)
    with tempfile.TemporaryDirectory(prefix="synth-cpt-genbench-") as tmp:
        resource = LLM()
        model_path, identity = resource.resolve_model(str(REPO / ".synth_cpt_home"))
        fingerprint = resource.model_fingerprint(identity)
        print(f"model {identity}, {len(requests)} requests ({len({r.request_id(fingerprint) for r in requests})} unique)", flush=True)
        t = time.perf_counter()
        llm = VLLM(model=model_path, **resource.engine_args())
        print(f"engine loaded in {time.perf_counter() - t:.1f} s", flush=True)
        backend = VLLMBackend(model_path, resource.engine_args(), llm=llm)

        # (a) the raw call: every request as given, one LLM.chat
        prepared = [Prepared(r, r.request_id(fingerprint), derived_seed(r.request_id(fingerprint))) for r in requests]
        llm.reset_prefix_cache()
        t = time.perf_counter()
        outs = llm.chat([p.request.message_dicts() for p in prepared], [backend.sampling_params(p) for p in prepared], use_tqdm=False)
        raw_s = time.perf_counter() - t
        raw_tokens = sum(len(o.outputs[0].token_ids) for o in outs)

        # (b) our engine: dedup, prefix grouping, checkpointed batches
        def engine() -> GenerationEngine:
            return GenerationEngine(
                backend, GenerationCache(LocalStorage(tmp)), model=identity, model_fingerprint=fingerprint,
                flush_every=resource.flush_every, flush_seconds=resource.flush_seconds,
            )  # fmt: skip

        llm.reset_prefix_cache()
        t = time.perf_counter()
        first = engine().run(requests)
        ours_s = time.perf_counter() - t
        rows = engine().results(requests)
        per_request = dict(zip(rows["request_id"], rows["completion_tokens"], strict=True))
        ours_tokens = sum(per_request[p.request_id] for p in prepared)
        rerun = engine().run(requests)

    raw_tok_s, ours_tok_s = raw_tokens / raw_s, ours_tokens / ours_s
    print(f"{'':8} {'seconds':>8} {'sent':>6} {'output tokens':>14} {'tok/s':>8}")
    print(f"{'raw':8} {raw_s:8.1f} {len(requests):6} {raw_tokens:14,} {raw_tok_s:8.1f}")
    print(f"{'ours':8} {ours_s:8.1f} {first.sent:6} {ours_tokens:14,} {ours_tok_s:8.1f}")
    print(f"rerun: {rerun.sent} sent, {rerun.cache_hits} from the cache")
    print(f"RESULT generation ratio={ours_tok_s / raw_tok_s:.2f} tok_s={ours_tok_s:.1f} rerun_requests={rerun.sent}")


if __name__ == "__main__":
    main()
