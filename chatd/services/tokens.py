"""JWTs: minting and verifying chatd's tokens, and accepting an identity provider's.

Pure logic: no sockets, no event loop, no Redis or Postgres.  The only I/O is
reading ``auth.jwt_public_key_file`` once when a ``TokenService`` is built.
Callers check revocation (``Keys.denied_jti``, refresh families) in Redis and
the user's status in Postgres with the ``Claims`` returned here.

Tokens chatd mints are HMAC-signed (``auth.jwt_algorithm`` with
``auth.jwt_secret``).  Optionally, access tokens of an external identity
provider signed with RS*/PS*/ES*/EdDSA are accepted when their public key (PEM
or JWKS) is configured.  Which key verifies a token is decided by our own table
from the header's ``alg``/``kid``, never by the key type the token asks for.
"""

from __future__ import annotations

import json
import math
import re
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal, TypeAlias

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePublicKey
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey

from chatd.core.client_frames import MAX_TOKEN_CHARS
from chatd.core.errors import ConfigError, Unauthorized
from chatd.process.config import AuthSettings

TokenType: TypeAlias = Literal["access", "refresh"]

# ---------------------------------------------------------------------------
# Tokens
# ---------------------------------------------------------------------------

_HMAC_ALGS: Final = frozenset({"HS256", "HS384", "HS512"})
_RSA_ALGS: Final = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
_EC_ALG_BY_CURVE: Final[Mapping[str, str]] = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}
_MIN_RSA_BITS: Final = 2048
_MAX_SUB: Final = 2**63 - 1  # Postgres bigint
_SUB_RE: Final = re.compile(r"[1-9][0-9]{0,18}")  # ASCII only: str.isdigit() accepts "²"
# Keycloak marks its access tokens "Bearer"; other IdPs omit the claim.
_EXTERNAL_ACCESS_TYP: Final = frozenset({"access", "bearer"})

_PublicKey: TypeAlias = RSAPublicKey | EllipticCurvePublicKey | Ed25519PublicKey


@dataclass(frozen=True, slots=True)
class Claims:
    """What a verified token says; the caller still checks revocation and user status."""

    sub: int  # user id (a string in the JWT, RFC 7519)
    jti: str
    iat: int
    exp: int
    typ: TokenType
    role: str
    family: str | None = None  # refresh family; logout revokes it
    external: bool = False  # verified with the identity provider's key


@dataclass(frozen=True, slots=True)
class TokenPair:
    access_token: str
    refresh_token: str
    access: Claims
    refresh: Claims
    expires_in: int  # access token lifetime in seconds (OAuth2 token response)


@dataclass(frozen=True, slots=True)
class _VerifyKey:
    kid: str | None
    alg: str
    key: _PublicKey


class _FixedKeyHMAC(jwt.algorithms.HMACAlgorithm):
    """PyJWT's HMAC, remembering prepared keys.

    PyJWT re-checks an HMAC key on every verify (is it PEM, SSH, DER, a JWK?):
    about a third of a token check, and chatd verifies with one fixed secret.
    """

    def __init__(self, hash_alg: Any) -> None:
        super().__init__(hash_alg)
        self._prepared: dict[bytes, bytes] = {}

    def prepare_key(self, key: str | bytes) -> bytes:
        raw = key.encode() if isinstance(key, str) else key
        prepared = self._prepared.get(raw)
        if prepared is None:
            prepared = super().prepare_key(raw)  # rejects asymmetric keys, as PyJWT does
            if len(self._prepared) < 8:  # chatd's own secret(s): a handful at most
                self._prepared[raw] = prepared
        return prepared


_HASHES: Final = {
    "HS256": jwt.algorithms.HMACAlgorithm.SHA256,
    "HS384": jwt.algorithms.HMACAlgorithm.SHA384,
    "HS512": jwt.algorithms.HMACAlgorithm.SHA512,
}


def _use_fixed_key_hmac(alg: str) -> None:
    """Register ``_FixedKeyHMAC`` for ``alg`` with PyJWT (documented API; once per process)."""
    if not isinstance(jwt.api_jws.get_algorithm_by_name(alg), _FixedKeyHMAC):
        jwt.unregister_algorithm(alg)
        jwt.register_algorithm(alg, _FixedKeyHMAC(_HASHES[alg]))


