"""The reconnect backoff: grows while streams deliver nothing, back to the base after any stream
that delivered, whether it ended cleanly or with an error."""

from __future__ import annotations

from pilotfish.xds_client.backoff import Backoff


def test_grows_to_the_cap_while_nothing_is_delivered() -> None:
    backoff = Backoff(base=0.5, cap=30)
    assert [backoff.after_stream(delivered=False) for _ in range(9)] == [0.5, 1, 2, 4, 8, 16, 30, 30, 30]


def test_a_stream_that_delivered_resets_it_to_the_base() -> None:
    """The reported case: control plane restarted several times; each stream delivered a table,
    then ended with an error; the attempts in between failed. After every delivering stream the
    wait is at most the base, never 15-30 s."""
    backoff = Backoff(base=0.5, cap=30)
    for _ in range(5):
        assert backoff.after_stream(delivered=True) == 0.5
        assert [backoff.after_stream(delivered=False) for _ in range(4)] == [0.5, 1, 2, 4]
