"""Generation throughput on rewrites: one raw `vllm.LLM.chat` call against our engine with its
defaults, same requests, same per-request seeds, and what each part of ours gives, measured apart.

Requests: ~300-token passages of the sample corpus (Portuguese and English), each rewritten with one
of the four `prompts/rewrite/*.yaml` styles using the prompt file's own sampling (temperature 0.7,
top_p 0.9, max_tokens 512: room to rewrite the whole passage); 1 in 8 requests is an exact duplicate
of another (a document in two subsets, a rerun of an overlapping selection).

Passes (the prefix cache is reset before each; tok/s counts the output tokens delivered for every
request, duplicates included, so sending a duplicate once is a gain):
  raw        engine without speculation, one `LLM.chat` over all requests as given
  +dedup     same engine, one `LLM.chat` over the distinct requests
  +order     same engine, our `GenerationEngine` (dedup, prefix-grouped and length order, stepped
             engine, background checkpoints to the cache)
  ours       our defaults: `GenerationEngine` with the engine loaded by `LLM(speculative="auto")`:
             n-gram speculation when the rewrite prompts (which ask for it) are decoded greedily,
             none when they are sampled (there it costs more than it saves on CPU)
Then `ours` runs again on the same cache, which must send zero requests.

    python benchmarks/generation.py [--requests 96] [--chars 1400] [--temperature 0]

Last line: RESULT generation ratio=<ours/raw> tok_s=<ours> rerun_requests=<n>
"""

from __future__ import annotations

import argparse
import gc
import gzip
import json
import random
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DROPS = REPO / "synth_cpt" / "sample_corpus" / "drops"


def passages(chars: int) -> list[str]:
    """Whole paragraphs of the sample corpus packed to about `chars` characters (~300 tokens at 1400)."""
    docs = []
    for name in ("2026-11-01_pt_gimp-help.jsonl.gz", "2026-11-01_en_gimp-help.jsonl.gz"):
        path = DROPS / name
        if path.exists():
            with gzip.open(path) as f:
                docs += [json.loads(line)["text"] for line in f]
    out = []
    for text in docs:
        if len(text) >= chars * 0.7:
            cut = text[:chars]
            out.append(cut[: cut.rfind(" ")] if len(text) > chars else cut)
    return out


