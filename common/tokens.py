"""Bearer tokens read from files: the agent's projected service-account token (sent to the
control plane on every connection) and the control plane's expected token (checked on every
stream). One reading for both: a regular file only (a FIFO would block the reader), at most
TOKEN_LIMIT bytes, UTF-8, trimmed."""

from __future__ import annotations

import base64
import binascii
import json

from .files import UnreadableFile, read_regular_file

TOKEN_LIMIT = 1 << 20  # a service-account token is 1-2 KiB


class TokenFileError(ValueError):
    """The token file cannot give a token; the message says why, without the path. `missing`
    when there is no file (kubelet writes a projected token after the containers start)."""

    def __init__(self, reason: str, missing: bool = False) -> None:
        super().__init__(reason)
        self.missing = missing


def read_token_file(path: str) -> str:
    """The token in `path`, trimmed (possibly empty), or TokenFileError."""
    try:
        data = read_regular_file(path, TOKEN_LIMIT)
    except UnreadableFile as err:
        raise TokenFileError(str(err), err.missing) from None
    try:
        return data.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise TokenFileError("is not UTF-8 text") from None


def token_expiry(token: str) -> float | None:
    """The `exp` claim (Unix seconds) of a JWT, read without verifying it (the issuer checks
    that); None when the token is not a JWT with one. Used to tell a token that can no longer
    authenticate from one that can, before sending it."""
    parts = token.split(".")
    if len(parts) != 3 or len(parts[1]) > 64 * 1024:
        return None
    try:
        claims = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (ValueError, binascii.Error):
        return None
    exp = claims.get("exp") if isinstance(claims, dict) else None
    return float(exp) if isinstance(exp, (int, float)) and not isinstance(exp, bool) else None
