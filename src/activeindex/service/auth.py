"""The bearer token of write endpoints.

The token comes from ``ACTIVEINDEX_TOKEN`` or ``--token`` at start-up; it is never logged nor put
in a response. Without one, the service is read-only: writes get 403 whatever they send. A missing
or wrong token gets 401. Tokens are compared with :func:`hmac.compare_digest`, in constant time.
"""

from __future__ import annotations

import hmac

from fastapi import HTTPException
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

# auto_error=False: we answer 401 (not FastAPI's 403) for a missing header, with our own reason.
bearer = HTTPBearer(auto_error=False, description="the token the service was started with (ACTIVEINDEX_TOKEN)")


class TokenCheck:
    """The expected token (bytes), or None for a read-only service."""

    def __init__(self, token: str | None, *, disabled_reason: str | None = None) -> None:
        """``disabled_reason``: refuse every write (403) with this reason, whatever the token."""
        if token is not None and not token.strip():
            token = None
        self._token = None if token is None or disabled_reason else token.encode()  # UTF-8, as sent
        self._disabled = disabled_reason or "the service was started without a token (ACTIVEINDEX_TOKEN or --token)"

    @property
    def enabled(self) -> bool:
        return self._token is not None

    def __repr__(self) -> str:  # never show the token, even in a traceback's locals
        return f"TokenCheck(enabled={self.enabled})"

    def verify(self, credentials: HTTPAuthorizationCredentials | None) -> None:
        """Raise 403 (writes disabled), or 401 (missing or wrong token); return if allowed."""
        if self._token is None:
            raise HTTPException(403, f"writes are disabled: {self._disabled}")
        if credentials is None:
            raise HTTPException(401, "missing bearer token", headers={"WWW-Authenticate": "Bearer"})
        # Starlette decodes header bytes as latin-1: encoding back gives the bytes that were sent.
        sent = credentials.credentials.encode("latin-1", errors="replace")
        if not hmac.compare_digest(sent, self._token):
            raise HTTPException(401, "wrong bearer token", headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})
