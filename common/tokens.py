"""Bearer tokens read from files: the agent's projected service-account token (sent to the
control plane on every connection) and the control plane's expected token (checked on every
stream). One reading for both: a regular file only (a FIFO would block the reader), at most
TOKEN_LIMIT bytes, UTF-8, trimmed."""

from __future__ import annotations

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
