"""The web app's JavaScript modules (chatd/static/js) under Node's built-in test runner: tests/js/*.test.mjs.

The browser tests (tests/integration/test_webapp.py) drive the whole app; these check the pure modules
(send pacing, frame limits, the outbox, typing, permissions, error words) case by case, in ~1 s.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.system_packages import ensure_binary

ROOT = Path(__file__).resolve().parents[2]


def test_javascript_modules() -> None:
    node = ensure_binary("node", "nodejs")
    files = sorted(str(p) for p in (ROOT / "tests" / "js").glob("*.test.mjs"))
    assert files
    proc = subprocess.run([node, "--test", *files], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert "# fail 0" in proc.stdout
