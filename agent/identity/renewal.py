"""What the identity does next, decided without I/O (docs/identity.md "Rotation"): which client
certificate to present to the CA, how long to wait after a failure, when a certificate's life is
running out.

The client certificate: PROV_CERT's while it is valid (Istio's rule, for VMs); beyond Istio,
the current certificate while it is valid when the token cannot authenticate (missing, empty or
expired): a VM's bootstrap token lasts an hour, its certificate a day, and this is what keeps it
in the mesh after the hour. Failures back off exponentially from 1 s to 2 min, with full jitter.
"""

from __future__ import annotations

BACKOFF_BASE = 1.0
BACKOFF_CAP = 120.0
LOW_LIFE = 0.2  # warn when less than this share of the certificate's life is left


def token_usable(token: str, expiry: float | None, now: float) -> bool:
    """Whether a token can authenticate: present, and not past its `exp` when it has one."""
    return bool(token) and (expiry is None or now < expiry)


def present_current(token_ok: bool, prov_cert_valid: bool, current_valid: bool) -> bool:
    """Whether to present the current certificate to the CA (see the module's docstring)."""
    return not prov_cert_valid and not token_ok and current_valid


def failure_delay(failures: int, draw: float, base: float = BACKOFF_BASE, cap: float = BACKOFF_CAP) -> float:
    """The wait after `failures` failed attempts in a row (1 or more); `draw` uniform in [0, 1)."""
    return draw * min(cap, base * 2.0 ** min(failures - 1, 32))


def life_left(now: float, created: float, expires: float) -> float:
    """The share of the certificate's life still ahead, in [0, 1]."""
    lifetime = expires - created
    return 0.0 if lifetime <= 0 else min(1.0, max(0.0, (expires - now) / lifetime))
