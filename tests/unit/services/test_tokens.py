"""tokens: JWT mint/verify and identity-provider keys; no network, no loop.

Time comes from a fake clock and keys are generated here.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import hmac
import json
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID

from chatd.core.errors import ConfigError, Unauthorized
from chatd.process.config import AuthSettings
from chatd.services import tokens

SECRET = "x" * 40
T0 = 1_700_000_000.0
MISSING = object()  # marks "delete this claim" in the tables below


class FakeClock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def settings(**changes: Any) -> AuthSettings:
    return AuthSettings(**{"jwt_secret": SECRET, **changes})


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64json(obj: Any) -> str:
    return b64(json.dumps(obj).encode())


def unb64json(part: str) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
    return out


def segments(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    head, body, _ = token.split(".")
    return unb64json(head), unb64json(body)


def unauthorized(svc: tokens.TokenService, token: Any, typ: tokens.TokenType = "access") -> str:
    with pytest.raises(Unauthorized) as info:
        svc.verify(token, typ)
    return info.value.message


def claims(**changes: Any) -> dict[str, Any]:
    """A complete, valid payload of a chatd access token at T0; MISSING deletes."""
    base: dict[str, Any] = {
        "sub": "42",
        "jti": "j1",
        "iat": int(T0),
        "exp": int(T0) + 900,
        "typ": "access",
        "role": "user",
        "iss": "chatd",
        "aud": "chatd",
    }
    base.update(changes)
    return {k: v for k, v in base.items() if v is not MISSING}


def idp_claims(**changes: Any) -> dict[str, Any]:
    """An identity provider's access token: no typ, no role."""
    return claims(**{"typ": MISSING, "role": MISSING, **changes})


def hs(payload: dict[str, Any], secret: str = SECRET, alg: str = "HS256") -> str:
    return jwt.encode(payload, secret, algorithm=alg)


# -- keys -------------------------------------------------------------------


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def other_rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ed_key() -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.generate()


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def public_pem(key: Any) -> bytes:
    return bytes(
        key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )


def write(tmp_path: Path, name: str, data: bytes | str) -> str:
    path = tmp_path / name
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return str(path)


def jwk(key: Any, **extra: Any) -> dict[str, Any]:
    pub = key.public_key()
    if isinstance(pub, rsa.RSAPublicKey):
        out = jwt.algorithms.RSAAlgorithm.to_jwk(pub, as_dict=True)
    elif isinstance(pub, ec.EllipticCurvePublicKey):
        out = jwt.algorithms.ECAlgorithm.to_jwk(pub, as_dict=True)
    else:
        out = jwt.algorithms.OKPAlgorithm.to_jwk(pub, as_dict=True)
    return {**out, **extra}


def jwks_file(tmp_path: Path, *keys: dict[str, Any]) -> str:
    return write(tmp_path, "jwks.json", json.dumps({"keys": list(keys)}))


def svc_with_key(path: str, clock: FakeClock | None = None) -> tokens.TokenService:
    return tokens.TokenService(settings(jwt_public_key_file=path), clock or FakeClock())


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def svc(clock: FakeClock) -> tokens.TokenService:
    return tokens.TokenService(settings(), clock)


# -- minting and round trips --------------------------------------------------


@pytest.mark.parametrize(("typ", "ttl"), [("access", 900), ("refresh", 604_800)])
def test_mint_verify_round_trip(svc: tokens.TokenService, typ: tokens.TokenType, ttl: int) -> None:
    token, minted = svc.mint(7, "admin", typ)
    header, payload = segments(token)
    assert header == {"alg": "HS256", "typ": "JWT"}
    assert payload["sub"] == "7" and payload["iss"] == "chatd" and payload["aud"] == "chatd"
    assert minted.iat == int(T0) and minted.exp == int(T0) + ttl
    assert len(minted.jti) == 32
    assert svc.verify(token, typ) == minted
    assert minted.sub == 7 and minted.role == "admin" and minted.typ == typ and minted.external is False


def test_mint_family_rules(svc: tokens.TokenService) -> None:
    access_token, access = svc.mint(7, "user", "access")
    assert access.family is None and "fam" not in segments(access_token)[1]
    _, refresh = svc.mint(7, "user", "refresh")
    assert refresh.family is not None and len(refresh.family) == 32
    _, kept = svc.mint(7, "user", "refresh", family="fam1")
    assert kept.family == "fam1"
    assert svc.verify(svc.mint(7, "user", "access", family="fam2")[0], "access").family == "fam2"


