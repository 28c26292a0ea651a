"""pilotfish's DNS proxy against Istio's recorded behaviour (``data/cases.json``).

One test per ``kind: "query"`` vector, run through the proxy's core in-process
(tests/dns/engine_harness.py): the answer engine and the real forwarders, each case with a
fresh upstream cache (it would otherwise hide later upstream queries), the dnslib mock upstream
as the vector's ``proxy_config`` describes it, and the vector's NameTable. The query is built
with dnslib (or sent as the vector's raw bytes), the reply is decoded with dnslib, and both the
reply and what the mock upstream received are compared with the vector. Nothing of pilotfish is
used to build or judge packets. A few vectors also go through a real proxy on loopback sockets
(``SOCKET_CASES``), for what is about transport.

``policy: match`` vectors must give Istio's reply, with these documented, deliberate improvements
applied to the expectation (pilotfish does better than Istio here):

a. Queries pilotfish sends upstream over UDP carry EDNS0: an expected ``edns_udp_size`` of null
   becomes 1232; a client size below 1232 becomes 1232; 1232 or more stays the client's size.
   Queries sent upstream over TCP are unchanged.
b. A reply *made by the proxy* (a local answer from the table, or a proxy-made SERVFAIL) to a
   query that carried an OPT record carries an OPT record ``{udp_size: 1232, do: <the query's DO
   bit>}``. Replies relayed from the upstream are unchanged (their OPT is whatever the upstream
   sent; if the client sent no OPT the upstream's OPT is removed). Rejections of malformed input
   (FORMERR, NOTIMP, REFUSED for the vectors' hand-made ``raw_hex`` packets) stay without OPT.
   "Proxy-made" is decided from the vector: not forwarded, or SERVFAIL (none of the mock
   upstreams ever answers SERVFAIL).

``policy: improve`` vectors assert the case's ``improvement`` text instead of ``istio_expect``:

* ``udp: large request`` (``giant.`` over UDP without EDNS): NOERROR with TC=1, AA=0, the records
  truncated to fit 512 bytes (at least one, all from the upstream's 64, no duplicates), and the
  upstream query went over UDP with EDNS size 1232. (The mock sends its whole 2263-byte reply
  even over UDP, so the proxy must read upstream replies with a large buffer.)
* ``search: second/third search domain``: answered locally with ``CNAME www.google.com.`` +
  ``A 1.1.1.1``, AA=1, NOERROR, not forwarded.
* ``edns: local answer to EDNS query``: Istio's local answer plus ``OPT {1232, do: false}``.
* ``size: UDP query larger than 512 bytes``: the same reply as the TCP vector with the same
  query (``size: same >512 byte query over TCP is fine``, with improvement b), never FORMERR.
* ``no-nameservers parallel``: SERVFAIL at once (within 0.5 s), as in serial mode.

Checks beyond the vectors' fields: a UDP reply never exceeds the client's limit (512, or its EDNS
size if larger); ``min_latency_ms`` and ``max_latency_ms`` are respected on the forwarders' clock
(virtual: a timeout costs no wall time); nothing at ERROR level or with a traceback is logged by
the ``pilotfish`` loggers during the case; over sockets, ``serve()`` neither raises nor returns
by itself.

No vector has DO=1, a forwarded query with a client EDNS size below 1232, or a proxy-made
SERVFAIL to an EDNS query, so a few match vectors are also re-sent with an OPT record
(``[derived from vector] ...``): Istio's reply to them is the same (it ignores the client's OPT
except to forward it), and improvements a and b give the expectation.
"""

from __future__ import annotations

import copy
import ipaddress
import json
import logging
import struct
from collections.abc import Callable
from typing import Any

import pytest
from dnslib import EDNS0, OPCODE, QTYPE, RCODE, DNSHeader, DNSLabel, DNSQuestion, DNSRecord, EDNSOption

