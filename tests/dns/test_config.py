"""Parsers of Istio's DNS settings: Go durations and booleans, resolv.conf, DNS_PROXY_ADDR."""

from __future__ import annotations

import pytest

from pilotfish.common.resolv import parse_resolv_conf
from pilotfish.common.settings import ConfigError, parse_bool, parse_duration
from pilotfish.dns.config import listen_addresses, upstreams_from_resolv


@pytest.mark.parametrize(
    "text,seconds", [("300ms", 0.3), ("5s", 5.0), ("1m30s", 90.0), ("1.5h", 5400.0), ("0", 0.0), ("250us", 0.00025)]
)
def test_go_durations(text: str, seconds: float) -> None:
    assert parse_duration(text, "X") == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["5", "", "s", "5 s", "1d", "ms5"])
def test_bad_durations_name_the_setting(text: str) -> None:
    with pytest.raises(ConfigError, match=f"DNS_FORWARD_TIMEOUT: invalid duration {text!r}"):
        parse_duration(text, "DNS_FORWARD_TIMEOUT")


def test_go_booleans() -> None:
    assert [parse_bool(v, "X") for v in ("1", "t", "TRUE", "True", "0", "f", "false")] == [True] * 4 + [False] * 3
    with pytest.raises(ConfigError, match="DNS_FORWARD_PARALLEL: invalid boolean 'yes'"):
        parse_bool("yes", "DNS_FORWARD_PARALLEL")


def test_resolv_conf_as_miekg_reads_it() -> None:
    conf = parse_resolv_conf(
        "# comment\nnameserver 10.96.0.10\nsearch a.local b.local\n; other\nnameserver fd00::a\n"
        "options ndots:5 timeout:1\ndomain only.local\nsearch ns1.svc.cluster.local svc.cluster.local\n"
    )
    assert conf.nameservers == ("10.96.0.10", "fd00::a")
    assert conf.search == ("ns1.svc.cluster.local", "svc.cluster.local")  # the last line wins
    assert upstreams_from_resolv(conf) == (("10.96.0.10", 53), ("fd00::a", 53))
    assert parse_resolv_conf("search x\ndomain y.local\n").search == ("y.local",)


@pytest.mark.parametrize(
    "addr,nameservers,root,expect",
    [
        ("", ("10.96.0.10",), False, ((("127.0.0.1", 15053),), False)),
        ("", ("fd00::a",), False, ((("::1", 15053),), False)),
        ("localhost:15053", ("10.0.0.1", "fd00::a"), False, ((("127.0.0.1", 15053), ("::1", 15053)), False)),
        ("localhost:15053", ("dns.example",), False, ((("127.0.0.1", 15053),), False)),
        ("127.0.0.1:5353", ("fd00::a",), False, ((("127.0.0.1", 5353),), False)),
        ("[::1]:15053", (), False, ((("::1", 15053),), False)),
        ("localhost:53", ("10.0.0.1",), True, ((("127.0.0.1", 53),), True)),
        ("localhost:53", ("10.0.0.1",), False, ((("127.0.0.1", 15053),), False)),
    ],
)
def test_listen_addresses_follow_istio(addr: str, nameservers: tuple[str, ...], root: bool, expect: tuple) -> None:
    listen, before_table, warning = listen_addresses(addr, nameservers, root)
    assert (listen, before_table) == expect
    assert (warning is not None) == (addr.endswith(":53") and not root)


@pytest.mark.parametrize("addr", ["localhost", "localhost:port", "[::1:53", "1.2.3.4:70000"])
def test_bad_listen_address(addr: str) -> None:
    with pytest.raises(ConfigError, match="DNS_PROXY_ADDR"):
        listen_addresses(addr, (), False)
