"""What the side-by-side benchmarks share: each side runs in a fresh process of the calling script, and
reports its figures (and its peak memory) as the last line of its output."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def peak_rss_mb() -> float:
    """This process' peak RSS so far (VmHWM)."""
    status = Path("/proc/self/status").read_text()
    return int(next(x for x in status.splitlines() if x.startswith("VmHWM:")).split()[1]) / 1024


def measure(script: str, which: str, *args: object, cwd: Path | None = None) -> dict:
    """Run `script --child which args...` in a fresh process; its last line of output is a JSON object."""
    cmd = [sys.executable, script, "--child", which, *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=cwd)
    if proc.returncode != 0:
        raise SystemExit(f"{which} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
