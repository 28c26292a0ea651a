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

from pilotfish.common.tokens import TokenFileError, read_token_file
from pilotfish.common.files import UnreadableFile, read_regular_file

MISSING = "does not exist"
# Bounds on what is read at start: a CA bundle is tens to hundreds of KiB (Debian's whole system
# bundle is ~220 KiB), a service-account token 1-2 KiB; anything past these is not one.
ROOT_CERT_LIMIT = 10 << 20
_PEM_CERTIFICATE = re.compile(rb"-----BEGIN CERTIFICATE-----(.+?)-----END CERTIFICATE-----", re.DOTALL)


def _read(path: str, limit: int) -> tuple[bytes | None, str | None]:
    """(contents, None), or (None, why the file cannot be read: MISSING when it does not exist)."""
    try:
        return read_regular_file(path, limit), None
    except UnreadableFile as err:
        return None, MISSING if err.missing else str(err)


SEQUENCE, INTEGER, BIT_STRING, UTC_TIME, GENERALIZED_TIME = 0x30, 0x02, 0x03, 0x17, 0x18
VERSION, ISSUER_UID, SUBJECT_UID, EXTENSIONS = 0xA0, 0xA1, 0xA2, 0xA3  # tbsCertificate's [0]..[3]


def _elements(der: bytes, start: int, end: int) -> list[tuple[int, int, int]] | None:
    """The DER elements that exactly fill der[start:end], as (tag, content start, content end);
    None when they do not (a length past the end, a truncated header, bytes left over)."""
    out = []
    while start < end:
        if end - start < 2:
            return None
        tag, length, start = der[start], der[start + 1], start + 2
        if tag & 0x1F == 0x1F:  # a multi-byte tag: none in a certificate's outline
            return None
        if length & 0x80:
            size = length & 0x7F
            if not 1 <= size <= 4 or end - start < size:
                return None
            length, start = int.from_bytes(der[start:start + size], "big"), start + size
        if end - start < length:
            return None
        out.append((tag, start, start + length))
        start += length
    return out


def _tags(der: bytes, element: tuple[int, int, int]) -> list[int] | None:
    """The tags of the elements inside `element`, None when its content is not DER elements."""
    inner = _elements(der, element[1], element[2])
    return None if inner is None else [tag for tag, _, _ in inner]


def is_certificate(der: bytes) -> bool:
    """Whether `der` has the outline of an X.509 certificate (RFC 5280 §4.1): a SEQUENCE of
    tbsCertificate (SEQUENCE), signatureAlgorithm (SEQUENCE) and signatureValue (BIT STRING),
    the tbsCertificate holding [0] version?, serialNumber (INTEGER), signature, issuer,
    validity (two times), subject, subjectPublicKeyInfo (SEQUENCEs), then [1] [2] [3] at most.

    Enough to tell a certificate from other PEM payloads, junk or an empty SEQUENCE (`MAA=`);
    whether it verifies the control plane is grpc's business at the handshake."""
    outer = _elements(der, 0, len(der))
    if outer is None or len(outer) != 1 or outer[0][0] != SEQUENCE:
        return False
    parts = _elements(der, outer[0][1], outer[0][2])
    if parts is None or [tag for tag, _, _ in parts] != [SEQUENCE, SEQUENCE, BIT_STRING]:
        return False
    tbs = _elements(der, parts[0][1], parts[0][2])
    if tbs is None:
        return False
    tags = [tag for tag, _, _ in tbs]
    if tags[:1] == [VERSION]:
        tbs, tags = tbs[1:], tags[1:]
    if tags[:6] != [INTEGER] + [SEQUENCE] * 5:
        return False
    optional = tags[6:]
    if optional != sorted(set(optional)) or not set(optional) <= {ISSUER_UID, SUBJECT_UID, EXTENSIONS}:
        return False
    validity, key = _tags(der, tbs[3]), _tags(der, tbs[5])
    return (validity is not None and len(validity) == 2 and set(validity) <= {UTC_TIME, GENERALIZED_TIME}
            and key == [SEQUENCE, BIT_STRING])


def root_cert_problem(path: str) -> str | None:
    """Why `path` cannot be the root certificate of the control-plane connection (MISSING when
    it does not exist), or None when it holds at least one PEM certificate block.

    Checked without OpenSSL or `cryptography` (a block whose base64 has a certificate's DER
    outline, `is_certificate`): an SSL context to parse it would cost the agent ~0.7 MB of RSS
    for good, OpenSSL's one-time set-up, and importing `cryptography.x509` ~8.5 MB (measured
    at agent start); grpc verifies the certificate itself at every handshake."""
    data, problem = _read(path, ROOT_CERT_LIMIT)
    if data is None:
        return problem
    if not data.strip():
        return "is empty"
    for block in _PEM_CERTIFICATE.finditer(data):
        try:
            if is_certificate(binascii.a2b_base64(block.group(1))):
                return None
        except binascii.Error:
            continue
    return "holds no PEM certificate"


def token_problem(path: str) -> str | None:
    """Why the bearer-token file cannot be used, or None when it can, is absent or is empty:
    Istio treats those two as "no token" (the header is left out, mTLS alone may authenticate),
    and kubelet writes a projected token after the containers started."""
    try:
        token = read_token_file(path)
    except TokenFileError as err:
        return None if err.missing else str(err)
    if not token.isascii() or not token.isprintable():
        return "holds characters a header cannot carry (control characters or non-ASCII)"
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
