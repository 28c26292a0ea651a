"""`pilotfish controlplane`: the project's own small control plane, speaking istiod's wire protocol.

An agent connects to it exactly as to istiod (docs/istio-compat.md "ADS stream to istiod"): gRPC
ADS over TLS on
15012, server name `istiod.istio-system.svc`, trusting the root certificate this command writes
(`--root-cert-out`, Istio's default agent path is ./var/run/secrets/istio/root-cert.pem),
optionally with a bearer token. It serves each proxy its NameTable from a mesh file, and an
Envoy sidecar the clusters and listeners capture needs, over state-of-the-world and delta ADS
(controlplane/ads.py, controlplane/delta.py, controlplane/envoyconfig.py).

The root CA lives in --state-dir so that restarts keep the root agents already trust; the serving
certificate is issued afresh at every start. The mesh file is reloaded when it changes (polled,
common/watch.py) and on SIGHUP; a bad file is rejected with a log line and the previous mesh keeps
being served. gRPC runs on grpcio's threads; trio's loop on the main thread receives the signals
and watches the file, and a mesh loads on a worker thread so that a stop signal is acted on while
a large mesh is still loading.
"""

from __future__ import annotations

import argparse
import functools
import gc
import logging
import os
import signal
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import NoReturn, TypeVar

import grpc
import trio
from cryptography import x509
from pilotfish.common.settings import ConfigError, parse_duration
from pilotfish.common.tokens import TokenFileError, read_token_file
from pilotfish.common.dirs import check_private_path, make_dirs
from pilotfish.common.files import UnreadableFile, read_regular_file
from pilotfish.common.limits import raise_open_files_limit
from pilotfish.common.watch import file_signature, watch_file
from pilotfish.common.atomic import write_atomic
from pilotfish.xds_client.proto.istio.networking.nds.v1.nds_pb2 import NameTable

from .ads import AdsServicer, start_server
from .autoregister import DEFAULT_GRACE, Registry
from .casvc import CertificateService, IdentitiesFile, certificate_caller, read_identities, spiffe
from .tokenreview import TokenReviewer, in_cluster
from .tlsfront import PeerCertificates, TlsFront, server_context
from .ca import (
    CAError,
    CertificateAuthority,
    cert_pem,
    issue_serving,
    key_pem,
    load_root,
    new_key,
    new_root,
    serving_names,
)
from .envoyconfig import SidecarConfig, sidecar_config
from .files import check_output_path
from .mesh import Mesh, MeshError, load_mesh, mesh_version
from .model import ServedModel
from .nametable import ProxyInfo
from .served import Snapshot

log = logging.getLogger("pilotfish.controlplane")

DEFAULT_LISTEN = "0.0.0.0:15012"
DEFAULT_STATE_DIR = "./var/lib/pilotfish/controlplane"
ROOT_KEY_FILE = "root-key.pem"
ROOT_FILE_LIMIT = 1 << 20  # a PEM key or certificate is 1-3 KiB
ROOT_CERT_FILE = "root-cert.pem"
MESH_POLL = 0.2  # seconds between looks at the mesh file; a change is pushed well within 1 s

T = TypeVar("T")


