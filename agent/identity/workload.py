"""The workload certificate as an agent component: obtained at start, renewed before it expires,
swapped into the resource cache where SDS watches it (docs/identity.md).

One loop: make a key and a CSR, call the CA (in a worker thread), check the response, swap the
certificate in, write it to OUTPUT_CERTS, sleep until the renewal time. A failure keeps the
certificate in use serving until it expires, logs why, and backs off (renewal.py); when less
than a fifth of its life is left and renewals keep failing, a warning says so.
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Iterator
from datetime import UTC, datetime

import trio
from cryptography import x509
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from pilotfish.common import atomic
from pilotfish.common.files import UnreadableFile, read_regular_file
from pilotfish.common.tokens import token_expiry
from pilotfish.xds_client.resources import CacheKey, ResourceCache

from .caclient import CaCallError, CaClient, ClientCertificate
from .issued import IssueError, Issued, check_response
from .keys import csr_pem, key_pem, new_key
from .renewal import LOW_LIFE, failure_delay, life_left, present_current, token_usable
from .rotation import renewal_delay
from .settings import SYSTEM, IdentityConfig

log = logging.getLogger("pilotfish.identity")

PEM_LIMIT = 1 << 20
MIN_RENEWAL = 1.0  # seconds between two certificates, whatever their lifetime


class WorkloadCertificate(CacheKey[Issued]):
    """The key of the workload certificate in the resource cache (what SDS serves as `default`
    and, from its root, `ROOTCA`)."""

    type_url = "pilotfish.identity/workload-certificate"
    name = "workload certificate"


WORKLOAD_CERTIFICATE = WorkloadCertificate()


def _valid_now(chain_pem: bytes) -> bool:
    try:
        leaf = x509.load_pem_x509_certificate(chain_pem)
    except ValueError:
        return False
    return leaf.not_valid_before_utc <= datetime.now(UTC) < leaf.not_valid_after_utc


class Identity:
    """The component: `serve` until cancelled; ready once a certificate is held."""

    name = "identity"

    def __init__(self, config: IdentityConfig, client: CaClient, cache: ResourceCache,
                 kubernetes: bool = False) -> None:
        self.config = config
        self.client = client
        self.cache = cache
        self.kubernetes = kubernetes  # OUTPUT_CERTS files 0644 on Kubernetes, as Istio writes them
        self.current: Issued | None = None
        self.renewals = 0
        self.failures = 0
        self._failures_in_a_row = 0

    def ready(self) -> str | None:
        return None if self.current is not None else "no workload certificate yet"

    def _trusted_roots(self) -> list[x509.Certificate]:
        root = self.config.ca_root
        if root is None or root == SYSTEM:
            return []
        try:
            return x509.load_pem_x509_certificates(read_regular_file(root, PEM_LIMIT))
        except (UnreadableFile, ValueError) as err:
            raise IssueError(f"cannot read the configured root {root}: {err}") from None

    def _prov_cert(self) -> ClientCertificate | None:
        directory = self.config.prov_cert
        if not directory:
            return None
        try:
            key = read_regular_file(os.path.join(directory, "key.pem"), PEM_LIMIT)
            chain = read_regular_file(os.path.join(directory, "cert-chain.pem"), PEM_LIMIT)
        except UnreadableFile:
            return None
        return ClientCertificate(key, chain, "PROV_CERT") if _valid_now(chain) else None

    def obtain(self) -> Issued:
        """One certificate from the CA, checked (blocking: runs in a worker thread)."""
        key = new_key(self.config.key)
        pem = key_pem(key, self.config.key.pkcs8)
        token = self.client.token()
        client = self._prov_cert()
        current = self.current
        token_ok = token_usable(token, token_expiry(token), time.time())
        if current is not None and present_current(token_ok, client is not None, _valid_now(current.chain_pem)):
            client = ClientCertificate(current.key_pem, current.chain_pem, "the current certificate")
        elements = self.client.sign(csr_pem(key, self.config.identity), client, token if token_ok else "")
        return check_response(elements, key, pem, self.config.identity, self._trusted_roots(), datetime.now(UTC))

    def _install(self, issued: Issued) -> None:
        self.current = issued
        self.cache.swap(WORKLOAD_CERTIFICATE.type_url, f"{issued.serial:x}", issued)
        if self.config.output_certs:
            self._write_out(issued)

    def _write_out(self, issued: Issued) -> None:
        mode = 0o644 if self.kubernetes else 0o600
        for name, data in (("key.pem", issued.key_pem), ("cert-chain.pem", issued.chain_pem),
                           ("root-cert.pem", issued.root_pem)):
            try:
                atomic.write_atomic(os.path.join(self.config.output_certs, name), data, mode)
            except OSError as err:
                log.warning("identity: cannot write %s to OUTPUT_CERTS %s: %s", name, self.config.output_certs,
                            err.strerror or err)

    def _until_renewal(self, issued: Issued) -> float:
        """Never sooner than MIN_RENEWAL: a CA that issues leaves of a moment must not make the
        agent ask again at once, in a loop."""
        return max(MIN_RENEWAL, renewal_delay(time.time(), issued.created.timestamp(), issued.not_after.timestamp(),
                                              self.config.grace_ratio, self.config.grace_jitter, random.random()))

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Obtain and renew forever. Started at once: readiness says when the first certificate
        is held, and SDS answers Envoy as soon as it is."""
        task_status.started()
        while True:
            try:
                issued = await trio.to_thread.run_sync(self.obtain, abandon_on_cancel=True)
            except (CaCallError, IssueError) as err:
                await self._after_failure(err)
                continue
            except Exception as err:  # a bug must cost an attempt, never the agent
                log.exception("identity: error obtaining a certificate")
                await self._after_failure(err)
                continue
            self._failures_in_a_row = 0
            self.renewals += self.current is not None
            self._install(issued)
            log.info("identity: certificate for %s, serial %x, valid until %s", self.config.identity, issued.serial,
                     issued.not_after.strftime("%Y-%m-%dT%H:%M:%SZ"))
            await trio.sleep(self._until_renewal(issued))

    async def _after_failure(self, err: Exception) -> None:
        self.failures += 1
        self._failures_in_a_row += 1
        delay = failure_delay(self._failures_in_a_row, random.random())
        current = self.current
        left = life_left(time.time(), current.created.timestamp(), current.not_after.timestamp()) if current else 0.0
        if current is not None and left < LOW_LIFE:
            log.warning("identity: certificate %x expires at %s (%.0f%% of its life left) and renewal keeps "
                        "failing: %s; retrying in %.1fs", current.serial,
                        current.not_after.strftime("%Y-%m-%dT%H:%M:%SZ"), left * 100, err, delay)
        else:
            log.warning("identity: no certificate from the CA at %s: %s; retrying in %.1fs",
                        self.config.ca_address, err, delay)
        await trio.sleep(delay)

    def collect(self) -> Iterator[Metric]:
        """istio_agent_cert_expiry_seconds{resource_name="default"} and the renewal counters."""
        expiry = GaugeMetricFamily("istio_agent_cert_expiry_seconds",
                                   "The time remaining, in seconds, before the certificate chain will expire.",
                                   labels=["resource_name"])
        if self.current is not None:
            expiry.add_metric(["default"], self.current.not_after.timestamp() - time.time())
        yield expiry
        yield CounterMetricFamily("pilotfish_identity_renewals", "Certificates obtained after the first.",
                                  value=self.renewals)
        yield CounterMetricFamily("pilotfish_identity_renewal_failures",
                                  "Attempts to obtain a certificate that failed.", value=self.failures)
        yield _retries(self.client.retries)


def _retries(count: int) -> Metric:
    family = CounterMetricFamily("istio_agent_num_outgoing_retries",
                                 "Number of outgoing retry requests (e.g. to a token exchange server, CA, etc.)",
                                 labels=["request_type"])
    family.add_metric(["csr"], count)
    return family
