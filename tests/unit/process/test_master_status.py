"""The master's status line reads the workers' multiprocess metric files while workers come and go."""

from __future__ import annotations

from pathlib import Path

import pytest

from chatd.process import metrics
from chatd.process.master import _open_connections


def test_a_metric_file_not_yet_sized_skips_the_count(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A worker starting creates its file empty and sizes it a moment later; the master's status read in
    # between raised struct.error and the master exited (seen once in CI, test_cli's master SIGKILL test).
    monkeypatch.setenv(metrics.ENV, str(tmp_path))
    (tmp_path / "gauge_livesum_4242.db").write_bytes(b"")
    assert _open_connections() is None


def test_without_metric_files_the_count_is_zero(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(metrics.ENV, str(tmp_path))
    assert _open_connections() == 0
