"""The GPU check fits in one call of the lent machine: the timeouts of its steps sum to less than the
10 minutes one command may run, with room for the install."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PER_CALL_LIMIT_S = 600
INSTALL_ROOM_S = 30


def test_gpu_check_timeouts_fit_one_call():
    script = (ROOT / ".ci" / "gpu").read_text()
    loop = re.compile(r"^for \w+ in ([^;]+); do", re.M)
    loops = {m.start(): len(m.group(1).split()) for m in loop.finditer(script)}
    total = 0
    for match in re.finditer(r"^( *)timeout (\d+) ", script, re.M):
        inside = match.group(1) and [n for start, n in loops.items() if start < match.start()]
        total += int(match.group(2)) * (inside[-1] if inside else 1)
    assert total > 0
    assert total + INSTALL_ROOM_S <= PER_CALL_LIMIT_S, f"the steps' timeouts sum to {total} s"