class TokenService:
    """Mints chatd's tokens and verifies chatd's and the identity provider's tokens."""

    def __init__(self, settings: AuthSettings, clock: Callable[[], float] = time.time) -> None:
        if not settings.jwt_secret:
            # An empty HMAC key lets anyone mint tokens.
            raise ConfigError("auth.jwt_secret", "must not be empty")
        if settings.jwt_algorithm not in _HMAC_ALGS:
            raise ConfigError("auth.jwt_algorithm", f"must be one of {', '.join(sorted(_HMAC_ALGS))}")
        self._settings = settings
        self._clock = clock
        self._secret = settings.jwt_secret.encode()
        self._alg = settings.jwt_algorithm
        _use_fixed_key_hmac(self._alg)
        self._public_keys: tuple[_VerifyKey, ...] = (
            _load_public_keys(settings.jwt_public_key_file) if settings.jwt_public_key_file else ()
        )

    @property
    def external_keys(self) -> tuple[tuple[str | None, str], ...]:
        """(kid, alg) of each configured identity-provider key, for the start-up log."""
        return tuple((k.kid, k.alg) for k in self._public_keys)

    # -- minting ----------------------------------------------------------

    def mint(self, user_id: int, role: str, typ: TokenType, family: str | None = None) -> tuple[str, Claims]:
        """A signed token and its claims.  A refresh token always has a family."""
        return self._mint(user_id, role, typ, family, int(self._clock()))

    def mint_pair(self, user_id: int, role: str, family: str | None = None) -> TokenPair:
        """Access + refresh token of one family (a new one unless rotating ``family``)."""
        family = family or uuid.uuid4().hex
        now = int(self._clock())
        access_token, access = self._mint(user_id, role, "access", family, now)
        refresh_token, refresh = self._mint(user_id, role, "refresh", family, now)
        return TokenPair(access_token, refresh_token, access, refresh, self._settings.access_ttl_s)

    def _mint(self, user_id: int, role: str, typ: TokenType, family: str | None, now: int) -> tuple[str, Claims]:
        # Programming errors, not client errors: fail loudly.
        if isinstance(user_id, bool) or not isinstance(user_id, int) or not 0 < user_id <= _MAX_SUB:
            raise ValueError(f"user_id must be a positive integer, got {user_id!r}")
        if typ not in ("access", "refresh"):
            raise ValueError(f"typ must be 'access' or 'refresh', got {typ!r}")
        if typ == "refresh" and family is None:
            family = uuid.uuid4().hex
        ttl = self._settings.access_ttl_s if typ == "access" else self._settings.refresh_ttl_s
        claims = Claims(sub=user_id, jti=uuid.uuid4().hex, iat=now, exp=now + ttl, typ=typ, role=role, family=family)
        payload: dict[str, Any] = {
            "sub": str(user_id),
            "jti": claims.jti,
            "iat": claims.iat,
            "exp": claims.exp,
            "typ": typ,
            "role": role,
            "iss": self._settings.jwt_issuer,
            "aud": self._settings.jwt_audience,
        }
        if family is not None:
            payload["fam"] = family
        token = jwt.encode(payload, self._secret, algorithm=self._alg, headers={"typ": "JWT"})
        return token, claims

    # -- verification -----------------------------------------------------

    def verify(self, token: str, expected_typ: TokenType, *, exp_leeway: bool = True) -> Claims:
        """Claims of a valid, unexpired token of type ``expected_typ``; else Unauthorized.

        Messages are short and never contain the token.  Revocation is the
        caller's job.  ``exp_leeway=False``: ``exp`` is checked without the clock-skew
        leeway (iat and nbf keep it).
        """
        if not isinstance(token, str) or not 0 < len(token) <= MAX_TOKEN_CHARS:
            raise Unauthorized("invalid token")
        key, alg, external = self._select_key(token)
        required = ["exp", "iat", "sub", "jti"] if external else ["exp", "iat", "sub", "jti", "typ", "role"]
        try:
            payload = jwt.decode(
                token,
                key=key,
                algorithms=[alg],  # exactly the one the key is for
                audience=self._settings.jwt_audience,
                issuer=self._settings.jwt_issuer,
                options={
                    "require": required,
                    "verify_signature": True,
                    "verify_aud": True,
                    "verify_iss": True,
                    # Time and sub/jti are checked below: PyJWT reads the wall
                    # clock, and chatd's sub rule is stricter than "a string".
                    "verify_exp": False,
                    "verify_iat": False,
                    "verify_nbf": False,
                    "verify_sub": False,
                    "verify_jti": False,
                },
            )
        except jwt.PyJWTError as exc:
            raise Unauthorized(_jwt_error_message(exc)) from exc
        except (ValueError, TypeError) as exc:  # odd input reaching cryptography
            raise Unauthorized("invalid token") from exc
        return self._claims(payload, expected_typ, external, exp_leeway)

    def _select_key(self, token: str) -> tuple[bytes | _PublicKey, str, bool]:
        """(key, alg, external) from our table; the header only picks an entry in it."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise Unauthorized("invalid token") from exc
        alg = header.get("alg")
        kid = header.get("kid")
        if not isinstance(alg, str) or (kid is not None and not isinstance(kid, str)):
            raise Unauthorized("invalid token")
        if alg == self._alg:
            return self._secret, alg, False
        candidates = [k for k in self._public_keys if k.alg == alg]
        if not candidates:  # "none", another HS*, or no IdP key of that type
            raise Unauthorized("unsupported token algorithm")
        if kid is not None:
            # A PEM key has no kid: it matches any kid the IdP puts in the header.
            candidates = [k for k in candidates if k.kid == kid] or [k for k in candidates if k.kid is None]
        if len(candidates) != 1:
            raise Unauthorized("unknown signing key")
        return candidates[0].key, alg, True

    def _claims(self, payload: dict[str, Any], expected_typ: TokenType, external: bool, exp_leeway: bool) -> Claims:
        now = self._clock()
        leeway = self._settings.leeway_s
        exp = _numeric_date(payload, "exp")
        iat = _numeric_date(payload, "iat")
        if exp <= now - (leeway if exp_leeway else 0):
            raise Unauthorized("token expired")
        if iat > now + leeway:
            raise Unauthorized("token issued in the future")
        if "nbf" in payload and _numeric_date(payload, "nbf") > now + leeway:
            raise Unauthorized("token not yet valid")

        sub = payload["sub"]
        if not isinstance(sub, str) or not _SUB_RE.fullmatch(sub) or int(sub) > _MAX_SUB:
            raise Unauthorized("invalid claim 'sub'")
        jti = payload["jti"]
        if not isinstance(jti, str) or not jti:
            raise Unauthorized("invalid claim 'jti'")

        raw_typ = payload.get("typ")
        role = payload.get("role", "user") if external else payload["role"]
        if not isinstance(role, str) or not role:
            raise Unauthorized("invalid claim 'role'")
        family: str | None = None
        typ: TokenType
        if external:
            # The IdP's tokens are access tokens only; it cannot mint our refresh tokens.
            if raw_typ is not None and (not isinstance(raw_typ, str) or raw_typ.lower() not in _EXTERNAL_ACCESS_TYP):
                raise Unauthorized("wrong token type")
            typ = "access"
        elif raw_typ == "access" or raw_typ == "refresh":
            typ = raw_typ
            fam = payload.get("fam")
            if fam is not None and (not isinstance(fam, str) or not fam):
                raise Unauthorized("invalid claim 'fam'")
            family = fam
        else:
            raise Unauthorized("invalid claim 'typ'")
        if typ != expected_typ:
            raise Unauthorized("wrong token type")
        if typ == "refresh" and family is None:
            raise Unauthorized("token missing claim 'fam'")
        return Claims(
            sub=int(sub), jti=jti, iat=int(iat), exp=int(exp), typ=typ, role=role, family=family, external=external
        )


def _numeric_date(payload: Mapping[str, Any], name: str) -> float:
    value = payload[name]
    # bool is an int subclass; NaN/inf would make every comparison meaningless.
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise Unauthorized(f"invalid claim '{name}'")
    return float(value)


def _jwt_error_message(exc: jwt.PyJWTError) -> str:
    # Order matters: InvalidSignatureError is a DecodeError.
    if isinstance(exc, jwt.InvalidSignatureError):
        return "invalid token signature"
    if isinstance(exc, jwt.ExpiredSignatureError):
        return "token expired"
    if isinstance(exc, jwt.InvalidAudienceError):
        return "invalid audience"
    if isinstance(exc, jwt.InvalidIssuerError):
        return "invalid issuer"
    if isinstance(exc, jwt.MissingRequiredClaimError):
        return f"token missing claim '{exc.claim}'"
    if isinstance(exc, jwt.InvalidAlgorithmError):
        return "unsupported token algorithm"
    if isinstance(exc, jwt.ImmatureSignatureError):
        return "token not yet valid"
    return "invalid token"


# ---------------------------------------------------------------------------
# Identity-provider public keys
# ---------------------------------------------------------------------------

_KEY_SETTING: Final = "auth.jwt_public_key_file"


def _load_public_keys(path: str) -> tuple[_VerifyKey, ...]:
    """The PEM key/certificate or JWKS in ``path``, each with the one alg it may verify."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(_KEY_SETTING, f"cannot read {path}: {exc.strerror or exc}") from exc
    if data.lstrip().startswith(b"{"):
        return _load_jwks(data)
    try:
        if b"-----BEGIN CERTIFICATE-----" in data:
            key: object = x509.load_pem_x509_certificate(data).public_key()
        else:
            key = serialization.load_pem_public_key(data)
    except ValueError as exc:
        raise ConfigError(_KEY_SETTING, "not a PEM public key, certificate or JWKS file") from exc
    pub = _check_public_key(key, "the PEM key")
    return (_VerifyKey(kid=None, alg=_default_alg(pub), key=pub),)


