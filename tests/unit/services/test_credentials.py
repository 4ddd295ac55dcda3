"""credentials: password hashing and the register input checks; no network, no loop."""

from __future__ import annotations

from typing import Any

import pytest
from argon2 import PasswordHasher

from chatd.core.errors import BadRequest
from chatd.services import credentials

# -- passwords --------------------------------------------------------------


def test_password_hash_verify_round_trip() -> None:
    h = credentials.hash_password("correct horse")
    assert h.startswith("$argon2id$")
    assert credentials.verify_password(h, "correct horse") is True
    assert credentials.verify_password(h, "correct horsE") is False
    assert credentials.needs_rehash(h) is False
    assert credentials.hash_password("correct horse") != h  # salted


@pytest.mark.parametrize("bad_hash", ["", "not-a-hash", "$argon2id$v=19$m=65536,t=3,p=4$garbage", "$2b$12$abcdefghijk"])
def test_verify_password_malformed_hash_is_false(bad_hash: str) -> None:
    assert credentials.verify_password(bad_hash, "whatever1") is False


def test_needs_rehash_for_other_parameters_and_malformed() -> None:
    weak = PasswordHasher(time_cost=1, memory_cost=8192, parallelism=1).hash("pw123456")
    assert credentials.verify_password(weak, "pw123456") is True  # old hashes still verify
    assert credentials.needs_rehash(weak) is True
    assert credentials.needs_rehash("garbage") is True


def test_dummy_hash_is_lazy_constant_and_never_matches() -> None:
    first = credentials.DUMMY_HASH
    assert first.startswith("$argon2id$")
    assert credentials.DUMMY_HASH is first  # computed once
    assert credentials.needs_rehash(first) is False  # same cost as real hashes
    assert credentials.dummy_verify("anything at all") is False
    with pytest.raises(AttributeError):
        _ = credentials.NO_SUCH_NAME


# -- register input ---------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("  Ann@Example.com ", "Ann@Example.com"),
        ("a@b.co", "a@b.co"),
        ("x+tag@mail.example.org", "x+tag@mail.example.org"),
    ],
)
def test_validate_email_ok(raw: str, expected: str) -> None:
    assert credentials.validate_email(raw) == expected


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (None, "email must be a string"),
        ("   ", "email is required"),
        ("a" * 250 + "@b.co", "email must be at most 254 characters"),
        ("ann.example.com", "email must be an address like name@example.com"),
        ("@example.com", "email must be an address like name@example.com"),
        ("ann@", "email must be an address like name@example.com"),
        ("ann@localhost", "email must be an address like name@example.com"),
        ("a@b@example.com", "email must be an address like name@example.com"),
        ("ann@.example.com", "email must be an address like name@example.com"),
        ("ann@example.com.", "email must be an address like name@example.com"),
        ("ann@example..com", "email must be an address like name@example.com"),
        ("an n@example.com", "email must be an address like name@example.com"),
        ("ann@exa\x00mple.com", "email must be an address like name@example.com"),
    ],
)
def test_validate_email_rejects(raw: Any, message: str) -> None:
    with pytest.raises(BadRequest) as info:
        credentials.validate_email(raw)
    assert info.value.message == message


def test_validate_email_length_boundary() -> None:
    at_limit = "a" * 248 + "@b.com"
    assert len(at_limit) == 254
    assert credentials.validate_email(at_limit) == at_limit


@pytest.mark.parametrize("raw", ["12345678", " spaces  ", "é" * 8, "p" * 1024])
def test_validate_password_ok_and_unstripped(raw: str) -> None:
    assert credentials.validate_password(raw) == raw


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (None, "password must be a string"),
        (12345678, "password must be a string"),
        ("1234567", "password must be at least 8 characters"),
        ("", "password must be at least 8 characters"),
        ("p" * 1025, "password must be at most 1024 characters"),
    ],
)
def test_validate_password_rejects(raw: Any, message: str) -> None:
    with pytest.raises(BadRequest) as info:
        credentials.validate_password(raw)
    assert info.value.message == message


@pytest.mark.parametrize(
    ("raw", "expected"), [(" Ann ", "Ann"), ("x", "x"), ("n" * 100, "n" * 100), ("Zoë 🙂", "Zoë 🙂")]
)
def test_validate_name_ok(raw: str, expected: str) -> None:
    assert credentials.validate_name(raw) == expected


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (None, "name must be a string"),
        ("", "name must not be empty"),
        ("  \t ", "name must not be empty"),
        ("n" * 101, "name must be at most 100 characters"),
        ("Ann\nBob", "name must not contain control characters"),
    ],
)
def test_validate_name_rejects(raw: Any, message: str) -> None:
    with pytest.raises(BadRequest) as info:
        credentials.validate_name(raw)
    assert info.value.message == message