from engine_harness import Engine, Upstream
from mock_upstream import MockUpstream, ReceivedQuery, class_name, type_name
from pilotfish.dns.config import DnsConfig
from proxy_harness import ProxyRunner, exchange
from vectors import cases, fixture_table, name_table

QUERY_CASES = cases("query")
BY_NAME = {c["name"]: c for c in QUERY_CASES}

PILOTFISH_EDNS_SIZE = 1232
REPLY_TIMEOUT = 5.0  # upper bound only: replies normally arrive within milliseconds
AT_ONCE_MS = 500.0
EDNS_PADDING = 12  # RFC 7830 option code
TYPE_OPT = 41

Expect = dict[str, Any]


# --- vector -> test set-up ----------------------------------------------------------------------


# proxy_config.upstream (free text) -> mock behaviour; matched by distinctive phrases.
UPSTREAM_PHRASES = (
    ("reads queries and never answers", "silent"),
    ("answers every query with REFUSED", "refused"),
    ("message ID = query ID + 1", "bad_id"),
    ("adds an OPT record", "edns"),
    ("a copy of makeUpstream()", "normal"),
)

# proxy_config.nameservers (free text) -> what the resolv.conf list holds, in order.
NAMESERVER_PLANS = {
    "resolv.conf has exactly one nameserver: the mock upstream": ("mock",),
    "resolv.conf has no usable nameserver (empty server list)": (),
    "two nameservers: a closed local port (connection refused) and the mock upstream": ("closed", "mock"),
}


def upstream_behaviour(description: str) -> str:
    matches = [b for phrase, b in UPSTREAM_PHRASES if phrase in description]
    if len(matches) != 1:
        raise AssertionError(f"no single mock behaviour for upstream description {description!r}")
    return matches[0]


def nameserver_plan(description: str) -> tuple[str, ...]:
    if description not in NAMESERVER_PLANS:
        raise AssertionError(f"unknown nameserver set-up {description!r}")
    return NAMESERVER_PLANS[description]


def make_config(pc: dict[str, Any], upstreams: tuple[tuple[str, int], ...]) -> DnsConfig:
    if pc.get("respond_before_sync"):
        raise AssertionError("respond_before_sync vectors are not supported by this harness")
    return DnsConfig(
        listen=(("127.0.0.1", 0),),
        upstreams=upstreams,
        search=tuple(pc["search_domains"] or ()),
        proxy_namespace=pc["proxy_namespace"],
        proxy_domain=pc["proxy_domain"],
        forward_parallel=pc["forward_parallel"],
        forward_timeout=pc["upstream_timeout_ms"] / 1000.0,
        cache_size=10000,
    )


def tables_for(case: dict[str, Any]) -> list[Any]:
    """The NameTables to push, in order (none before the first table: 'before_sync')."""
    if not case["proxy_config"]["table_loaded"]:
        return []
    tables = [name_table(case["table"])]
    if case["fixture"] == "swapped":  # table_history: istio_test first, then this one
        tables.insert(0, name_table(fixture_table("istio_test")))
    return tables


QCLASSES = {"IN": 1, "CH": 3, "HS": 4, "NONE": 254, "ANY": 255}


def _qtype_code(name: str) -> int:
    if name.startswith("TYPE") and name[4:].isdigit():
        return int(name[4:])
    return getattr(QTYPE, name)


def build_query(q: dict[str, Any]) -> bytes:
    """The vector's query as wire bytes, built with dnslib (or its raw bytes as they are)."""
    if q.get("raw_hex"):
        return bytes.fromhex(q["raw_hex"])
    header = DNSHeader(id=q["id"], bitmap=0)
    header.opcode = getattr(OPCODE, q["opcode"])
    header.rd = int(q["rd"])
    header.cd = int(q["cd"])
    question = DNSQuestion(DNSLabel(q["qname"].encode("ascii")), _qtype_code(q["qtype"]), QCLASSES[q["qclass"]])
    record = DNSRecord(header, q=question)
    edns = q.get("edns")
    if edns:
        opts = [EDNSOption(EDNS_PADDING, bytes(edns["padding_option_bytes"]))] if edns["padding_option_bytes"] else []
        record.add_ar(EDNS0(udp_len=edns["udp_size"], flags="do" if edns["do"] else "", opts=opts))
    return record.pack()