@pytest.mark.parametrize("bad", [0, -1, True, "7", 2**63])
def test_mint_rejects_bad_user_id(svc: tokens.TokenService, bad: Any) -> None:
    with pytest.raises(ValueError):
        svc.mint(bad, "user", "access")


def test_mint_pair_shares_family(svc: tokens.TokenService) -> None:
    pair = svc.mint_pair(9, "user")
    assert pair.expires_in == 900
    assert pair.access.family is not None and pair.access.family == pair.refresh.family
    assert pair.access.jti != pair.refresh.jti
    assert svc.verify(pair.access_token, "access") == pair.access
    assert svc.verify(pair.refresh_token, "refresh") == pair.refresh
    rotated = svc.mint_pair(9, "user", family=pair.refresh.family)
    assert rotated.refresh.family == pair.refresh.family


def test_other_hmac_algorithm_setting(clock: FakeClock) -> None:
    svc = tokens.TokenService(settings(jwt_algorithm="HS512", jwt_secret="y" * 64), clock)
    token, minted = svc.mint(1, "user", "access")
    assert segments(token)[0]["alg"] == "HS512"
    assert svc.verify(token, "access") == minted


# -- time -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("offset", "ok"),
    [(900 + 10 - 1, True), (900 + 10, False), (900 + 11, False), (899, True)],  # exp = T0+900, leeway 10
)
def test_expiry_with_leeway(svc: tokens.TokenService, clock: FakeClock, offset: int, ok: bool) -> None:
    token, minted = svc.mint(1, "user", "access")
    clock.now = T0 + offset
    if ok:
        assert svc.verify(token, "access") == minted
    else:
        assert unauthorized(svc, token) == "token expired"


@pytest.mark.parametrize(("offset", "ok"), [(899, True), (900, False), (905, False)])
def test_expiry_without_leeway_for_sockets(svc: tokens.TokenService, clock: FakeClock, offset: int, ok: bool) -> None:
    """The socket handshake checks exp exactly: a socket closed at exp cannot reopen within the leeway."""
    token, minted = svc.mint(1, "user", "access")
    clock.now = T0 + offset
    if ok:
        assert svc.verify(token, "access", exp_leeway=False) == minted
    else:
        with pytest.raises(Unauthorized, match="token expired"):
            svc.verify(token, "access", exp_leeway=False)
    # iat keeps its leeway either way
    ahead = hs(claims(iat=int(clock.now) + 10, exp=int(clock.now) + 9000))
    assert svc.verify(ahead, "access", exp_leeway=False).iat == int(clock.now) + 10


@pytest.mark.parametrize(("ahead", "ok"), [(10, True), (11, False), (3600, False)])
def test_iat_in_the_future(svc: tokens.TokenService, ahead: int, ok: bool) -> None:
    token = hs(claims(iat=int(T0) + ahead, exp=int(T0) + 9000))
    if ok:
        assert svc.verify(token, "access").iat == int(T0) + ahead
    else:
        assert unauthorized(svc, token) == "token issued in the future"


@pytest.mark.parametrize(("name", "value"), [("exp", "soon"), ("iat", "now"), ("exp", True), ("iat", None)])
def test_non_numeric_dates(svc: tokens.TokenService, name: str, value: Any) -> None:
    message = unauthorized(svc, hs(claims(**{name: value})))
    assert message == (f"token missing claim '{name}'" if value is None else f"invalid claim '{name}'")


# -- signature and algorithm pinning -------------------------------------------


def test_wrong_secret(svc: tokens.TokenService) -> None:
    assert unauthorized(svc, hs(claims(), secret="z" * 40)) == "invalid token signature"


def test_tampered_payload(svc: tokens.TokenService) -> None:
    token, _ = svc.mint(42, "user", "access")
    head, _, sig = token.split(".")
    payload = segments(token)[1]
    forged = f"{head}.{b64json({**payload, 'role': 'admin'})}.{sig}"
    assert unauthorized(svc, forged) == "invalid token signature"


