"""When to renew a certificate (docs/identity.md "Rotation"): at expiry minus a grace of
`ratio ± jitter` of its lifetime, the ratio `SECRET_GRACE_PERIOD_RATIO` (0.5) and the jitter
uniform in ±`SECRET_GRACE_PERIOD_RATIO_JITTER` (0.01), clamped to [0, 1], so that a fleet
issued at once does not renew at once. Pure: the random draw is passed in.
"""

from __future__ import annotations


def grace_ratio(ratio: float, jitter: float, draw: float) -> float:
    """`ratio` moved by `jitter` × (2·draw − 1), `draw` uniform in [0, 1), clamped to [0, 1]."""
    return min(1.0, max(0.0, ratio + jitter * (2.0 * draw - 1.0)))


def renew_at(created: float, expires: float, ratio: float, jitter: float, draw: float) -> float:
    """The time to renew a certificate valid from `created` (when it arrived) to `expires`."""
    lifetime = max(0.0, expires - created)
    return expires - grace_ratio(ratio, jitter, draw) * lifetime


def renewal_delay(now: float, created: float, expires: float, ratio: float, jitter: float, draw: float) -> float:
    """Seconds from `now` until the renewal; 0 when it is due."""
    return max(0.0, renew_at(created, expires, ratio, jitter, draw) - now)