def query_id(q: dict[str, Any]) -> int:
    if q.get("raw_hex"):
        return struct.unpack("!H", bytes.fromhex(q["raw_hex"])[:2])[0]
    return q["id"]


# --- reply -> the vectors' form -----------------------------------------------------------------


def _value(rtype: str, value: str) -> str:
    """Canonical address text; Go prints an IPv4-mapped AAAA as '5.5.5.5', Python as '::ffff:…'."""
    if rtype == "A":
        return str(ipaddress.IPv4Address(value))
    if rtype == "AAAA":
        ip = ipaddress.ip_address(value)
        if ip.version == 4:
            ip = ipaddress.IPv6Address(b"\0" * 10 + b"\xff\xff" + ip.packed)
        return str(ip)
    return value


def rr_dict(rr: Any) -> dict[str, Any]:
    if rr.rtype == TYPE_OPT:
        return {"type": "OPT", "udp_size": rr.rclass, "do": bool(rr.edns_do)}
    rtype = type_name(rr.rtype)
    if rtype in ("CNAME", "NS", "PTR", "DNAME"):
        value = str(rr.rdata.label)
    elif rtype in ("A", "AAAA"):
        value = _value(rtype, str(rr.rdata))
    else:
        value = rr.rdata.toZone()
    return {"name": str(rr.rname), "type": rtype, "class": class_name(rr.rclass), "ttl": rr.ttl, "value": value}


def normalise_rr(rr: dict[str, Any]) -> dict[str, Any]:
    if rr.get("type") in ("A", "AAAA") and "value" in rr:
        return {**rr, "value": _value(rr["type"], rr["value"])}
    return rr


def describe_reply(msg: DNSRecord) -> dict[str, Any]:
    h = msg.header
    rcode = RCODE.get(h.rcode)
    opcode = OPCODE.get(h.opcode)
    return {
        "rcode": rcode if isinstance(rcode, str) else h.rcode,
        "id": h.id,
        "opcode": opcode if isinstance(opcode, str) else h.opcode,
        "flags": {
            "qr": bool(h.qr), "aa": bool(h.aa), "tc": bool(h.tc), "rd": bool(h.rd),
            "ra": bool(h.ra), "ad": bool(h.ad), "cd": bool(h.cd),
        },
        "question": [
            {"name": str(q.qname), "type": type_name(q.qtype), "class": class_name(q.qclass)}
            for q in msg.questions
        ],
        "answers": [rr_dict(rr) for rr in msg.rr],
        "authority": [rr_dict(rr) for rr in msg.auth],
        "additional": [rr_dict(rr) for rr in msg.ar],
    }


# --- expectations -------------------------------------------------------------------------------


def _query_opt(q: dict[str, Any]) -> dict[str, Any] | None:
    return q.get("edns") or None


def _proxy_made(case: dict[str, Any], expect: Expect) -> bool:
    if case["query"].get("raw_hex"):
        return False  # library-level rejections of hand-made packets
    return (not expect["forwarded_upstream"]) or expect["rcode"] == "SERVFAIL"


def improved_match_expectation(case: dict[str, Any]) -> Expect:
    """A match vector's expectation with improvements a and b (module docstring) applied."""
    expect = copy.deepcopy(case["expect"])
    for uq in expect["upstream_queries"]:
        if uq["transport"] == "udp":
            size = uq["edns_udp_size"]
            uq["edns_udp_size"] = PILOTFISH_EDNS_SIZE if size is None or size < PILOTFISH_EDNS_SIZE else size
    opt = _query_opt(case["query"])
    if expect["response"] and opt is not None and _proxy_made(case, expect):
        expect["additional"] = [a for a in expect["additional"] if a.get("type") != "OPT"]
        expect["additional"].append({"type": "OPT", "udp_size": PILOTFISH_EDNS_SIZE, "do": opt["do"]})
    return expect