def add_parser(subparsers: argparse._SubParsersAction, name: str = "controlplane") -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser(
        name,
        help="run a small control plane: NameTables and a sidecar's Envoy config over istiod's xDS, with its own CA",
        description="A small istiod-compatible control plane for demos and tests: ADS (SotW and delta) "
                    "over TLS, NameTable (NDS) per proxy from a mesh file, the capture clusters and "
                    "listeners (CDS, LDS) an Envoy sidecar needs, a self-signed root CA.",
    )
    p.add_argument("--mesh", required=True, metavar="MESH.yaml",
                   help="the mesh file; reloaded on change and on SIGHUP")
    p.add_argument("--listen", default=DEFAULT_LISTEN, metavar="HOST:PORT",
                   help=f"address for gRPC with TLS (default {DEFAULT_LISTEN}; port 0 picks a free one)")
    p.add_argument("--state-dir", default=DEFAULT_STATE_DIR, metavar="DIR",
                   help=f"where the root CA key and certificate are kept (default {DEFAULT_STATE_DIR})")
    p.add_argument("--root-cert-out", metavar="PATH",
                   help="also write the root certificate here, for agents to trust "
                        "(Istio's agent reads ./var/run/secrets/istio/root-cert.pem)")
    p.add_argument("--token-file", metavar="PATH",
                   help="require `authorization: Bearer <this file's content>` on every stream "
                        "(re-read for each stream)")
    p.add_argument("--dual-stack", action="store_true",
                   help="serve both address families of dual-stack Services to dual-stack proxies "
                        "(istiod's ISTIO_DUAL_STACK; off by default, as in istiod)")
    p.add_argument("--san", action="append", default=[], metavar="NAME",
                   help="extra DNS name or IP for the serving certificate, repeatable")
    p.add_argument("--identities", metavar="PATH",
                   help="workload certificates (istiod's CreateCertificate) for the tokens this file lists, "
                        "one `TOKEN NAMESPACE/SERVICEACCOUNT` per line (re-read for each request); "
                        "without it, only renewals with a certificate this CA issued")
    p.add_argument("--token-review", action="store_true",
                   help="in a Kubernetes pod: also accept a workload's service-account token (audience istio-ca) "
                        "that the API server's TokenReview vouches for, as istiod does; the identity is "
                        "system:serviceaccount:NAMESPACE:NAME (needs ClusterRole system:auth-delegator)")
    p.add_argument("--trust-domain", default="cluster.local", metavar="DOMAIN",
                   help="the SPIFFE trust domain of workload certificates (default cluster.local)")
    p.add_argument("--max-cert-ttl", default="24h", metavar="DURATION",
                   help="the longest workload certificate issued, whatever is asked (default 24h)")
    p.add_argument("--workload-entry-grace", default=f"{DEFAULT_GRACE:g}s", metavar="DURATION",
                   help="how long an auto-registered WorkloadEntry outlives its proxy's last connection "
                        f"(istiod's PILOT_WORKLOAD_ENTRY_GRACE_PERIOD; default {DEFAULT_GRACE:g}s)")
    p.set_defaults(run=run)


def parse_listen(value: str) -> tuple[str, int]:
    """`host:port` or `[v6]:port` to (host as gRPC writes it, port); ValueError naming the flag."""
    host, sep, port_text = value.rpartition(":")
    if not sep or not host or not port_text.isdigit() or int(port_text) > 65535:
        raise ValueError(f"--listen: want HOST:PORT, got {value!r}")
    return host, int(port_text)


def check_flags(args: argparse.Namespace) -> tuple[str, int, list[x509.GeneralName]]:
    """The listen address and the certificate's names; ValueError naming the bad flag."""
    host, port = parse_listen(args.listen)
    try:
        names = serving_names(args.san)
    except ValueError as err:
        raise ValueError(f"--san: {err}") from None
    outputs = [("--state-dir", args.state_dir, True)]
    if args.root_cert_out:
        outputs.append(("--root-cert-out", args.root_cert_out, False))
    for flag, value, directory in outputs:
        if not value.strip():  # '' is the working directory to os.path: never meant
            raise ValueError(f"{flag}: empty path")
        problem = check_output_path(value, directory)
        if problem is None:
            # Whoever can write to a directory on the way can swap what is below it: the root
            # CA's key, or the root certificate agents are told to trust.
            try:
                check_private_path(value if directory else os.path.dirname(os.path.abspath(value)))
            except OSError as err:  # UnsafeDirectoryError, or a directory we may not look into
                problem = err.strerror or str(err)
        if problem:
            raise ValueError(f"{flag} {value}: {problem}")
    if args.token_file is not None:
        problem = _token_file_problem(args.token_file)
        if problem:
            raise ValueError(f"--token-file {args.token_file}: {problem}")
    if args.identities is not None:
        read_identities(args.identities, args.trust_domain)  # ValueError naming the file and line
    if args.token_review:
        try:
            in_cluster(os.environ)
        except ValueError as err:
            raise ValueError(f"--token-review: {err}") from None
    try:
        if parse_duration(args.max_cert_ttl, "--max-cert-ttl") < 1:
            raise ConfigError(f"--max-cert-ttl: want a second or more, got {args.max_cert_ttl!r}")
        if parse_duration(args.workload_entry_grace, "--workload-entry-grace") < 0:
            raise ConfigError(f"--workload-entry-grace: want 0 or more, got {args.workload_entry_grace!r}")
    except ConfigError as err:
        raise ValueError(str(err)) from None
    return host, port, names


