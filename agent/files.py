"""The files the agent is told to read, checked once at start so that an unusable one is a
start-up error naming it (or a warning, where Istio tolerates it), not a failure much later.

A root certificate that is a directory, empty or not PEM is otherwise only found at the first
TLS handshake with the control plane, which then fails and is retried forever: the pod never
becomes ready and the log says `certificate verify failed` instead of naming the file.
"""

from __future__ import annotations

import binascii
import errno
import os
import re
import stat

MISSING = "does not exist"
_PEM_CERTIFICATE = re.compile(rb"-----BEGIN CERTIFICATE-----(.+?)-----END CERTIFICATE-----", re.DOTALL)


def _read(path: str) -> tuple[bytes | None, str | None]:
    """(contents, None), or (None, why the file cannot be read). stat before open: opening a
    FIFO would block until something writes to it."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return None, MISSING
    except OSError as err:
        return None, f"cannot be read: {err.strerror or err}"
    if stat.S_ISDIR(mode):
        return None, "is a directory"
    if not stat.S_ISREG(mode):
        return None, "is not a regular file"
    try:
        with open(path, "rb") as f:
            return f.read(), None
    except OSError as err:
        return None, f"cannot be read: {err.strerror or err}"


def _is_der_sequence(der: bytes) -> bool:
    """Whether `der` is exactly one DER SEQUENCE, which is what a certificate is on the outside."""
    if len(der) < 2 or der[0] != 0x30:
        return False
    length, rest = der[1], der[2:]
    if length & 0x80:
        size = length & 0x7F
        if not 1 <= size <= 4 or len(rest) < size:
            return False
        length, rest = int.from_bytes(rest[:size], "big"), rest[size:]
    return length == len(rest)


def root_cert_problem(path: str) -> str | None:
    """Why `path` cannot be the root certificate of the control-plane connection (MISSING when
    it does not exist), or None when it holds at least one PEM certificate block.

    Checked without OpenSSL (a block whose base64 is one whole DER structure): building an SSL
    context to parse it would cost the agent ~0.7 MB of RSS for good, OpenSSL's one-time set-up,
    and grpc verifies the certificate itself at every handshake."""
    data, problem = _read(path)
    if data is None:
        return problem
    if not data.strip():
        return "is empty"
    for block in _PEM_CERTIFICATE.finditer(data):
        try:
            if _is_der_sequence(binascii.a2b_base64(block.group(1))):
                return None
        except binascii.Error:
            continue
    return "holds no PEM certificate"


def token_problem(path: str) -> str | None:
    """Why the bearer-token file cannot be used, or None when it can, is absent or is empty:
    Istio treats those two as "no token" (the header is left out, mTLS alone may authenticate),
    and kubelet writes a projected token after the containers started."""
    data, problem = _read(path)
    if problem == MISSING:
        return None
    if data is None:
        return problem
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return "is not UTF-8 text"
    return None


def saved_table_problem(path: str) -> str | None:
    """Why `path` can never hold the saved name table, or None. Only what no save can get past
    counts: a directory or another non-file there, or a parent that is a file. A missing file is
    the first start; one that does not load is moved aside at start (xds_client/nds.py); an
    unwritable directory is warned about at each save, as it may be mounted writable later."""
    try:
        mode = os.stat(path).st_mode
    except OSError as err:
        return "has a parent that is not a directory" if err.errno == errno.ENOTDIR else None
    if stat.S_ISDIR(mode):
        return "is a directory"
    return None if stat.S_ISREG(mode) else "is not a regular file"
