"""Typed capture settings and rules as data: parsed once, rendered in one place (init/rules.py)."""

from __future__ import annotations

import ipaddress

from pilotfish.init.config import CaptureConfig, Detected, Nameserver, PortRange, parse_args, validate
from pilotfish.init.planner import plan
from pilotfish.init.rules import (
    RETURN,
    TCP,
    UDP,
    Chain,
    CtZone,
    Destination,
    DestinationPort,
    DestinationPorts,
    Host,
    Owner,
    Redirect,
    Spec,
    Table,
    families,
    render,
)


def test_settings_are_parsed_once_into_typed_values() -> None:
    config, _ = parse_args(["-b", "80,9000:9100", "-i", "10.1.2.3/8", "-c", "eth0,veth+", "-m", "TPROXY",
                            "-t", "7"], {"ISTIO_OUTBOUND_OWNER_GROUPS": "java,202"})
    capture = validate(config)
    assert capture is config.capture  # kept: the planner reads the same object
    assert capture.inbound_ports == (PortRange(80, 80), PortRange(9000, 9100))
    assert capture.include_cidrs == (ipaddress.ip_interface("10.1.2.3/8"),)
    assert capture.exclude_interfaces == ("eth0", "veth+") and capture.tproxy and capture.tproxy_mark == 7
    assert capture.owner_groups_include == ("java", "202") and capture.envoy_port == 15001
    star = CaptureConfig(inbound_ports="*", service_cidr="*").capture
    assert star.inbound_ports is None and star.include_cidrs is None and star.owner_groups_include is None


def test_a_spec_renders_per_family() -> None:
    """The family decides the `Host` addresses; a nameserver keeps the text detection gave it."""
    v4, v6 = families(ipaddress.IPv4Interface("127.0.0.1/8"), ipv6=True)
    lo_redirect = Spec(Table.NAT, Chain.ISTIO_OUTPUT, (Destination(Host.LOOPBACK, negate=True), TCP,
                       DestinationPorts((53, 15008), negate=True), Owner("1337")), RETURN)
    assert render(lo_redirect, v4).text() == (
        "-A ISTIO_OUTPUT ! -d 127.0.0.1/8 -p tcp -m multiport ! --dports 53,15008 -m owner --uid-owner 1337 -j RETURN")
    assert render(lo_redirect, v6).args[:3] == ("!", "-d", "::1/128")
    server = Nameserver(ipaddress.ip_address("::127.0.0.53"), "::127.0.0.53")
    dns = Spec(Table.NAT, Chain.ISTIO_OUTPUT_DNS, (UDP, DestinationPort(53), Destination(server)),
               Redirect(15053, plural=False))
    assert render(dns, v6).text() == "-A ISTIO_OUTPUT_DNS -p udp --dport 53 -d ::127.0.0.53/128 -j REDIRECT --to-port 15053"
    zone = Spec(Table.RAW, Chain.ISTIO_OUTPUT_DNS, (DestinationPort(PortRange(1, 9)), Owner("7", group=True)),
                CtZone(2), insert=1)
    assert render(zone, v4).text() == "-I ISTIO_OUTPUT_DNS 1 --dport 1:9 -m owner --gid-owner 7 -j CT --zone 2"


def test_leading_zeros_are_read_as_decimal() -> None:
    """Validation says decimal; iptables, given the text, reads `010` as port 8, refuses `080` half
    way through the apply, and sets mark 01337 as 735 while the ip rule used 1337. The typed values
    render as decimal numbers."""
    config, _ = parse_args(["-b", "080", "-m", "TPROXY", "-t", "01337"], {})
    rules = [rule.text() for rule in plan(config, Detected()).rules[4]]
    assert "-A ISTIO_DIVERT -j MARK --set-mark 1337" in rules
    assert "-A ISTIO_INBOUND -p tcp --dport 80 -j ISTIO_TPROXY" in rules
    assert not [rule for rule in rules if " 0" in rule]