def _load_jwks(data: bytes) -> tuple[_VerifyKey, ...]:
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(_KEY_SETTING, "invalid JSON") from exc
    if isinstance(obj, dict) and "kty" in obj:  # a single JWK
        obj = {"keys": [obj]}
    if not isinstance(obj, dict) or not isinstance(obj.get("keys"), list):
        raise ConfigError(_KEY_SETTING, 'a JWKS must be an object {"keys": [...]}')
    try:
        # PyJWKSet skips entries it cannot use (e.g. encryption algorithms).
        jwks = jwt.PyJWKSet.from_dict(obj)
    except jwt.PyJWTError as exc:
        raise ConfigError(_KEY_SETTING, f"no usable key in the JWKS ({exc})") from exc
    keys: list[_VerifyKey] = []
    for jwk in jwks:
        if jwk.public_key_use == "enc":
            continue
        what = f"JWKS key {jwk.key_id!r}" if jwk.key_id else "a JWKS key"
        if jwk.key_type == "oct":
            raise ConfigError(_KEY_SETTING, f"{what} is a symmetric key; only public keys belong there")
        pub = _check_public_key(jwk.key, what)
        alg = jwk.algorithm_name
        if alg not in _allowed_algs(pub):
            raise ConfigError(_KEY_SETTING, f"{what}: alg {alg} does not fit its key type")
        keys.append(_VerifyKey(kid=jwk.key_id, alg=alg, key=pub))
    if not keys:
        raise ConfigError(_KEY_SETTING, "no signature key in the JWKS")
    return tuple(keys)