def build_requests(n: int, chars: int, temperature: float | None = None):
    import dataclasses

    from synth_cpt.synthesis.prompts import load_prompt

    prompts = [load_prompt("rewrite", name) for name in ("easy", "medium", "hard", "qa")]
    texts = passages(chars)
    unique = n - n // 8
    requests = [prompts[i % len(prompts)].request("en", text=texts[(i // len(prompts)) % len(texts)]) for i in range(unique)]
    if temperature is not None:  # e.g. 0: faithful rewriting, decoded greedily
        requests = [dataclasses.replace(r, sampling=dataclasses.replace(r.sampling, temperature=temperature)) for r in requests]
    rng = random.Random(0)
    requests += [requests[rng.randrange(unique)] for _ in range(n - unique)]
    rng.shuffle(requests)
    return requests


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=96)
    parser.add_argument("--chars", type=int, default=1400)
    parser.add_argument("--temperature", type=float, help="override the prompt files' temperature (0: greedy)")
    args = parser.parse_args()

    from vllm import LLM as VLLM

    from synth_cpt.core.storage import LocalStorage
    from synth_cpt.generation.backends import Prepared, VLLMBackend
    from synth_cpt.generation.cache import GenerationCache
    from synth_cpt.generation.engine import GenerationEngine
    from synth_cpt.generation.requests import derived_seed
    from synth_cpt.generation.settings import LLMSettings as LLM

    requests = build_requests(args.requests, args.chars, args.temperature)
    resource = LLM()
    model_path, identity = resource.resolve_model(str(REPO / ".synth_cpt_home"))
    fingerprint = resource.model_fingerprint(identity)
    prepared = [Prepared(r, r.request_id(fingerprint), derived_seed(r.request_id(fingerprint))) for r in requests]
    distinct = list({p.request_id: p for p in prepared}.values())
    print(f"model {identity}, {len(requests)} requests ({len(distinct)} distinct), sampling {requests[0].sampling}", flush=True)
    figures: dict[str, tuple[float, int]] = {}

    def delivered(tokens_by_id: dict[str, int]) -> int:
        return sum(tokens_by_id[p.request_id] for p in prepared)

    def chat(llm, backend, batch) -> list[int]:
        outs = llm.chat([p.request.message_dicts() for p in batch], [backend.sampling_params(p) for p in batch], use_tqdm=False)
        return [len(o.outputs[0].token_ids) for o in outs]

    with tempfile.TemporaryDirectory(prefix="synth-cpt-genbench-") as tmp:
        t = time.perf_counter()
        llm = VLLM(model=model_path, **resource.engine_args())
        print(f"engine (no speculation) loaded in {time.perf_counter() - t:.1f} s", flush=True)
        plain = VLLMBackend(model_path, resource.engine_args(), llm=llm)

        llm.reset_prefix_cache()
        t = time.perf_counter()
        raw = chat(llm, plain, prepared)  # every request generated, duplicates included
        figures["raw"] = (time.perf_counter() - t, sum(raw))

        llm.reset_prefix_cache()
        t = time.perf_counter()
        dedup = chat(llm, plain, distinct)
        figures["+dedup"] = (time.perf_counter() - t, delivered({p.request_id: n for p, n in zip(distinct, dedup, strict=True)}))

        def engine(backend, root) -> GenerationEngine:
            return GenerationEngine(
                backend, GenerationCache(LocalStorage(root)), model=identity, model_fingerprint=fingerprint,
                flush_every=resource.flush_every, flush_seconds=resource.flush_seconds,
            )  # fmt: skip

        llm.reset_prefix_cache()
        t = time.perf_counter()
        engine(plain, f"{tmp}/order").run(requests)
        elapsed = time.perf_counter() - t
        rows = engine(plain, f"{tmp}/order").results(requests)
        figures["+order"] = (elapsed, delivered(dict(zip(rows["request_id"], rows["completion_tokens"], strict=True))))

        del plain, llm
        gc.collect()
        ours_backend = resource.build_backend(model_path)  # speculative="auto": loads with n-gram speculation
        t = time.perf_counter()
        ours_backend.prepare(prepared)
        print(
            f"engine ({'n-gram speculation' if 'speculative_config' in ours_backend.engine_args else 'no speculation'}) "
            f"loaded in {time.perf_counter() - t:.1f} s",
            flush=True,
        )
        t = time.perf_counter()
        engine(ours_backend, f"{tmp}/ours").run(requests)
        elapsed = time.perf_counter() - t
        rows = engine(ours_backend, f"{tmp}/ours").results(requests)
        figures["ours"] = (elapsed, delivered(dict(zip(rows["request_id"], rows["completion_tokens"], strict=True))))
        rerun = engine(VLLMBackend(model_path, resource.engine_args()), f"{tmp}/ours").run(requests)

    print(f"{'pass':8} {'seconds':>8} {'output tokens':>14} {'tok/s':>8} {'vs previous':>12}")
    previous = None
    for name, (seconds, tokens) in figures.items():
        rate = tokens / seconds
        step = f"x{rate / previous:.2f}" if previous else ""
        print(f"{name:8} {seconds:8.1f} {tokens:14,} {rate:8.1f} {step:>12}")
        previous = rate
    raw_rate = figures["raw"][1] / figures["raw"][0]
    ours_rate = figures["ours"][1] / figures["ours"][0]
    print(f"rerun: {rerun.sent} sent, {rerun.cache_hits} from the cache")
    print(f"RESULT generation ratio={ours_rate / raw_rate:.2f} tok_s={ours_rate:.1f} rerun_requests={rerun.sent}")


if __name__ == "__main__":
    main()
