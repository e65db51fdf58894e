"""A generation process for the crash and sharing tests: `python -m synth_cpt_tests.gen_worker ROOT N DELAY SENT_LOG [SCOPE]`."""

import sys

from synth_cpt.core.storage import LocalStorage
from synth_cpt.generation.cache import GenerationCache
from synth_cpt.generation.engine import GenerationEngine

from .doubles import DeterministicTestBackend, make_requests

FLUSH_EVERY = 10

if __name__ == "__main__":
    root, n, delay, sent_log = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
    engine = GenerationEngine(
        DeterministicTestBackend(delay_s=delay, sent_log=sent_log),
        GenerationCache(LocalStorage(root)),
        model="double",
        model_fingerprint="fp-double",
        flush_every=FLUSH_EVERY,
        flush_seconds=3600,
    )
    report = engine.run(make_requests(n), scope=sys.argv[5] if len(sys.argv) > 5 else None)
    print(report.sent, report.cache_hits)