@pytest.mark.parametrize("alg", ["none", "None", "NONE"])
def test_alg_none_rejected(svc: tokens.TokenService, alg: str) -> None:
    token = f"{b64json({'alg': alg, 'typ': 'JWT'})}.{b64json(claims())}."
    assert unauthorized(svc, token) == "unsupported token algorithm"


@pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")
def test_other_hmac_alg_with_right_secret_rejected(svc: tokens.TokenService) -> None:
    # The configured algorithm is pinned; the header cannot switch to another HS*.
    assert unauthorized(svc, hs(claims(), alg="HS512")) == "unsupported token algorithm"


def test_hs_rs_confusion_rejected(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> None:
    pem = public_pem(rsa_key)
    svc = svc_with_key(write(tmp_path, "idp.pem", pem))
    # PyJWT refuses to sign HS256 with a PEM, so craft it the way an attacker would.
    signing_input = f"{b64json({'alg': 'HS256', 'typ': 'JWT'})}.{b64json(idp_claims())}"
    sig = hmac.new(pem, signing_input.encode(), hashlib.sha256).digest()
    assert unauthorized(svc, f"{signing_input}.{b64(sig)}") == "invalid token signature"


@pytest.mark.parametrize(
    "token", ["", "abc", "a.b.c", "a.b", "....", "x" * 9000, None, b"bytes.are.not", "e30.e30.", "W10.e30.sig"]
)
def test_garbage_tokens(svc: tokens.TokenService, token: Any) -> None:
    assert unauthorized(svc, token) in ("invalid token", "unsupported token algorithm")


def test_garbage_token_messages_are_specific(svc: tokens.TokenService) -> None:
    assert unauthorized(svc, "abc") == "invalid token"
    assert unauthorized(svc, "x" * 9000) == "invalid token"
    assert unauthorized(svc, "e30.e30.") == "invalid token"  # header {} has no alg


# -- claims -----------------------------------------------------------------


@pytest.mark.parametrize("typ", ["access", "refresh"])
def test_wrong_token_type_both_ways(svc: tokens.TokenService, typ: tokens.TokenType) -> None:
    token, _ = svc.mint(1, "user", typ)
    other: tokens.TokenType = "refresh" if typ == "access" else "access"
    assert unauthorized(svc, token, other) == "wrong token type"


@pytest.mark.parametrize(("typ", "message"), [("id", "invalid claim 'typ'"), (1, "invalid claim 'typ'")])
def test_unknown_typ(svc: tokens.TokenService, typ: Any, message: str) -> None:
    assert unauthorized(svc, hs(claims(typ=typ))) == message


def test_refresh_without_family_rejected(svc: tokens.TokenService) -> None:
    assert unauthorized(svc, hs(claims(typ="refresh")), "refresh") == "token missing claim 'fam'"
    assert svc.verify(hs(claims(typ="refresh", fam="f1")), "refresh").family == "f1"
    assert unauthorized(svc, hs(claims(fam=5))) == "invalid claim 'fam'"


@pytest.mark.parametrize(
    ("minted_with", "message"),
    [({"jwt_audience": "other"}, "invalid audience"), ({"jwt_issuer": "evil"}, "invalid issuer")],
)
def test_wrong_audience_and_issuer(clock: FakeClock, minted_with: dict[str, str], message: str) -> None:
    ours = tokens.TokenService(settings(), clock)
    token, _ = tokens.TokenService(settings(**minted_with), clock).mint(1, "user", "access")
    assert unauthorized(ours, token) == message


def test_audience_list_containing_ours_accepted(svc: tokens.TokenService) -> None:
    assert svc.verify(hs(claims(aud=["other", "chatd"])), "access").sub == 42
    assert unauthorized(svc, hs(claims(aud=["other"]))) == "invalid audience"


@pytest.mark.parametrize("name", ["jti", "sub", "exp", "iat", "typ", "role", "iss", "aud"])
def test_missing_claim(svc: tokens.TokenService, name: str) -> None:
    assert unauthorized(svc, hs(claims(**{name: MISSING}))) == f"token missing claim '{name}'"


@pytest.mark.parametrize("sub", ["abc", "0", "-1", "1.5", "042", " 42", "²", "9" * 20, "9223372036854775808", 42, ""])
def test_bad_sub(svc: tokens.TokenService, sub: Any) -> None:
    assert unauthorized(svc, hs(claims(sub=sub))) == "invalid claim 'sub'"


def test_largest_sub_accepted(svc: tokens.TokenService) -> None:
    assert svc.verify(hs(claims(sub=str(2**63 - 1))), "access").sub == 2**63 - 1


@pytest.mark.parametrize(("name", "value"), [("jti", ""), ("jti", 7), ("role", ""), ("role", ["admin"])])
def test_bad_jti_or_role(svc: tokens.TokenService, name: str, value: Any) -> None:
    assert unauthorized(svc, hs(claims(**{name: value}))) == f"invalid claim '{name}'"


def test_messages_never_contain_the_token(svc: tokens.TokenService) -> None:
    token = hs(claims(exp=int(T0) - 100))
    message = unauthorized(svc, token)
    assert message == "token expired"
    for part in token.split("."):
        assert part not in message


# -- external identity provider ---------------------------------------------------


def rs(key: Any, payload: dict[str, Any], alg: str = "RS256", kid: str | None = None) -> str:
    return jwt.encode(payload, key, algorithm=alg, headers={"kid": kid} if kid else None)


@pytest.fixture
def pem_svc(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> tokens.TokenService:
    return svc_with_key(write(tmp_path, "idp.pem", public_pem(rsa_key)))


@pytest.fixture
def jwks_svc(tmp_path: Path, rsa_key: rsa.RSAPrivateKey, ed_key: ed25519.Ed25519PrivateKey) -> tokens.TokenService:
    return svc_with_key(jwks_file(tmp_path, jwk(rsa_key, kid="r1", use="sig"), jwk(ed_key, kid="e1")))


def test_rs256_with_pem_key(pem_svc: tokens.TokenService, rsa_key: rsa.RSAPrivateKey) -> None:
    assert pem_svc.external_keys == ((None, "RS256"),)
    got = pem_svc.verify(rs(rsa_key, idp_claims(), kid="whatever"), "access")
    assert got == tokens.Claims(
        sub=42, jti="j1", iat=int(T0), exp=int(T0) + 900, typ="access", role="user", family=None, external=True
    )
    # chatd's own tokens still verify next to the IdP key.
    token, minted = pem_svc.mint(3, "user", "access")
    assert pem_svc.verify(token, "access") == minted


def test_rs256_with_jwks(jwks_svc: tokens.TokenService, rsa_key: rsa.RSAPrivateKey) -> None:
    assert set(jwks_svc.external_keys) == {("r1", "RS256"), ("e1", "EdDSA")}
    got = jwks_svc.verify(rs(rsa_key, idp_claims(role="moderator"), kid="r1"), "access")
    assert got.external is True and got.role == "moderator" and got.sub == 42


def test_eddsa_with_jwks(jwks_svc: tokens.TokenService, ed_key: ed25519.Ed25519PrivateKey) -> None:
    got = jwks_svc.verify(rs(ed_key, idp_claims(), alg="EdDSA", kid="e1"), "access")
    assert got.external is True and got.typ == "access"
    # One key per alg: a kid-less token still finds it.
    assert jwks_svc.verify(rs(ed_key, idp_claims(), alg="EdDSA"), "access").sub == 42


def test_es256_with_pem(tmp_path: Path, ec_key: ec.EllipticCurvePrivateKey) -> None:
    svc = svc_with_key(write(tmp_path, "ec.pem", public_pem(ec_key)))
    assert svc.external_keys == ((None, "ES256"),)
    assert svc.verify(rs(ec_key, idp_claims(), alg="ES256"), "access").external is True


def test_certificate_pem(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> None:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "idp")])
    start = datetime.datetime(2024, 1, 1, tzinfo=datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(rsa_key.public_key())
        .serial_number(1)
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=365))
        .sign(rsa_key, hashes.SHA256())
    )
    svc = svc_with_key(write(tmp_path, "cert.pem", cert.public_bytes(serialization.Encoding.PEM)))
    assert svc.verify(rs(rsa_key, idp_claims()), "access").external is True


