"""Many real users quickly: rows inserted in Postgres, real JWTs minted with the test secret."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from functools import cache

import psycopg

from chatd.process.config import AuthSettings
from chatd.services.credentials import hash_password
from chatd.services.tokens import TokenService
from tests.support import JWT_SECRET

PASSWORD = "password-123"


@cache
def _password_hash() -> str:
    return hash_password(PASSWORD)  # one Argon2 run shared by every test user


@cache
def _tokens() -> TokenService:
    return TokenService(AuthSettings(jwt_secret=JWT_SECRET))


@dataclass(frozen=True)
class User:
    id: int
    email: str
    token: str


def make_users(database_url: str, n: int, role: str = "user") -> list[User]:
    tag = uuid.uuid4().hex[:8]
    emails = [f"u{i}-{tag}@example.com" for i in range(n)]
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "INSERT INTO users (email, name, password_hash, role)"
            " SELECT e, split_part(e, '@', 1), %s, %s FROM unnest(%s::text[]) AS e RETURNING id, email",
            (_password_hash(), role, emails),
        ).fetchall()
    by_email = {email: uid for uid, email in rows}
    return [User(by_email[e], e, _tokens().mint_pair(by_email[e], role).access_token) for e in emails]
