"""Debian packages some tests run for real (nginx, systemd-analyze), installed on first use.

CI is a fresh Debian machine where tests run as root: a missing package is
installed with apt-get, never skipped.  Elsewhere (no root, no apt) the test
fails with the command that installs it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
from pathlib import Path

import pytest

_lock = threading.Lock()
_updated = False
_POLICY = Path("/usr/sbin/policy-rc.d")  # exit 101: the package's service is not started by its postinst


def ensure_binary(binary: str, package: str) -> str:
    """The path of ``binary``; installs Debian ``package`` first when it is missing."""
    global _updated
    search = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    found = shutil.which(binary, path=search)
    if found:
        return found
    with _lock:
        if os.geteuid() != 0 or not shutil.which("apt-get"):
            pytest.fail(f"{binary} is missing: run `apt-get install {package}` (as root) first")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        if not _updated:
            subprocess.run(["apt-get", "update", "-qq"], env=env, check=True, timeout=300, capture_output=True)
            _updated = True
        # An nginx started by the package's postinst would hold port 80 and outlive the tests.
        policy_added = not _POLICY.exists()
        if policy_added:
            _POLICY.write_text("#!/bin/sh\nexit 101\n")
            _POLICY.chmod(0o755)
        try:
            result = subprocess.run(
                ["apt-get", "install", "-y", "-qq", "--no-install-recommends", package],
                env=env,
                timeout=600,
                capture_output=True,
                text=True,
                check=False,
            )
        finally:
            if policy_added:
                _POLICY.unlink()
        if result.returncode != 0:
            pytest.fail(f"apt-get install {package} failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    found = shutil.which(binary, path=search)
    if not found:
        pytest.fail(f"apt-get installed {package} but {binary} is not on PATH")
    return found