def _check_public_key(key: object, what: str) -> _PublicKey:
    if isinstance(key, RSAPublicKey):
        if key.key_size < _MIN_RSA_BITS:
            raise ConfigError(_KEY_SETTING, f"{what}: RSA key of {key.key_size} bits, need >= {_MIN_RSA_BITS}")
        return key
    if isinstance(key, EllipticCurvePublicKey):
        if key.curve.name not in _EC_ALG_BY_CURVE:
            raise ConfigError(_KEY_SETTING, f"{what}: unsupported curve {key.curve.name}")
        return key
    if isinstance(key, Ed25519PublicKey):
        return key
    # Private keys land here too: chatd must never hold the IdP's signing key.
    raise ConfigError(_KEY_SETTING, f"{what}: need an RSA, EC (P-256/384/521) or Ed25519 public key")


def _default_alg(key: _PublicKey) -> str:
    if isinstance(key, RSAPublicKey):
        return "RS256"
    if isinstance(key, EllipticCurvePublicKey):
        return _EC_ALG_BY_CURVE[key.curve.name]
    return "EdDSA"


def _allowed_algs(key: _PublicKey) -> frozenset[str]:
    if isinstance(key, RSAPublicKey):
        return _RSA_ALGS
    return frozenset({_default_alg(key)})