def _token_file_problem(path: str) -> str | None:
    """Why the token file cannot give a token now (it is read again for every stream; an empty
    one there refuses them all, which at start can only be a mistake)."""
    try:
        token = read_token_file(path)
    except TokenFileError as err:
        return f"cannot read: {err}"
    return None if token else "empty"


def bind_listener(host: str, port: int) -> socket.socket:
    """The listening socket agents connect to (TLS is this process's: controlplane/tlsfront.py),
    bound before the root CA is touched, so that a port in use or an address that is not local
    is reported with the system's reason. OSError with the message to show."""
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        family, kind, proto, _, sockaddr = socket.getaddrinfo(
            bare, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as err:
        raise OSError(f"cannot listen on {host}:{port}: {err.strerror}") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as grpcio: TIME_WAIT is free
    try:
        sock.bind(sockaddr)
        sock.listen(1024)
    except OSError as err:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None
    return sock


def root_ca(state_dir: str, now: datetime) -> CertificateAuthority:
    """The root kept in `state_dir`, or a new one saved there (key 0600, directory 0700).

    Half a root (a key without its certificate or the other way round) is an error, not a reason
    to make a new one: agents may trust the old root, and replacing it must be a decision.
    """
    key_path = os.path.join(state_dir, ROOT_KEY_FILE)
    cert_path = os.path.join(state_dir, ROOT_CERT_FILE)
    have = [p for p in (key_path, cert_path) if os.path.exists(p)]
    if len(have) == 2:
        ca = load_root(_root_file(key_path), _root_file(cert_path), now)
        log.info("controlplane: root CA from %s (valid until %s)", state_dir,
                 f"{ca.cert.not_valid_after_utc:%Y-%m-%d}")
        return ca
    if have:
        missing = ({key_path, cert_path} - set(have)).pop()
        raise CAError(f"{os.path.basename(have[0])} without {os.path.basename(missing)}; "
                      "restore it, or remove the directory to make a new root")
    make_dirs(state_dir, 0o700)  # parents too, whatever the umask
    ca = new_root(new_key(), now)
    write_atomic(key_path, key_pem(ca.key), 0o600)
    write_atomic(cert_path, cert_pem(ca.cert), 0o644)
    log.info("controlplane: created a new root CA in %s", state_dir)
    return ca


def _root_file(path: str) -> bytes:
    """A stored root file's content; CAError naming the file when it cannot be one."""
    name = os.path.basename(path)
    try:
        data = read_regular_file(path, ROOT_FILE_LIMIT)
    except UnreadableFile as err:
        raise CAError(f"{name}: {err}") from None
    if not data.strip():
        raise CAError(f"{name} is empty")
    return data


TABLES_KEPT = 4


def load_snapshot(path: str, dual_stack: bool = False, trust_domain: str = "cluster.local") -> Snapshot:
    """The mesh file as what the ADS server serves. MeshError if the file is bad."""
    mesh, version = load_versioned(path)
    return snapshot_of(mesh, version, dual_stack, trust_domain)


def load_versioned(path: str) -> tuple[Mesh, str]:
    """The mesh file and its version. MeshError if the file is bad."""
    with _gc_paused():
        mesh = load_mesh(path)
        return mesh, mesh_version(mesh)


def snapshot_of(mesh: Mesh, version: str, dual_stack: bool = False, trust_domain: str = "cluster.local") -> Snapshot:
    """A mesh (with its WorkloadEntries: model.ServedModel) as what the ADS server serves.

    `dual_stack` is istiod's ISTIO_DUAL_STACK: without it a dual-stack proxy gets one address
    family of a dual-stack Service (istiod's default, and the vectors'; istio#51608)."""

    # The last few proxies' tables are kept for this version: a client re-requesting without a
    # nonce had the whole table rebuilt each time (8 such streams on 20,000 services slowed an
    # honest agent's push from 1.5 to 12.8 s). Few: each is the size of the mesh.
    def served(proxy: ProxyInfo) -> ProxyInfo:
        return replace(proxy, dual_stack_enabled=True) if dual_stack else proxy

    @functools.lru_cache(maxsize=TABLES_KEPT)
    def table_for(proxy: ProxyInfo) -> NameTable:
        return mesh.name_table(served(proxy))

    # the same few proxies' Envoy config (small, but built for every push and request)
    @functools.lru_cache(maxsize=TABLES_KEPT)
    def envoy_for(proxy: ProxyInfo) -> SidecarConfig:
        return sidecar_config(mesh, served(proxy), trust_domain)

    return Snapshot(version, table_for, len({s.hostname for s in mesh.services}), envoy_for)


@contextmanager
def _gc_paused() -> Iterator[None]:
    """The cyclic garbage collector off while a mesh is built. A load makes millions of objects
    and no cycles, and every full collection on the way walks all of them again: 1.2 s of a
    4 s load of 100,000 services. Cycles made meanwhile by other threads wait until after."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


@dataclass(frozen=True)
class _Stopped:
    """A stop signal (SIGTERM or SIGINT) came first; `name` is its name."""

    name: str


async def _until_stopped(stops: AsyncIterator[int], work: Callable[[], Awaitable[T]]) -> T | _Stopped:
    """What `work()` returns, or _Stopped if a signal arrives on `stops` first (the work is then
    cancelled). An exception of the work comes out of the nursery, in an ExceptionGroup."""
    stopped: list[_Stopped] = []
    done: list[T] = []
    async with trio.open_nursery() as nursery:

        async def wait_for_stop() -> None:
            async for signum in stops:
                stopped.append(_Stopped(signal.Signals(signum).name))
                nursery.cancel_scope.cancel()
                return

        nursery.start_soon(wait_for_stop)
        done.append(await work())
        nursery.cancel_scope.cancel()
    return done[0] if done else stopped[0]


async def _load(path: str) -> tuple[Mesh, str] | MeshError:
    """The mesh and its version loaded on a worker thread, or the MeshError saying why it is bad.

    A load cannot be interrupted (most of it is in libyaml or the json module), but waiting for
    it can: on cancellation (a stop signal) the worker is abandoned, left to finish or to end
    with the process (trio's workers are daemon threads), so a SIGTERM during a load of 100,000
    services (seconds) still exits at once.
    """
    try:
        return await trio.to_thread.run_sync(load_versioned, path, abandon_on_cancel=True)
    except MeshError as err:
        return err


def run(args: argparse.Namespace) -> int:
    """Entry point: validate, load the mesh, get the root, bind, serve until SIGTERM/SIGINT."""
    try:
        host, port, names = check_flags(args)
    except ValueError as err:
        log.error("controlplane: %s", err)
        return 2
    return trio.run(_run, args, host, port, names)


async def _run(args: argparse.Namespace, host: str, port: int, names: list[x509.GeneralName]) -> int:
    # the signals are received before the load: a stop signal during a long load is honoured, and
    # a SIGHUP then is a reload once serving (instead of the default action, exit)
    with (trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as stops,
          trio.open_signal_receiver(signal.SIGHUP) as hups):
        # one thread and one connection per agent stream (up to 1000): far past a soft limit of 1024
        log.info("controlplane: open files limit %d", raise_open_files_limit())
        signature = file_signature(args.mesh)  # before loading: a change while loading is seen
        log.info("controlplane: loading mesh file %s", args.mesh)
        loaded = await _until_stopped(stops, functools.partial(_load, args.mesh))
        if isinstance(loaded, _Stopped):
            log.info("controlplane: %s while loading the mesh, stopped", loaded.name)
            return 0
        if isinstance(loaded, MeshError):
            log.error("controlplane: --mesh %s", loaded)  # the message starts with the file's name
            return 2
        grace = parse_duration(args.workload_entry_grace, "--workload-entry-grace")
        model = ServedModel(*loaded, functools.partial(snapshot_of, dual_stack=args.dual_stack,
                                                       trust_domain=args.trust_domain), Registry(grace))
        started = _start(args, host, port, names, model)
        if isinstance(started, int):
            return started
        server, front, listener = started
        snapshot = model.hub.current
        log.info("controlplane: serving mesh version %s (%d hosts)", snapshot.version, snapshot.hosts)
        reload = functools.partial(_reload, args.mesh, model)

        async def serve() -> NoReturn:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(front.serve, listener)
                nursery.start_soon(_expire_entries, model, min(1.0, max(grace / 4, 0.05)))
                await watch_file(args.mesh, signature, MESH_POLL, reload, hups)

        stopped = await _until_stopped(stops, serve)
        log.info("controlplane: %s, shutting down", stopped.name)
        # still inside the receivers: a second SIGTERM meanwhile is not the default action (exit)
        await trio.to_thread.run_sync(lambda: server.stop(grace=None).wait())
    log.info("controlplane: stopped")
    return 0


async def _expire_entries(model: ServedModel, period: float) -> NoReturn:
    """Auto-registered entries whose grace period is over, removed (checked every `period`). In a
    thread: the model's lock is shared with gRPC's streams, and a publish rebuilds the mesh."""
    while True:
        await trio.sleep(period)
        await trio.to_thread.run_sync(model.expire)


def _start(args: argparse.Namespace, host: str, port: int, names: list[x509.GeneralName],
           model: ServedModel) -> tuple[grpc.Server, TlsFront, trio.SocketListener] | int:
    """The gRPC server started on grpcio's threads on a loopback port, the TLS front for it (with
    the root CA and the serving certificate it needs) and its listener, or the exit status of
    what failed, logged. Each step takes milliseconds, so a stop signal meanwhile is acted on
    when it is done."""
    try:
        sock = bind_listener(host, port)
    except OSError as err:
        log.error("controlplane: %s", err)
        return 1
    now = datetime.now(UTC)
    try:
        ca = root_ca(args.state_dir, now)
    except CAError as err:
        log.error("controlplane: --state-dir %s: %s", args.state_dir, err)
        return 2
    except OSError as err:  # named by what failed, never a temp file's name
        log.error("controlplane: --state-dir %s: cannot write the root CA: %s", args.state_dir, err.strerror or err)
        return 1
    if args.root_cert_out:
        try:
            make_dirs(os.path.dirname(os.path.abspath(args.root_cert_out)), 0o755)
            write_atomic(args.root_cert_out, cert_pem(ca.cert), 0o644)
        except OSError as err:
            log.error("controlplane: --root-cert-out %s: cannot write: %s", args.root_cert_out, err.strerror or err)
            return 1
        log.info("controlplane: wrote the root certificate to %s", args.root_cert_out)
    key = new_key()
    context = server_context(key_pem(key), cert_pem(issue_serving(ca, key, names, now)), cert_pem(ca.cert))
    identities = IdentitiesFile(args.identities, args.trust_domain) if args.identities else None
    peers = PeerCertificates()
    review = None
    if args.token_review:  # checked by check_flags; the pod's token and CA are read again per review
        reviewer = TokenReviewer(in_cluster(os.environ))
        log.info("controlplane: workload tokens reviewed by the Kubernetes API server at %s:%d (audience %s)",
                 reviewer.api.host, reviewer.api.port, ", ".join(reviewer.audiences))

        def review(token: str) -> str:
            return spiffe(args.trust_domain, reviewer.review(token))
    def peer_identity(context: grpc.ServicerContext) -> str | None:
        caller = certificate_caller(peers.lookup(context.peer()), ca, datetime.now(UTC))
        return caller.identity if caller is not None else None

    certificates = CertificateService(
        ca, identities or dict,
        timedelta(seconds=parse_duration(args.max_cert_ttl, "--max-cert-ttl")), peer_certificate=peers.lookup,
        review=review)
    try:  # a workload's token (the identities file) opens ADS streams too, as istiod takes any workload's
        ads_identities = identities if args.token_file is not None or review is not None else None
        servicer = AdsServicer(model.hub, args.token_file, ads_identities,
                               workloads=model, review=review, peer_identity=peer_identity)
        server, backend = start_server(servicer, "127.0.0.1:0", None,
                                       handlers=[certificates.handler()])
    except OSError as err:
        sock.close()
        log.error("controlplane: %s", err)
        return 1
    bound = sock.getsockname()[1]
    log.info("controlplane: listening on %s:%d (TLS as %s)", host, bound,
             ", ".join(str(n.value) for n in names))
    front = TlsFront(context, ("127.0.0.1", backend), peers)
    return server, front, trio.SocketListener(trio.socket.from_stdlib_socket(sock))


async def _reload(path: str, model: ServedModel, why: str) -> None:
    """Load the mesh file again and push it if its version changed; a bad file is one ERROR line
    and the mesh in use keeps being served."""
    log.info("controlplane: loading mesh file %s (%s)", path, why)
    loaded = await _load(path)
    if isinstance(loaded, MeshError):
        log.error("controlplane: rejected mesh file (%s): %s; still serving version %s",
                  why, loaded, model.hub.current.version)
        return
    mesh, version = loaded
    if version == model.mesh_version:
        log.info("controlplane: mesh file reloaded (%s), version %s unchanged", why, version)
        return
    model.set_mesh(mesh, version, why)