def _base(case: dict[str, Any]) -> Expect:
    return copy.deepcopy(case["istio_expect"])


def _improve_udp_large_request(case: dict[str, Any]) -> Expect:
    expect = _base(case)
    tcp_twin = BY_NAME[case["name"].replace("udp: large request (udp)", "tcp: large request (tcp)")]
    expect.update(
        rcode="NOERROR",
        answers_match="truncated_subset",
        answer_pool_records=copy.deepcopy(tcp_twin["expect"]["answers"]),
        answers=[],
        additional=[],
    )
    expect["flags"].update(tc=True, aa=False)
    expect["upstream_queries"][0]["edns_udp_size"] = PILOTFISH_EDNS_SIZE
    return expect


def _improve_search_domain(case: dict[str, Any]) -> Expect:
    expect = _base(case)
    qname = case["query"]["qname"]
    expect.update(
        rcode="NOERROR",
        answers_match="exact",
        answers=[
            {"name": qname.lower(), "type": "CNAME", "class": "IN", "ttl": 30, "value": "www.google.com."},
            {"name": "www.google.com.", "type": "A", "class": "IN", "ttl": 30, "value": "1.1.1.1"},
        ],
        authority=[],
        additional=[],
        forwarded_upstream=False,
        upstream_queries=[],
    )
    expect["flags"].update(aa=True, tc=False, ra=False)
    return expect


def _improve_local_edns(case: dict[str, Any]) -> Expect:
    expect = _base(case)
    expect["additional"] = [{"type": "OPT", "udp_size": PILOTFISH_EDNS_SIZE, "do": case["query"]["edns"]["do"]}]
    return expect


def _improve_big_udp_query(case: dict[str, Any]) -> Expect:
    twin = BY_NAME["[istio_test/serial/derived] size: same >512 byte query over TCP is fine (tcp)"]
    if {k: v for k, v in twin["query"].items() if k not in ("id", "transport")} != {
        k: v for k, v in case["query"].items() if k not in ("id", "transport")
    }:
        raise AssertionError("the TCP twin of the >512-byte UDP query differs")
    expect = improved_match_expectation(twin)
    expect["id"] = case["query"]["id"]
    return expect


def _improve_no_nameservers_parallel(case: dict[str, Any]) -> Expect:
    twin = BY_NAME["[no_upstreams/serial] no-nameservers serial: SERVFAIL (udp)"]
    if twin["query"] != case["query"]:
        raise AssertionError("the serial twin of the parallel no-nameservers case differs")
    expect = improved_match_expectation(twin)
    expect["max_latency_ms"] = AT_ONCE_MS
    return expect


IMPROVEMENTS: tuple[tuple[str, Callable[[dict[str, Any]], Expect]], ...] = (
    ("] udp: large request (udp)", _improve_udp_large_request),
    ("search: second search domain is not expanded", _improve_search_domain),
    ("search: third search domain is not expanded", _improve_search_domain),
    ("edns: local answer to EDNS query has no OPT record", _improve_local_edns),
    ("size: UDP query larger than 512 bytes", _improve_big_udp_query),
    ("no-nameservers parallel", _improve_no_nameservers_parallel),
)


def expectation(case: dict[str, Any]) -> Expect:
    if case["policy"] == "match":
        return improved_match_expectation(case)
    if case["policy"] != "improve":
        raise AssertionError(f"unknown policy {case['policy']!r}")
    handlers = [fn for key, fn in IMPROVEMENTS if key in case["name"]]
    if len(handlers) != 1:
        raise AssertionError(f"no single improvement handler for {case['name']!r}: {case['improvement']}")
    return handlers[0](case)