def test_rs256_rejected_without_public_key(svc: tokens.TokenService, rsa_key: rsa.RSAPrivateKey) -> None:
    assert unauthorized(svc, rs(rsa_key, idp_claims())) == "unsupported token algorithm"


def test_rs256_from_other_key_rejected(pem_svc: tokens.TokenService, other_rsa_key: rsa.RSAPrivateKey) -> None:
    assert unauthorized(pem_svc, rs(other_rsa_key, idp_claims())) == "invalid token signature"


def test_alg_not_in_key_table_rejected(
    pem_svc: tokens.TokenService,
    jwks_svc: tokens.TokenService,
    rsa_key: rsa.RSAPrivateKey,
    ec_key: ec.EllipticCurvePrivateKey,
) -> None:
    # The PEM RSA key is for RS256 only; PS256 and RS512 with the same key are not accepted.
    assert unauthorized(pem_svc, rs(rsa_key, idp_claims(), alg="PS256")) == "unsupported token algorithm"
    assert unauthorized(pem_svc, rs(rsa_key, idp_claims(), alg="RS512")) == "unsupported token algorithm"
    assert unauthorized(jwks_svc, rs(ec_key, idp_claims(), alg="ES256")) == "unsupported token algorithm"


def test_unknown_kid_rejected(jwks_svc: tokens.TokenService, rsa_key: rsa.RSAPrivateKey) -> None:
    assert unauthorized(jwks_svc, rs(rsa_key, idp_claims(), kid="nope")) == "unknown signing key"


