"""Credentials: password hashing (Argon2id, pinned parameters) and the checks of what a user registers with.

Pure logic: no sockets, no event loop, no Redis or Postgres; the REST models (``chatd.api.bodies``) check the
shape of a body first, these checks stay for every other caller (the CLI's ``create-user``).
"""

from __future__ import annotations

import re
import threading
import unicodedata
import uuid
from typing import Any, Final

from argon2 import PasswordHasher, profiles
from argon2.exceptions import InvalidHashError, VerificationError

from chatd.core.errors import BadRequest

# ---------------------------------------------------------------------------
# Passwords
# ---------------------------------------------------------------------------

# Pinned to the RFC 9106 low-memory Argon2id profile (t=3, m=64 MiB, p=4)
# rather than "whatever the library defaults to", so needs_rehash() only fires
# when *we* change the parameters.
_hasher: Final = PasswordHasher.from_parameters(profiles.RFC_9106_LOW_MEMORY)


def hash_password(password: str) -> str:
    """Argon2id hash (PHC string) of ``password``.

    CPU- and memory-heavy (~64 MiB, tens of ms): run it in a thread executor,
    never on the event loop.
    """
    return _hasher.hash(password)


def verify_password(hash: str, password: str) -> bool:
    """True when ``password`` matches ``hash``.

    False on mismatch and on a malformed or non-Argon2 hash; never raises for a
    wrong password.  CPU-heavy like ``hash_password``: run it in a thread
    executor.
    """
    if not isinstance(hash, str) or not isinstance(password, str):
        return False
    try:
        return _hasher.verify(hash, password)
    except (VerificationError, InvalidHashError):
        return False


def needs_rehash(hash: str) -> bool:
    """True when ``hash`` was made with other parameters than today's.

    Call after a successful ``verify_password`` and store ``hash_password(pw)``.
    A malformed hash also answers True: it should be replaced.
    """
    try:
        return _hasher.check_needs_rehash(hash)
    except (InvalidHashError, ValueError, TypeError):
        return True


_dummy_lock = threading.Lock()
_dummy_hash: str | None = None

# Declared for type checkers; the value is made on first access by __getattr__
# below because hashing at import would cost every process start ~50 ms.
DUMMY_HASH: str


def _get_dummy_hash() -> str:
    global _dummy_hash
    if _dummy_hash is None:
        with _dummy_lock:  # executor threads may race on the first login
            if _dummy_hash is None:
                _dummy_hash = _hasher.hash(uuid.uuid4().hex)
    return _dummy_hash


def __getattr__(name: str) -> Any:
    if name == "DUMMY_HASH":
        return _get_dummy_hash()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def dummy_verify(password: str) -> bool:
    """Spend the time of a real ``verify_password``; always False.

    For a login with an unknown email, so response time does not reveal which
    emails are registered.  Run it in the executor like ``verify_password``
    (the first call also computes ``DUMMY_HASH``).
    """
    verify_password(_get_dummy_hash(), password)
    return False


# ---------------------------------------------------------------------------
# Register input
# ---------------------------------------------------------------------------

MAX_EMAIL_CHARS: Final = 254  # RFC 5321 path limit
MIN_PASSWORD_CHARS: Final = 8
MAX_PASSWORD_CHARS: Final = 1024  # bounds hashing cost of hostile input
MAX_NAME_CHARS: Final = 100

_SPACE_OR_CONTROL = re.compile(r"[\s\x00-\x1f\x7f]")


def validate_email(s: object) -> str:
    """``s`` stripped, if it looks like ``local@domain.tld``; else BadRequest.

    Deliberately loose (the address is proven by use, not by regex) and case
    is kept: uniqueness is case-insensitive in SQL.
    """
    if not isinstance(s, str):
        raise BadRequest("email must be a string")
    email = s.strip()
    if not email:
        raise BadRequest("email is required")
    if len(email) > MAX_EMAIL_CHARS:
        raise BadRequest(f"email must be at most {MAX_EMAIL_CHARS} characters")
    local, at, domain = email.partition("@")
    if (
        not at
        or not local
        or "@" in domain
        or "." not in domain
        or domain.startswith(".")
        or domain.endswith(".")
        or ".." in domain
        or _SPACE_OR_CONTROL.search(email)
    ):
        raise BadRequest("email must be an address like name@example.com")
    return email


def validate_password(s: object) -> str:
    """``s`` unchanged (never stripped: spaces are part of a password) or BadRequest."""
    if not isinstance(s, str):
        raise BadRequest("password must be a string")
    if len(s) < MIN_PASSWORD_CHARS:
        raise BadRequest(f"password must be at least {MIN_PASSWORD_CHARS} characters")
    if len(s) > MAX_PASSWORD_CHARS:
        raise BadRequest(f"password must be at most {MAX_PASSWORD_CHARS} characters")
    return s


def validate_name(s: object) -> str:
    """Display name, stripped, 1..100 characters, no control characters."""
    if not isinstance(s, str):
        raise BadRequest("name must be a string")
    name = s.strip()
    if not name:
        raise BadRequest("name must not be empty")
    if len(name) > MAX_NAME_CHARS:
        raise BadRequest(f"name must be at most {MAX_NAME_CHARS} characters")
    # Newlines and escapes in a name would break every client's layout.
    if any(unicodedata.category(ch) == "Cc" for ch in name):
        raise BadRequest("name must not contain control characters")
    return name


