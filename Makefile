# Set-up and entry points. Everything installs what it needs: Debian packages with apt-get
# (when missing) and a virtualenv in .venv with the Python dependencies.
VENV      ?= .venv
PY        := $(VENV)/bin/python
APT_PKGS  := dnsutils dnsperf dnsmasq-base iproute2 procps iptables libcap2-bin util-linux curl
SUDO      := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: test lint bench demo protos system-deps venv image

system-deps:
	@missing=""; for p in $(APT_PKGS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  $(SUDO) apt-get update -q && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q $$missing; \
	fi

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[dev]'
	touch $@

venv: $(VENV)/.installed

PKG_DIRS  := agent common controlplane dns init xds_client

# ruff and mypy before the tests (mypy sees the packages through a symlink tree named pilotfish)
lint: venv
	$(VENV)/bin/ruff check .
	rm -rf .build/mypy && mkdir -p .build/mypy/pilotfish
	for d in $(PKG_DIRS); do ln -s ../../../$$d .build/mypy/pilotfish/$$d; done
	cd .build/mypy && ../../$(VENV)/bin/mypy --config-file ../../pyproject.toml -p pilotfish

test: system-deps venv lint
	$(VENV)/bin/pytest

bench: system-deps venv
	$(PY) bench/dns_bench.py
	$(SUDO) $(PY) bench/init_bench.py
	$(PY) bench/agent_bench.py
	$(PY) bench/controlplane_bench.py
	$(PY) bench/startup_bench.py
	$(PY) bench/identity_bench.py
	$(PY) bench/xds_proxy_bench.py
	$(SUDO) $(PY) bench/sidecar_bench.py
	$(SUDO) $(PY) bench/mesh_bench.py
	$(SUDO) $(PY) bench/image_bench.py

# The proxy image (Dockerfile; docs/image.md). deploy/image/build.py starts a Docker engine when
# none answers, debootstraps the default base once, and builds the wheelhouse the image installs.
IMAGE     ?= pilotfish:dev
BASE      ?= pilotfish-base:bookworm
image: venv
	$(PY) deploy/image/build.py --image $(IMAGE) --base $(BASE)

demo: system-deps venv
	$(SUDO) $(VENV)/bin/python demo/mesh.py

# Regenerate the committed protobuf modules (Istio's NDS NameTable, Istio's CA service) with
# grpcio-tools. Messages only: the gRPC methods are bound by name (agent/identity/caclient.py,
# controlplane/casvc.py), as generated stubs would import the modules by a path outside the package.
protos: venv
	$(PY) -m grpc_tools.protoc -I xds_client/proto -I $$($(PY) -c 'import grpc_tools, os; print(os.path.dirname(grpc_tools.__file__))')/_proto \
	  --python_out=xds_client/proto --pyi_out=xds_client/proto \
	  xds_client/proto/istio/networking/nds/v1/nds.proto xds_client/proto/istio/v1/auth/ca.proto