def test_ambiguous_kidless_token_rejected(
    tmp_path: Path, rsa_key: rsa.RSAPrivateKey, other_rsa_key: rsa.RSAPrivateKey
) -> None:
    svc = svc_with_key(jwks_file(tmp_path, jwk(rsa_key, kid="a"), jwk(other_rsa_key, kid="b")))
    assert unauthorized(svc, rs(rsa_key, idp_claims())) == "unknown signing key"
    assert svc.verify(rs(other_rsa_key, idp_claims(), kid="b"), "access").sub == 42
    # Right kid, wrong key: the kid only picks the key, the signature decides.
    assert unauthorized(svc, rs(rsa_key, idp_claims(), kid="b")) == "invalid token signature"


@pytest.mark.parametrize("typ", ["refresh", "id", 3])
def test_external_token_cannot_claim_other_types(
    pem_svc: tokens.TokenService, rsa_key: rsa.RSAPrivateKey, typ: Any
) -> None:
    token = rs(rsa_key, idp_claims(typ=typ))
    assert unauthorized(pem_svc, token, "access") == "wrong token type"


@pytest.mark.parametrize("typ", [MISSING, "access", "Bearer"])
def test_external_token_is_never_a_refresh_token(
    pem_svc: tokens.TokenService, rsa_key: rsa.RSAPrivateKey, typ: Any
) -> None:
    token = rs(rsa_key, idp_claims(typ=typ))
    assert pem_svc.verify(token, "access").typ == "access"
    assert unauthorized(pem_svc, token, "refresh") == "wrong token type"


def test_external_refresh_with_family_still_rejected(pem_svc: tokens.TokenService, rsa_key: rsa.RSAPrivateKey) -> None:
    token = rs(rsa_key, idp_claims(typ="refresh", fam="f1"))
    assert unauthorized(pem_svc, token, "refresh") == "wrong token type"


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"jti": MISSING}, "token missing claim 'jti'"),
        ({"sub": "auth0|abc"}, "invalid claim 'sub'"),
        ({"aud": "other"}, "invalid audience"),
        ({"iss": "https://evil"}, "invalid issuer"),
        ({"exp": int(T0) - 11}, "token expired"),
        ({"nbf": int(T0) + 60}, "token not yet valid"),
        ({"role": 1}, "invalid claim 'role'"),
    ],
)
def test_external_claim_checks(
    pem_svc: tokens.TokenService, rsa_key: rsa.RSAPrivateKey, changes: dict[str, Any], message: str
) -> None:
    assert unauthorized(pem_svc, rs(rsa_key, idp_claims(**changes))) == message


def test_external_family_is_ignored(pem_svc: tokens.TokenService, rsa_key: rsa.RSAPrivateKey) -> None:
    # The IdP cannot name one of chatd's refresh families.
    assert pem_svc.verify(rs(rsa_key, idp_claims(fam="f1")), "access").family is None


# -- key file errors ----------------------------------------------------------


