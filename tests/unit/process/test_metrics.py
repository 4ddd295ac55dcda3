"""Metric labels that come from a client stay within a fixed set."""

from __future__ import annotations

import pytest

from chatd.process.metrics import CLIENT_CLOSE_LABELS, client_close_label
from chatd.realtime.wsconn import valid_close_code


@pytest.mark.parametrize(
    ("code", "label"),
    [
        (None, "1006"),  # no close frame, or one without a code
        (1000, "1000"),
        (1001, "1001"),
        (1002, "1002"),
        (1003, "1003"),
        (1007, "1007"),
        (1008, "1008"),
        (1009, "1009"),
        (1010, "1010"),
        (1011, "1011"),
        (1012, "1012"),
        (1013, "1013"),
        (1014, "1014"),
        (3000, "other"),
        (4001, "other"),  # chatd's own codes, when a client sends them
        (4999, "other"),
        (0, "invalid"),
        (999, "invalid"),
        (1004, "invalid"),
        (1005, "invalid"),  # reserved: never in a close frame
        (1006, "invalid"),
        (1015, "invalid"),
        (1016, "invalid"),
        (2999, "invalid"),
        (5000, "invalid"),
        (65535, "invalid"),
    ],
)
def test_client_close_codes_are_bucketed(code: int | None, label: str) -> None:
    assert client_close_label(code) == label


def test_every_code_maps_into_a_fixed_set_and_valid_ones_are_never_invalid() -> None:
    labels = {client_close_label(code) for code in [None, *range(65536)]}
    assert labels == set(CLIENT_CLOSE_LABELS) and len(CLIENT_CLOSE_LABELS) == 15  # exported at 0 by set_worker
    assert all(client_close_label(code) != "invalid" for code in range(65536) if valid_close_code(code))
