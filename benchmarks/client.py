"""The generation client at fleet scale: can one run keep a fleet of `vllm serve` replicas busy from 2 cores?

A local OpenAI-compatible server answers every chat completion instantly (a canned body, its own process, raw
asyncio: it is not what is measured). Against it, the same requests with `--in-flight` requests in flight:
  baseline   the official `openai` SDK (AsyncOpenAI, one task per request under a semaphore: what a user
             would write), results kept in a list
  ours       `OpenAIBackend.generate` (synth-cpt's client: retries, failover, deadlines, per-request ids),
             results handed to a callback as the engine does
Throughput is requests per second of each; memory is this process's peak RSS after `--requests` and after
three times as many, every request list built beforehand (bounded: the growth ratio stays near 1).

    python benchmarks/client.py [--requests 20000] [--in-flight 1024]

Last line: RESULT client req_s=<ours> peak_rss_mb=<ours, 3x requests> growth=<rss 3x / rss 1x> ratio=<ours / baseline>
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import resource
import subprocess
import sys
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SERVER = textwrap.dedent(
    """
    import asyncio, json, sys

    BODY = json.dumps({"id": "x", "object": "chat.completion", "created": 0, "model": "bench",
                       "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
                       "usage": {"prompt_tokens": 12, "completion_tokens": 1, "total_tokens": 13}}).encode()
    RESPONSE = (b"HTTP/1.1 200 OK\\r\\nContent-Type: application/json\\r\\nContent-Length: "
                + str(len(BODY)).encode() + b"\\r\\n\\r\\n" + BODY)

    class Chat(asyncio.Protocol):
        def connection_made(self, transport):
            self.transport, self.buffer = transport, b""

        def data_received(self, data):
            self.buffer += data
            while True:  # every complete request in the buffer (pipelined or not) gets the canned answer
                head_end = self.buffer.find(b"\\r\\n\\r\\n")
                if head_end < 0:
                    return
                head = self.buffer[:head_end].lower()
                at = head.find(b"content-length:")
                length = int(head[at + 15:].split(b"\\r\\n", 1)[0]) if at >= 0 else 0
                if len(self.buffer) < head_end + 4 + length:
                    return
                self.buffer = self.buffer[head_end + 4 + length:]
                self.transport.write(RESPONSE)

    async def main():
        server = await asyncio.get_running_loop().create_server(Chat, "127.0.0.1", 0, backlog=4096)
        print(server.sockets[0].getsockname()[1], flush=True)
        await server.serve_forever()

    asyncio.run(main())
    """
)


def _prepared(n: int, offset: int = 0) -> list:
    from synth_cpt.generation.backends import Prepared
    from synth_cpt.generation.requests import ChatRequest, Sampling

    sampling = Sampling(temperature=0.7, max_tokens=64)
    return [
        Prepared(ChatRequest.chat([{"role": "user", "content": f"Rewrite document {i}: {'palavra ' * (i % 9)}"}], sampling), f"r{i}", i)
        for i in range(offset, offset + n)
    ]


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def baseline(url: str, requests: list, in_flight: int) -> float:
    """The openai SDK: the requests per second."""
    import httpx
    from openai import AsyncOpenAI

    async def run() -> int:
        limits = httpx.Limits(max_connections=in_flight, max_keepalive_connections=in_flight)
        client = AsyncOpenAI(base_url=url, api_key="unused", max_retries=3, http_client=httpx.AsyncClient(limits=limits))
        gate = asyncio.Semaphore(in_flight)
        results = []

        async def one(p) -> None:
            async with gate:
                resp = await client.chat.completions.create(model="bench", messages=p.request.messages, max_tokens=64, temperature=0.7)
                results.append(resp.choices[0].message.content)

        await asyncio.gather(*(one(p) for p in requests))
        await client.close()
        return len(results)

    started = time.perf_counter()
    done = asyncio.run(run())
    assert done == len(requests)
    return len(requests) / (time.perf_counter() - started)


def ours(url: str, requests: list, in_flight: int) -> float:
    """synth-cpt's OpenAIBackend: the requests per second."""
    from synth_cpt.generation.backends import Feed, OpenAIBackend

    backend = OpenAIBackend([url], "bench", concurrency=in_flight, timeout_s=60, max_attempts=4)
    answered = [0]

    def on_result(p, gen) -> None:
        assert gen.error is None, gen.error
        answered[0] += 1

    started = time.perf_counter()
    backend.generate(Feed(requests), on_result)
    assert answered[0] == len(requests)
    return len(requests) / (time.perf_counter() - started)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=20000)
    ap.add_argument("--in-flight", type=int, default=1024)
    args = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, 65536)), hard))  # 1,024 sockets each side
    server = subprocess.Popen([sys.executable, "-c", SERVER], stdout=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{int(server.stdout.readline())}/v1"
        print(f"instant server at {url}; {args.requests:,} requests, {args.in_flight:,} in flight; {os.cpu_count()} cores", flush=True)
        # every request list is built first, so the peak RSS after each run is the client's own (not the lists')
        warm, first, second = _prepared(2000, 10**7), _prepared(args.requests), _prepared(3 * args.requests, args.requests)
        ours(url, warm, args.in_flight)  # warm-up: imports, the first connections
        gc.collect()
        ours_1x = ours(url, first, args.in_flight)
        rss_1x = _peak_rss_mb()
        ours_3x = ours(url, second, args.in_flight)
        rss_3x = _peak_rss_mb()
        print(f"ours: {ours_1x:,.0f} req/s over {args.requests:,} (peak RSS {rss_1x:.0f} MB), "
              f"{ours_3x:,.0f} req/s over {3 * args.requests:,} (peak RSS {rss_3x:.0f} MB)", flush=True)  # fmt: skip
        base = baseline(url, _prepared(args.requests, 10**8), args.in_flight)
        print(f"baseline (openai SDK {__import__('openai').__version__}): {base:,.0f} req/s over {args.requests:,}", flush=True)
    finally:
        server.kill()
        server.wait()
    req_s = min(ours_1x, ours_3x)
    print(json.dumps({"ours_req_s": round(req_s), "baseline_req_s": round(base), "peak_rss_mb": round(rss_3x)}))
    print(f"RESULT client req_s={req_s:.0f} peak_rss_mb={rss_3x:.0f} growth={rss_3x / rss_1x:.2f} ratio={req_s / base:.2f}")


if __name__ == "__main__":
    main()