# --- comparison ---------------------------------------------------------------------------------


def _key(rr: dict[str, Any]) -> str:
    return json.dumps(rr, sort_keys=True)


def _leading_cnames(rrs: list[dict[str, Any]]) -> int:
    n = 0
    while n < len(rrs) and rrs[n]["type"] == "CNAME":
        n += 1
    return n


def compare_answers(expect: Expect, got: list[dict[str, Any]]) -> list[str]:
    mode = expect.get("answers_match", "exact")
    want = [normalise_rr(rr) for rr in expect.get("answers", [])]
    if mode == "exact":
        return [] if got == want else [f"answers: want {want}\n            got  {got}"]
    if mode == "unordered":
        n = _leading_cnames(want)
        if got[:n] != want[:n] or sorted(map(_key, got[n:])) != sorted(map(_key, want[n:])):
            return [f"answers (CNAME first, then any order): want {want}\n            got  {got}"]
        return []
    if mode == "count_and_pool":
        diffs = []
        n = _leading_cnames(want)
        if len(got) != expect["answer_count"]:
            diffs.append(f"answer count: want {expect['answer_count']}, got {len(got)}")
        if got[:n] != want[:n]:
            diffs.append(f"leading CNAME: want {want[:n]}, got {got[:n]}")
        template = {k: v for k, v in want[n].items() if k != "value"}
        pool = {_value(template["type"], v) for v in expect["answer_pool"]}
        rest = got[n:]
        bad = [rr for rr in rest if {k: v for k, v in rr.items() if k != "value"} != template or rr["value"] not in pool]
        if bad:
            diffs.append(f"answers outside the pool / not like {template}: {bad[:5]}")
        values = [rr["value"] for rr in rest]
        if len(set(values)) != len(values):
            diffs.append("duplicate answers")
        return diffs
    if mode == "truncated_subset":
        pool = {_key(normalise_rr(rr)) for rr in expect["answer_pool_records"]}
        keys = [_key(rr) for rr in got]
        diffs = []
        if not got:
            diffs.append("answers: want at least one of the upstream's records, got none")
        if any(k not in pool for k in keys):
            diffs.append(f"answers not from the upstream's reply: {[rr for rr in got if _key(rr) not in pool][:5]}")
        if len(set(keys)) != len(keys):
            diffs.append("duplicate answers")
        return diffs
    raise AssertionError(f"unknown answers_match {mode!r}")


def compare(
    expect: Expect,
    reply: bytes | None,
    upstream: list[ReceivedQuery],
    client_id: int,
    transport: str,
    udp_limit: int,
    elapsed_ms: float,
) -> list[str]:
    """All differences between the expectation and what happened (empty: the case passes)."""
    diffs: list[str] = []
    if not expect["response"]:
        if reply is not None:
            diffs.append(f"response: want none, got {reply.hex()}")
    elif reply is None:
        diffs.append("response: want a reply, got none in time")
    else:
        try:
            got = describe_reply(DNSRecord.parse(reply))
        except Exception as exc:  # noqa: BLE001 - any decode failure is a difference
            diffs.append(f"reply does not parse with dnslib ({exc}): {reply.hex()}")
            got = None
        if got is not None:
            for field in ("rcode", "id", "opcode", "question"):
                if got[field] != expect[field]:
                    diffs.append(f"{field}: want {expect[field]!r}, got {got[field]!r}")
            for flag, want in expect["flags"].items():
                if got["flags"][flag] != want:
                    diffs.append(f"flag {flag}: want {want}, got {got['flags'][flag]}")
            diffs += compare_answers(expect, got["answers"])
            for section in ("authority", "additional"):
                want_rrs = [normalise_rr(rr) for rr in expect[section]]
                if got[section] != want_rrs:
                    diffs.append(f"{section}: want {want_rrs}, got {got[section]}")
        if transport == "udp" and len(reply) > udp_limit:
            diffs.append(f"UDP reply of {len(reply)} bytes exceeds the client's limit of {udp_limit}")
    forwarded = bool(upstream)
    if forwarded != expect["forwarded_upstream"]:
        diffs.append(f"forwarded_upstream: want {expect['forwarded_upstream']}, got {forwarded}")
    got_uq = [q.as_vector(client_id) for q in upstream]
    if got_uq != expect["upstream_queries"]:
        diffs.append(f"upstream_queries: want {expect['upstream_queries']}\n            got  {got_uq}")
    if "min_latency_ms" in expect and elapsed_ms < expect["min_latency_ms"]:
        diffs.append(f"latency: want at least {expect['min_latency_ms']} ms, got {elapsed_ms:.0f} ms")
    if "max_latency_ms" in expect and elapsed_ms > expect["max_latency_ms"]:
        diffs.append(f"latency: want at most {expect['max_latency_ms']} ms, got {elapsed_ms:.0f} ms")
    return diffs


