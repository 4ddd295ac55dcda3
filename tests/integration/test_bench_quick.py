"""The benchmark harness's smoke run (issue 18): `loadtest/bench.py --quick` runs every workload once at small
scale against the baseline, the websockets reference and chatd, and fails unless each produced its figures.

No speed is asserted (a loaded CI box is slow, and figures are taken on a quiet machine: docs/BENCHMARKS.md);
what this catches is a harness that no longer runs, or a figure that silently went missing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import ROOT

pytestmark = pytest.mark.slow


def test_quick_run_produces_every_figure(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")}  # its own services
    env["PYTHONPATH"] = str(ROOT)
    result = subprocess.run(
        [sys.executable, str(ROOT / "loadtest" / "bench.py"), "--quick", "--out-dir", str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=240, check=False,
    )
    assert result.returncode == 0, result.stderr[-4000:] + result.stdout[-2000:]
    assert "quick check: every target and workload produced its figures" in result.stderr

    [path] = tmp_path.glob("bench-*.json")
    report = json.loads(path.read_text())
    assert report["quick"] and len(report["runs"]) == 1
    targets = report["targets"]
    assert set(targets) == {"baseline", "websockets", "chatd-1w"}
    chatd = targets["chatd-1w"]
    # The figures this issue added, on chatd: all-in CPU beside the server's own, and the overload step with
    # refused sends retried until acked (the quick run's small commit queue lets chatd refuse some under load).
    assert chatd["fanout"]["allin_cpu_s_per_1m_msgs"] >= chatd["fanout"]["server_cpu_s_per_1m_msgs"] > 0
    step = chatd["overload"]["steps"][0]
    assert step["acked"] > 0 and step["final_ack_ms"]["n"] > 0
    # Every message offered is accounted for: finally acked (after this many tries) or reported never acked.
    assert step["offered"] == sum(step["tries"].values()) + step["never_acked"]
    assert report["ratios"]["chatd-1w/baseline"]["fanout_allin_cpu_s_per_1m_msgs"] is not None
    assert report["ratios"]["chatd-1w/websockets"]["fanout_cpu_s_per_1m_msgs"] is not None
    md = (tmp_path / "latest.md").read_text()
    assert "all-in CPU s / 1M msgs" in md and "6. Overload" in md
