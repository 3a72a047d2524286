"""Token verification: the cache of verified tokens never outlives a token or trusts a forgery."""

from __future__ import annotations

import time
import uuid

import jwt
import pytest

from services import auth
from services.auth import TokenVerifier, mint_token
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