def udp_limit(q: dict[str, Any]) -> int:
    edns = q.get("edns")
    return max(512, edns["udp_size"]) if edns else 512


# --- the tests ----------------------------------------------------------------------------------


def _with_edns(name: str, udp_size: int, do: bool, label: str) -> dict[str, Any]:
    """A match vector re-sent with an OPT record, to exercise improvements a and b where no
    vector does (DO=1, a client size below 1232 on a forwarded query, proxy-made SERVFAIL)."""
    case = copy.deepcopy(BY_NAME[name])
    if case["policy"] != "match" or case["query"].get("edns") or case["query"].get("raw_hex"):
        raise AssertionError(f"{name!r} cannot be re-sent with EDNS")
    case["name"] = f"[derived from vector] {label}"
    case["query"]["edns"] = {"udp_size": udp_size, "do": do, "padding_option_bytes": 0}
    for uq in case["expect"]["upstream_queries"]:
        uq["edns_udp_size"] = udp_size  # Istio forwards the client's OPT as it is
    return case


DERIVED_CASES = [
    _with_edns("[istio_test/serial] success: non k8s host in local cache (udp)", 4096, True,
               "local answer, EDNS with DO=1 (udp)"),
    _with_edns("[istio_test/serial] success: non k8s host with search namespace yields cname+A record (tcp)",
               1232, True, "local CNAME+A, EDNS with DO=1 (tcp)"),
    _with_edns("[istio_test/serial] success: Error response if only A records exist for typeAAAA (udp)",
               512, False, "local empty NOERROR, EDNS 512 (udp)"),
    _with_edns("[istio_test/serial] success: non k8s host not in local cache (udp)", 512, True,
               "forwarded, client EDNS 512 raised to 1232 upstream, no OPT relayed (udp)"),
    _with_edns("[istio_test/serial] success: non k8s host not in local cache (tcp)", 512, False,
               "forwarded over TCP keeps the client's EDNS 512 (tcp)"),
    _with_edns("[before_sync] before-sync: mesh name gets SERVFAIL (udp)", 1232, True,
               "before-sync SERVFAIL to an EDNS query, DO=1 (udp)"),
    _with_edns("[upstream_silent] upstream-timeout: UDP gets SERVFAIL after forward timeout (udp)", 1232, False,
               "upstream-timeout SERVFAIL to an EDNS query (udp)"),
    _with_edns("[no_upstreams/serial] no-nameservers serial: SERVFAIL (udp)", 4096, True,
               "no-nameservers SERVFAIL to an EDNS query, DO=1 (udp)"),
]


MOCK_SERVER = ("127.0.0.1", 53)  # in-process, addresses only name the upstreams
CLOSED_SERVER = ("127.0.0.1", 1)


def _bad_logs(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        f"logged {r.levelname}: {r.name}: {r.getMessage()}"
        for r in caplog.records
        if r.name.startswith("pilotfish") and (r.levelno >= logging.ERROR or r.exc_info)
    ]


