"""Token verification: the cache of verified tokens never outlives a token or trusts a forgery."""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import jwt
import pytest

from services import auth
from services.auth import TokenVerifier, mint_token
from services.config import load_settings
from services.errors import Unauthenticated

SECRET = "unit-test-secret-that-is-long-enough-for-hs256"


def test_a_verified_token_is_answered_again_without_verifying_it_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    verifier = TokenVerifier(secret=SECRET)
    token = mint_token(SECRET, "patient", uuid.uuid4(), uuid.uuid4())
    first = verifier.verify(token)
    decodes = 0
    real_decode = jwt.decode

    def counting(*args: object, **kwargs: object) -> object:
        nonlocal decodes
        decodes += 1
        return real_decode(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(jwt, "decode", counting)
    assert verifier.verify(token) == first
    assert decodes == 0


def test_a_remembered_token_still_expires() -> None:
    verifier = TokenVerifier(secret=SECRET, leeway_seconds=0)
    token = mint_token(SECRET, "staff", uuid.uuid4(), uuid.uuid4(), ttl_seconds=1)
    verifier.verify(token)
    time.sleep(1.1)
    with pytest.raises(Unauthenticated, match="expired"):
        verifier.verify(token)


def test_a_token_whose_exp_is_past_any_float_is_verified_and_remembered() -> None:
    verifier = TokenVerifier(secret=SECRET)
    me = uuid.uuid4()
    claims = {"sub": str(me), "role": "patient", "clinic_id": str(uuid.uuid4()), "exp": 10**400}
    token = jwt.encode(claims, SECRET, algorithm="HS256")
    assert verifier.verify(token).id == me
    assert verifier.verify(token).id == me  # from the cache


def test_a_token_with_another_signature_is_not_taken_for_a_remembered_one() -> None:
    verifier = TokenVerifier(secret=SECRET)
    token = mint_token(SECRET, "staff", uuid.uuid4(), uuid.uuid4())
    verifier.verify(token)
    head, payload, signature = token.split(".")
    forged = f"{head}.{payload}.{signature[::-1]}"
    with pytest.raises(Unauthenticated):
        verifier.verify(forged)
    wrong_key = mint_token(
        "another-secret-that-is-long-enough-for-hs256", "staff", uuid.uuid4(), uuid.uuid4()
    )
    with pytest.raises(Unauthenticated):
        verifier.verify(wrong_key)


def test_the_cache_of_verified_tokens_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(auth, "VERIFIED_TOKENS_CACHED", 3)
    verifier = TokenVerifier(secret=SECRET)
    tokens = [mint_token(SECRET, "patient", uuid.uuid4(), uuid.uuid4()) for _ in range(5)]
    principals = [verifier.verify(token) for token in tokens]
    assert len(verifier._verified) == 3
    assert [verifier.verify(token) for token in tokens] == principals


@pytest.mark.parametrize(
    ("configured", "minted"),
    [
        ({"audience": "clinic-api"}, {"audience": "another-api"}),
        ({"audience": "clinic-api"}, {}),
        ({"issuer": "https://auth.clinic"}, {"issuer": "https://auth.elsewhere"}),
        ({"issuer": "https://auth.clinic"}, {}),
    ],
)
def test_a_token_for_another_audience_or_issuer_is_refused(
    configured: dict[str, str], minted: dict[str, str]
) -> None:
    verifier = TokenVerifier(secret=SECRET, **configured)  # type: ignore[arg-type]
    token = mint_token(SECRET, "staff", uuid.uuid4(), uuid.uuid4(), **minted)  # type: ignore[arg-type]
    with pytest.raises(Unauthenticated):
        verifier.verify(token)
    right = mint_token(SECRET, "staff", uuid.uuid4(), uuid.uuid4(), **configured)  # type: ignore[arg-type]
    assert verifier.verify(right).role == "staff"


def test_a_token_without_exp_is_refused_not_a_crash() -> None:
    claims = {"sub": str(uuid.uuid4()), "role": "staff", "clinic_id": str(uuid.uuid4())}
    with pytest.raises(Unauthenticated):
        TokenVerifier(secret=SECRET).verify(jwt.encode(claims, SECRET, algorithm="HS256"))


@pytest.mark.parametrize("header", ["Basic {t}", "{t}", "Bearer", "Bearer   ", "Token {t}"])
def test_only_a_bearer_header_carries_a_token(header: str) -> None:
    token = mint_token(SECRET, "staff", uuid.uuid4(), uuid.uuid4())
    verifier = TokenVerifier(secret=SECRET)
    with pytest.raises(Unauthenticated):
        verifier.principal_from_header(header.format(t=token))
    assert verifier.principal_from_header(f"bearer {token}").role == "staff"


@pytest.mark.parametrize(("expired_ago", "accepted"), [(10, True), (60, False)])
def test_expiry_has_thirty_seconds_of_leeway(expired_ago: int, accepted: bool) -> None:
    now = int(time.time())
    claims = {
        "sub": str(uuid.uuid4()),
        "role": "staff",
        "clinic_id": str(uuid.uuid4()),
        "exp": now - expired_ago,
    }
    token = jwt.encode(claims, SECRET, algorithm="HS256")
    verifier = TokenVerifier(secret=SECRET)
    if accepted:
        assert verifier.verify(token).role == "staff"
    else:
        with pytest.raises(Unauthenticated):
            verifier.verify(token)


@pytest.mark.parametrize("algorithm", ["EdDSA", "ES256", "RS256"])
def test_tokens_signed_with_the_configured_public_keys_algorithms_verify(algorithm: str) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

    private: Any
    if algorithm == "EdDSA":
        private = ed25519.Ed25519PrivateKey.generate()
    elif algorithm == "ES256":
        private = ec.generate_private_key(ec.SECP256R1())
    else:
        private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    claims = {
        "sub": str(uuid.uuid4()),
        "role": "provider",
        "clinic_id": str(uuid.uuid4()),
        "exp": int(time.time()) + 60,
    }
    token = jwt.encode(claims, private, algorithm=algorithm)
    assert TokenVerifier(public_key=public.decode()).verify(token).role == "provider"


def test_a_key_file_with_non_utf8_text_around_its_pem_block_verifies(tmp_path: Path) -> None:
    """The configuration check reads the file as bytes; so does the verifier: a comment in
    latin-1 above the PEM block (an operator's note) must not crash the service at start."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    private = ec.generate_private_key(ec.SECP256R1())
    pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    path = tmp_path / "key.pem"
    path.write_bytes("Schl\u00fcssel der Praxis\n".encode("latin-1") + pem)
    settings = load_settings({"CLINIC_JWT_PUBLIC_KEY_FILE": str(path)})
    claims = {
        "sub": str(uuid.uuid4()),
        "role": "staff",
        "clinic_id": str(uuid.uuid4()),
        "exp": int(time.time()) + 60,
    }
    token = jwt.encode(claims, private, algorithm="ES256")
    assert TokenVerifier.from_settings(settings).verify(token).role == "staff"


def test_every_api_route_checks_the_token_before_it_parses_anything() -> None:
    """The check is the controllers' ``before_request`` (a sync guard ran in a worker
    thread on every request). Litestar keeps only the innermost layer's hook, so a route
    given one of its own would silently skip the check: none may."""
    import asyncio

    from litestar import Litestar

    from services.appointments.entrypoints.http.appointments import AppointmentsController
    from services.appointments.entrypoints.http.dependencies import authenticated
    from services.appointments.entrypoints.http.visits import VisitsController

    app = Litestar(route_handlers=[AppointmentsController, VisitsController])
    checked = []
    for route in app.routes:
        if route.path.startswith("/schema"):  # Litestar's OpenAPI routes
            continue
        assert route.path.startswith("/v1/"), route.path
        for handler in route.route_handlers:
            assert handler.resolve_before_request() is authenticated, (route.path, handler)
            checked.append((route.path, handler))
    assert len(checked) >= 7  # schedule, read, cancel, start, history, visits, OPTIONS…
    assert asyncio.iscoroutinefunction(authenticated)  # else run in a worker thread
