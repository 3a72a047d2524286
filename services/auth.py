"""JWT bearer tokens: verifying them (HS256 secret or a PEM public key) and minting them.

A token must carry ``sub`` (user UUID), ``role`` (patient | provider | staff),
``clinic_id`` (UUID) and ``exp``; anything else about it that is off is ``unauthenticated``.
A gateway sends the same token with every request of a session, so a verified token's
principal is remembered (by the whole token string) until the token's ``exp``.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any
from uuid import UUID

import jwt
import msgspec

from contracts.common import Principal, Role
from services.config import MIN_JWT_SECRET_BYTES, Settings
from services.errors import Unauthenticated

log = logging.getLogger(__name__)

ASYMMETRIC_ALGORITHMS = ["RS256", "RS384", "RS512", "PS256", "ES256", "ES384", "EdDSA"]
MAX_TOKEN_LENGTH = 8192
#: Verified tokens remembered at most (the oldest is forgotten first).
VERIFIED_TOKENS_CACHED = 4096


class _Claims(msgspec.Struct):
    sub: UUID
    role: Role
    clinic_id: UUID


class TokenVerifier:
    """Turns an ``Authorization`` header into a :class:`Principal`, or refuses it."""

    def __init__(
        self,
        secret: str | None = None,
        public_key: str | None = None,
        issuer: str | None = None,
        audience: str | None = None,
        leeway_seconds: int = 30,
    ) -> None:
        self._keys: list[tuple[str, list[str]]] = []
        if secret:
            self._keys.append((secret, ["HS256"]))
        if public_key:
            self._keys.append((public_key, ASYMMETRIC_ALGORITHMS))
        self._issuer = issuer
        self._audience = audience
        self._leeway = leeway_seconds
        self._verified: dict[str, tuple[Principal, float]] = {}

    @classmethod
    def from_settings(cls, settings: Settings) -> TokenVerifier:
        """A verifier with the keys and checks the ``CLINIC_JWT_*`` variables configure."""
        if settings.jwt_secret and len(settings.jwt_secret.encode()) < MIN_JWT_SECRET_BYTES:
            log.warning(
                "CLINIC_JWT_SECRET is shorter than %d bytes: HS256 tokens signed with it can"
                " be forged by guessing it",
                MIN_JWT_SECRET_BYTES,
            )
        public_key = None
        if settings.jwt_public_key_file:
            # As the configuration check reads it: bytes, whatever text sits around the
            # (ASCII) PEM block; latin-1 decodes any byte, leaving the block as it is.
            public_key = Path(settings.jwt_public_key_file).read_bytes().decode("latin-1")
        return cls(
            secret=settings.jwt_secret,
            public_key=public_key,
            issuer=settings.jwt_issuer,
            audience=settings.jwt_audience,
        )

    def principal_from_header(self, authorization: str | None) -> Principal:
        """The principal of ``Authorization: Bearer <JWT>``; raises :class:`Unauthenticated`."""
        if not authorization:
            raise Unauthenticated("An Authorization: Bearer token is required.")
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthenticated("The Authorization header must be 'Bearer <token>'.")
        return self.verify(token.strip())

    def verify(self, token: str) -> Principal:
        """The principal of a JWT; raises :class:`Unauthenticated`."""
        if not self._keys:
            raise Unauthenticated("No token key is configured; tokens are refused.")
        if len(token) > MAX_TOKEN_LENGTH:
            raise Unauthenticated("The token is too long.")
        known = self._verified.get(token)
        if known is not None:
            if time.time() < known[1]:
                return known[0]
            del self._verified[token]
        claims = self._decode(token)
        try:
            parsed = msgspec.convert(claims, _Claims)
        except msgspec.ValidationError as exc:
            raise Unauthenticated(f"The token's claims are not valid: {exc}") from None
        principal = Principal(id=parsed.sub, role=parsed.role, clinic_id=parsed.clinic_id)
        self._remember(token, principal, claims["exp"])
        return principal

    def _remember(self, token: str, principal: Principal, exp: Any) -> None:
        if not isinstance(exp, int | float) or isinstance(exp, bool):
            return
        try:
            expires = float(exp)
        except OverflowError:  # exp 10**400: valid, and as good as never expiring
            expires = math.inf
        if len(self._verified) >= VERIFIED_TOKENS_CACHED:
            del self._verified[next(iter(self._verified))]
        self._verified[token] = (principal, expires)

    def _decode(self, token: str) -> dict[str, Any]:
        failure = "The token is not valid."
        for key, algorithms in self._keys:
            try:
                claims: dict[str, Any] = jwt.decode(
                    token,
                    key,
                    algorithms=algorithms,
                    issuer=self._issuer,
                    audience=self._audience,
                    leeway=self._leeway,
                    options={
                        "require": ["exp", "sub"],
                        "verify_aud": self._audience is not None,
                    },
                )
                return claims
            except jwt.ExpiredSignatureError:
                raise Unauthenticated("The token has expired.") from None
            except jwt.InvalidKeyError:
                # A token in an algorithm of another key type (ES256 against an RSA key):
                # not an InvalidTokenError, and its message describes our key.
                failure = "The token is not valid: no key of this service signed it."
            except (jwt.InvalidTokenError, ValueError, TypeError) as exc:
                failure = f"The token is not valid: {exc}."
        raise Unauthenticated(failure)


def mint_token(
    secret: str,
    role: Role,
    sub: UUID,
    clinic_id: UUID,
    ttl_seconds: int = 3600,
    issuer: str | None = None,
    audience: str | None = None,
) -> str:
    """An HS256 token for development and tests."""
    now = int(time.time())
    claims: dict[str, Any] = {
        "sub": str(sub),
        "role": role,
        "clinic_id": str(clinic_id),
        "iat": now,
        "exp": now + ttl_seconds,
    }
    if issuer:
        claims["iss"] = issuer
    if audience:
        claims["aud"] = audience
    return jwt.encode(claims, secret, algorithm="HS256")