def _table(case: dict[str, Any]) -> Any | None:
    """The NameTable being served: the last one pushed (the engine has no memo to carry)."""
    tables = tables_for(case)
    return tables[-1] if tables else None


@pytest.mark.parametrize(
    "case", QUERY_CASES + DERIVED_CASES, ids=[c["name"] for c in QUERY_CASES + DERIVED_CASES]
)
def test_vector(case: dict[str, Any], caplog: pytest.LogCaptureFixture) -> None:
    """The vector through the proxy's core in-process (tests/dns/engine_harness.py): latencies
    are measured on the clock the forwarders read."""
    caplog.set_level(logging.WARNING, logger="pilotfish")
    expect = expectation(case)
    pc = case["proxy_config"]
    q = case["query"]
    plan = nameserver_plan(pc["nameservers"])
    upstream = Upstream(upstream_behaviour(pc["upstream"]), frozenset({CLOSED_SERVER}))
    servers = tuple(CLOSED_SERVER if kind == "closed" else MOCK_SERVER for kind in plan)
    got = Engine(make_config(pc, servers), _table(case), upstream).ask(build_query(q), q["transport"])
    diffs = compare(
        expect, got.reply, upstream.queries, query_id(q), q["transport"], udp_limit(q), got.elapsed * 1000.0
    )
    diffs += _bad_logs(caplog)
    assert not diffs, f"{case['name']} ({case['policy']}):\n  - " + "\n  - ".join(diffs)


# One or two vectors per transport through a real proxy on loopback sockets, for what the core
# does not hold: datagrams and TCP framing to and from the client and the upstream, a 2263-byte
# upstream datagram read whole and truncated for a 512-byte client.
SOCKET_CASES = [
    "[istio_test/serial] success: non k8s host in local cache (udp)",
    "[istio_test/serial] success: non k8s host not in local cache (udp)",
    "[istio_test/serial] udp: large request (udp)",
    "[istio_test/serial] success: non k8s host with search namespace yields cname+A record (tcp)",
    "[istio_test/serial] success: non k8s host not in local cache (tcp)",
    "[istio_test/serial] tcp: large request (tcp)",
]


@pytest.mark.parametrize("name", SOCKET_CASES)
def test_vector_over_sockets(name: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="pilotfish")
    case = BY_NAME[name]
    expect = expectation(case)
    assert expect["response"] and "min_latency_ms" not in expect and "max_latency_ms" not in expect
    pc = case["proxy_config"]
    q = case["query"]
    with MockUpstream(upstream_behaviour(pc["upstream"])) as mock:
        assert nameserver_plan(pc["nameservers"]) == ("mock",)
        with ProxyRunner(make_config(pc, (mock.address,)), tables_for(case)) as runner:
            reply = exchange(q["transport"], runner.address(q["transport"]), build_query(q), REPLY_TIMEOUT)
            upstream = mock.queries
            alive = runner.alive
    diffs = compare(expect, reply, upstream, query_id(q), q["transport"], udp_limit(q), 0.0)
    if not alive:
        diffs.append("the proxy thread died while serving")
    if mock.errors:
        diffs.append(f"mock upstream errors (harness problem): {mock.errors}")
    diffs += _bad_logs(caplog)
    assert not diffs, f"{name}:\n  - " + "\n  - ".join(diffs)


def test_every_vector_is_covered() -> None:
    """Guards the harness itself: 205 query vectors, every description and improvement mapped."""
    assert len(QUERY_CASES) == 205
    assert len({c["name"] for c in QUERY_CASES}) == len(QUERY_CASES)
    for case in QUERY_CASES:
        upstream_behaviour(case["proxy_config"]["upstream"])
        nameserver_plan(case["proxy_config"]["nameservers"])
        expectation(case)
        build_query(case["query"])
