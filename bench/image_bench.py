#!/usr/bin/env python3
"""Image benchmark: the size of the pilotfish image (Dockerfile, built as `make image` builds it)
and the time from `docker run` of its istio-proxy container to ready.

Measured:
- size: the image's size as `docker images` shows it (uncompressed, all layers, MB = 10^6 bytes),
  the debootstrapped base's, and the image gzip-compressed as `docker save | gzip` gives it (about
  what a registry stores and a node pulls);
- start to ready: `docker run -d` of the istio-proxy container (tests/deploy/containers.py: the
  template's argv and environment, uid 1337, read-only root) in a pod whose pause and init
  containers already ran, beside the control plane's container, to the first 200 from
  :15021/healthz/ready (Envoy's health listener backed by the agent, kubelet's startup probe),
  polled every 10 ms from the host; the container is removed after each start.

Peer: Istio's proxyv2 cannot be pulled here (no registry). The size used is 164 MB, docker's size
of istio/proxyv2 as Chainguard's image pull request compared against it in September 2023
(chainguard-images/images#1323, "163MB v 164MB"); in 2019 it was 297 MB uncompressed, 116 MB
compressed (istio/istio#15441).

Root (a Docker engine; deploy/image/build.py starts one). Run as
`.venv/bin/python bench/image_bench.py`.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

from benchlib import git_commit, write_report

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "deploy"))
from containers import builder, docker, running_pods, sidecar_ready, start_proxy  # noqa: E402

ISTIO_PROXYV2_MB = 164.0  # chainguard-images/images#1323 (2023-09): docker's size of istio/proxyv2


def size_mb(image: str) -> float:
    return int(docker("image", "inspect", "--format", "{{.Size}}", image)) / 1e6


def gzip_mb(image: str) -> float:
    """`docker save IMAGE | gzip -6`, counted, not stored."""
    save = subprocess.Popen(["docker", "save", image], stdout=subprocess.PIPE)
    assert save.stdout is not None
    z = zlib.compressobj(6, zlib.DEFLATED, 31)
    total = 0
    while chunk := save.stdout.read(1 << 20):
        total += len(z.compress(chunk))
    total += len(z.flush())
    if save.wait() != 0:
        raise SystemExit(f"docker save {image} exited {save.returncode}")
    return total / 1e6


def start_to_ready(image: str, runs: int) -> list[float]:
    samples = []
    with tempfile.TemporaryDirectory(prefix="pilotfish-image-bench-") as tmp:
        work = Path(tmp)
        work.chmod(0o755)
        with running_pods(image, work, proxies=False) as (cluster, _, reviews):
            for i in range(runs):
                start = time.monotonic()
                name = start_proxy(cluster, reviews, name=f"proxy-{i}")
                deadline = start + 60
                while not sidecar_ready(reviews):
                    if time.monotonic() > deadline:
                        raise SystemExit(f"not ready within 60 s:\n{cluster.logs(name)}")
                    time.sleep(0.01)
                samples.append(time.monotonic() - start)
                docker("rm", "-f", f"{cluster.tag}-{name}", timeout=120)
                cluster.containers.remove(f"{cluster.tag}-{name}")
                while sidecar_ready(reviews):  # gone before the next start
                    time.sleep(0.01)
    return samples


def main() -> int:
    parser = argparse.ArgumentParser(description="image size and container start to ready")
    parser.add_argument("--image", default=builder.DEFAULT_IMAGE)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--no-build", action="store_true", help="measure the image as it is")
    parser.add_argument("--json", metavar="PATH", help="write the raw figures here")
    args = parser.parse_args()
    builder.ensure_engine()
    build_s = None
    if not args.no_build:
        began = time.monotonic()
        builder.build(args.image, python=sys.executable)
        build_s = time.monotonic() - began
    size, base, packed = size_mb(args.image), size_mb(builder.DEFAULT_BASE), gzip_mb(args.image)
    samples = start_to_ready(args.image, args.runs)
    median = statistics.median(samples)
    print(f"commit {git_commit()}; image {args.image}" + (f"; build (cache as found) {build_s:.1f} s" if build_s else ""))
    print(f"image size:            {size:7.1f} MB  ({size / ISTIO_PROXYV2_MB:.2f}x Istio's proxyv2, "
          f"{ISTIO_PROXYV2_MB:.0f} MB, chainguard-images/images#1323)")
    print(f"  of which the base:   {base:7.1f} MB  ({builder.DEFAULT_BASE})")
    print(f"image, gzip:           {packed:7.1f} MB  (docker save | gzip -6)")
    print(f"start to ready:        {median * 1000:7.0f} ms  median of {len(samples)} "
          f"({min(samples) * 1000:.0f}-{max(samples) * 1000:.0f} ms), docker run -d to :15021/healthz/ready 200")
    write_report(args.json, {"commit": git_commit(), "image": args.image, "build_s": build_s, "size_mb": size,
                             "base_mb": base, "gzip_mb": packed, "istio_proxyv2_mb": ISTIO_PROXYV2_MB,
                             "start_to_ready_s": samples})
    return 0


if __name__ == "__main__":
    sys.exit(main())