def _private_pem(key: Any) -> bytes:
    return bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"hello", "not a PEM public key, certificate or JWKS file"),
        (b"{not json", "invalid JSON"),
        (b"[1, 2]", "not a PEM public key, certificate or JWKS file"),
        (b'{"foo": 1}', 'a JWKS must be an object {"keys": [...]}'),
        (b'{"keys": []}', "no usable key in the JWKS"),
        (b'{"keys": [{"kty": "RSA", "alg": "ES256", "n": "AQAB", "e": "AQAB"}]}', "no usable key in the JWKS"),
        (b'{"keys": [{"kty": "oct", "k": "c2VjcmV0", "kid": "h"}]}', "JWKS key 'h' is a symmetric key"),
    ],
)
def test_bad_key_file(tmp_path: Path, content: bytes, problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        svc_with_key(write(tmp_path, "k", content))
    assert info.value.key == "auth.jwt_public_key_file"
    assert problem in info.value.problem


def test_missing_key_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        svc_with_key(str(tmp_path / "absent.pem"))
    assert info.value.key == "auth.jwt_public_key_file" and "cannot read" in info.value.problem


def test_private_keys_refused(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> None:
    with pytest.raises(ConfigError) as info:
        svc_with_key(write(tmp_path, "priv.pem", _private_pem(rsa_key)))
    assert "not a PEM public key" in info.value.problem
    private_jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(rsa_key))
    with pytest.raises(ConfigError) as info:
        svc_with_key(jwks_file(tmp_path, {**private_jwk, "kid": "p"}))
    assert "public key" in info.value.problem


def test_weak_or_unsupported_keys_refused(tmp_path: Path) -> None:
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    with pytest.raises(ConfigError) as info:
        svc_with_key(write(tmp_path, "small.pem", public_pem(small)))
    assert "1024 bits" in info.value.problem
    k1 = ec.generate_private_key(ec.SECP256K1())
    with pytest.raises(ConfigError) as info:
        svc_with_key(write(tmp_path, "k1.pem", public_pem(k1)))
    assert "unsupported curve" in info.value.problem


def test_jwks_alg_must_fit_key(tmp_path: Path, rsa_key: rsa.RSAPrivateKey, ec_key: ec.EllipticCurvePrivateKey) -> None:
    svc = svc_with_key(jwks_file(tmp_path, jwk(rsa_key, kid="ps", alg="PS256"), jwk(ec_key, kid="enc", use="enc")))
    assert svc.external_keys == (("ps", "PS256"),)  # the encryption key is skipped
    assert svc.verify(rs(rsa_key, idp_claims(), alg="PS256", kid="ps"), "access").external is True
    assert unauthorized(svc, rs(rsa_key, idp_claims(), alg="RS256", kid="ps")) == "unsupported token algorithm"


def test_single_jwk_file(tmp_path: Path, ed_key: ed25519.Ed25519PrivateKey) -> None:
    svc = svc_with_key(write(tmp_path, "one.json", json.dumps(jwk(ed_key))))
    assert svc.external_keys == ((None, "EdDSA"),)


def test_empty_secret_refused() -> None:
    with pytest.raises(ConfigError) as info:
        tokens.TokenService(AuthSettings(jwt_secret=""))
    assert info.value.key == "auth.jwt_secret"


def test_jwks_alg_must_match_curve(tmp_path: Path) -> None:
    p384 = ec.generate_private_key(ec.SECP384R1())
    with pytest.raises(ConfigError) as info:
        svc_with_key(jwks_file(tmp_path, jwk(p384, kid="c", alg="ES256")))
    assert info.value.problem == "JWKS key 'c': alg ES256 does not fit its key type"
    assert svc_with_key(jwks_file(tmp_path, jwk(p384, kid="c"))).external_keys == (("c", "ES384"),)


@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_non_finite_exp_rejected(svc: tokens.TokenService, value: float) -> None:
    # Python's json reads Infinity/NaN; an infinite exp must not mean "never expires".
    assert unauthorized(svc, hs(claims(exp=value))) == "invalid claim 'exp'"


def test_oversized_but_valid_token_rejected(svc: tokens.TokenService) -> None:
    big = hs(claims(pad="p" * 8200))
    assert svc.verify(hs(claims(pad="p" * 100)), "access").sub == 42  # extra claims are fine
    assert unauthorized(svc, big) == "invalid token"
