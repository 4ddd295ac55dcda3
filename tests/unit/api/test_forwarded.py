"""Client address behind proxies: X-Forwarded-For counts only from server.trusted_proxies."""

from __future__ import annotations

import ipaddress

import pytest
from tornado.httputil import HTTPHeaders

from chatd.api.web import forwarded_client

TRUSTED = [ipaddress.ip_network("127.0.0.1/32"), ipaddress.ip_network("10.0.0.0/8")]


def headers(**values: str) -> HTTPHeaders:
    h = HTTPHeaders()
    for key, value in values.items():
        h.add(key.replace("_", "-"), value)
    return h


@pytest.mark.parametrize(
    ("peer", "hdrs", "client", "scheme"),
    [
        # the proxy appended what it saw: that is the client
        ("127.0.0.1", headers(X_Forwarded_For="203.0.113.7"), "203.0.113.7", None),
        # a client's own header further left is ignored
        ("127.0.0.1", headers(X_Forwarded_For="1.2.3.4, 203.0.113.7"), "203.0.113.7", None),
        # two trusted hops: skip both
        ("127.0.0.1", headers(X_Forwarded_For="203.0.113.7, 10.1.2.3"), "203.0.113.7", None),
        # an untrusted peer cannot choose its address
        ("198.51.100.9", headers(X_Forwarded_For="1.2.3.4", X_Real_IP="1.2.3.4"), "198.51.100.9", None),
        # no X-Forwarded-For: X-Real-IP
        ("10.0.0.5", headers(X_Real_IP="203.0.113.8"), "203.0.113.8", None),
        # garbage in the chain stops at the last address a trusted proxy vouched for
        ("127.0.0.1", headers(X_Forwarded_For="203.0.113.7, nonsense, 10.0.0.2"), "10.0.0.2", None),
        ("127.0.0.1", headers(X_Forwarded_For="2001:db8::1", X_Forwarded_Proto="https"), "2001:db8::1", "https"),
        ("127.0.0.1", headers(X_Forwarded_Proto="gopher"), "127.0.0.1", None),
    ],
)
def test_forwarded_client(peer: str, hdrs: HTTPHeaders, client: str, scheme: str | None) -> None:
    assert forwarded_client(peer, hdrs, TRUSTED) == (client, scheme)


def test_nothing_trusted_means_the_peer() -> None:
    assert forwarded_client("127.0.0.1", headers(X_Forwarded_For="1.2.3.4"), []) == ("127.0.0.1", None)


def test_several_header_lines_are_one_list() -> None:
    h = HTTPHeaders()
    h.add("X-Forwarded-For", "203.0.113.7")
    h.add("X-Forwarded-For", "10.0.0.3")
    assert forwarded_client("127.0.0.1", h, TRUSTED) == ("203.0.113.7", None)
