"""`--run-validation`: istio-iptables' self-test (docs/istio-compat.md "istio-iptables rules").
It listens where the proxy would (15001 and
15006 on loopback), connects as the proxy user to 127.0.0.6:15002 (::6 for IPv6 pods), and
succeeds when a listener receives that connection with SO_ORIGINAL_DST port 15002, i.e. when the
capture rules redirected it. Run as uid 1337 it proves the rules (installed by pilotfish init or a
CNI plugin) work; run without them it fails with exit code 126, as Istio's."""

from __future__ import annotations

import logging
import socket
import struct
import time

from .config import CaptureConfig

log = logging.getLogger("pilotfish.init")

SO_ORIGINAL_DST = 80  # netfilter's getsockopt, IPv4 (SOL_IP) and IPv6 (SOL_IPV6)
EXIT_VALIDATION_FAILED = 126
FAILURE_MESSAGE = (
    "iptables validation failed; workload is not ready for Istio.\n"
    "When using Istio CNI, this can occur if a pod is scheduled before the node is ready.\n"
    "If installed with 'cni.repair.deletePods=true', this pod should automatically be deleted and "
    "retry.\nOtherwise, this pod will need to be manually removed so that it is scheduled on a node "
    "with istio-cni running, allowing iptables rules to be established."
)


def original_port(conn: socket.socket, ipv6: bool) -> int:
    """The destination port the connection had before the kernel redirected it."""
    if ipv6:
        raw = conn.getsockopt(socket.IPPROTO_IPV6, SO_ORIGINAL_DST, 28)
    else:
        raw = conn.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    return struct.unpack_from("!H", raw, 2)[0]


def validate_capture(config: CaptureConfig, ipv6: bool) -> bool:
    """True when a probe connection is redirected to one of the proxy's ports in time."""
    family = socket.AF_INET6 if ipv6 else socket.AF_INET
    listen_ip, server_ip = ("::1", "::6") if ipv6 else ("127.0.0.1", "127.0.0.6")
    capture = config.capture
    probe = capture.probe_port
    listeners = []
    for port in (capture.envoy_port, capture.inbound_capture_port):
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            sock.bind((listen_ip, port))
            sock.listen(16)
            sock.setblocking(False)
            listeners.append(sock)
        except OSError as err:
            log.warning("init: validation cannot listen on %s port %s: %s", listen_ip, port, err.strerror)
            sock.close()
    if not listeners:
        log.error("init: validation could not listen on any port")
        return False
    deadline = time.monotonic() + config.probe_timeout
    try:
        while time.monotonic() < deadline:
            started = time.monotonic()
            if _probe_once(family, listen_ip, server_ip, probe, listeners, ipv6):
                log.info("init: validation passed: a connection to %s:%d was redirected", server_ip, probe)
                return True
            time.sleep(max(0.0, min(1.0 - (time.monotonic() - started), deadline - time.monotonic())))
    finally:
        for sock in listeners:
            sock.close()
    return False


def _probe_once(family: int, listen_ip: str, server_ip: str, probe: int, listeners: list[socket.socket],
                ipv6: bool) -> bool:
    with socket.socket(family, socket.SOCK_STREAM) as client:
        client.settimeout(1.0)
        try:
            client.bind((listen_ip, 0))
            client.connect((server_ip, probe))
        except OSError:
            return False
        for listener in listeners:
            try:
                conn, _ = listener.accept()
            except BlockingIOError:
                continue
            with conn:
                port = original_port(conn, ipv6)
                conn.sendall(str(port).encode())
                if port == probe:
                    return True
    return False
