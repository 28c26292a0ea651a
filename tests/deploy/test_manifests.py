"""deploy/kubernetes/: every document is a valid Kubernetes object of the pinned version (offline
schema validation, strict: an unknown or misplaced field fails), custom resources and non-objects
skipped by an explicit list; and the manifests say what docs/kubernetes.md promises: capabilities
only on istio-init, the proxy as uid 1337 with a read-only root, one image, Istio's volumes, the
mesh file parsed by the control plane's own parser, and argv/env that pilotfish accepts."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from pilotfish.agent import cli
from pilotfish.controlplane.mesh import parse_mesh
from pilotfish.init.config import parse_args as init_parse_args
from pod_harness import INIT_ARGV, PROXY_ARGV, template_env

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes"
KUBERNETES_VERSION = "1.33.0"  # native sidecars are on by default from 1.29, GA in 1.33
IMAGE = "pilotfish:dev"
# (file, kind) validated by no Kubernetes schema, and why
NOT_VALIDATED = {
    ("istio/istiooperator.yaml", "IstioOperator"): "Istio's custom resource (install.istio.io), no built-in schema",
    ("istio/helm-values.yaml", None): "Helm values for Istio's istiod chart, not a Kubernetes object",
}
# images that are not pilotfish's, where a sample needs an app of its own
OTHER_IMAGES = {"docker.io/istio/examples-bookinfo-reviews-v1:1.20.1"}
# the proxy's variables beyond those of the rendered template (tests/pod_harness.py): the DNS
# capture proxyMetadata and the injector's app prober
PROXY_EXTRA_ENV = {"ISTIO_META_DNS_CAPTURE", "ISTIO_KUBE_APP_PROBERS"}


def documents() -> Iterator[tuple[str, dict[str, Any] | None]]:
    for path in sorted(DEPLOY.rglob("*.y*ml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                yield path.relative_to(DEPLOY).as_posix(), doc


def kind_of(doc: dict[str, Any]) -> str | None:
    return doc.get("kind") if isinstance(doc.get("kind"), str) and "apiVersion" in doc else None


DOCS = list(documents())


def pod_specs() -> Iterator[tuple[str, str, dict[str, Any]]]:
    for name, doc in DOCS:
        if isinstance(doc, dict) and kind_of(doc) == "Deployment":
            yield name, doc["metadata"]["name"], doc["spec"]["template"]["spec"]


def containers(spec: dict[str, Any]) -> Iterator[tuple[bool, dict[str, Any]]]:
    """(is an init container, container) of a pod spec."""
    for init, key in ((True, "initContainers"), (False, "containers")):
        for c in spec.get(key) or []:
            yield init, c


def injected() -> Iterator[tuple[str, str, dict[str, Any]]]:
    """The standalone sample's pods: those this repository injects by hand."""
    return ((f, n, s) for f, n, s in pod_specs() if f.startswith("standalone/"))


def proxy_of(spec: dict[str, Any]) -> dict[str, Any]:
    return next(c for _, c in containers(spec) if c["name"] == "istio-proxy")


@pytest.mark.parametrize(("name", "doc"), DOCS, ids=[f"{n}:{kind_of(d) or '-'}:{i}" for i, (n, d) in enumerate(DOCS)])
def test_every_document_is_a_valid_object_of_the_pinned_kubernetes(name: str, doc: dict[str, Any]) -> None:
    kind = kind_of(doc)
    if (name, kind) in NOT_VALIDATED:
        pytest.skip(f"{name}: {NOT_VALIDATED[(name, kind)]}")
    assert kind is not None, f"{name}: not a Kubernetes object (no apiVersion/kind); list it in NOT_VALIDATED"
    try:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as err:
        pytest.fail(f"{name}: {kind} {doc.get('metadata', {}).get('name')}: {err.message} at {list(err.path)}")


def test_the_skip_list_names_only_what_is_there() -> None:
    present = {(name, kind_of(doc)) for name, doc in DOCS}
    assert set(NOT_VALIDATED) <= present


def test_capabilities_only_on_istio_init_and_everything_else_drops_all() -> None:
    seen = 0
    for name, deployment, spec in pod_specs():
        for init, c in containers(spec):
            caps = c.get("securityContext", {}).get("capabilities", {})
            assert caps.get("drop") == ["ALL"], (name, deployment, c["name"])
            if c["name"] == "istio-init":
                assert init and sorted(caps.get("add", [])) == ["NET_ADMIN", "NET_RAW"], (name, deployment)
                seen += 1
            else:
                assert not caps.get("add"), (name, deployment, c["name"])
            assert c.get("securityContext", {}).get("allowPrivilegeEscalation") is False, (name, c["name"])
    assert seen == 4  # hello and client, classic and native


def test_the_proxy_is_uid_1337_non_root_with_a_read_only_root() -> None:
    for name, deployment, spec in injected():
        context = proxy_of(spec)["securityContext"]
        assert (context["runAsUser"], context["runAsGroup"], context["runAsNonRoot"],
                context["readOnlyRootFilesystem"]) == (1337, 1337, True, True), (name, deployment)
        for _, c in containers(spec):  # an app as 1337 would bypass capture
            if c["name"] not in ("istio-proxy", "istio-init"):
                assert c["securityContext"]["runAsUser"] not in (0, 1337), (name, c["name"])


def test_classic_and_native_forms_place_the_proxy_as_istio_does() -> None:
    for name, deployment, spec in injected():
        inits = [c["name"] for c in spec["initContainers"]]
        if name.endswith("native-sidecar.yaml"):
            assert inits == ["istio-init", "istio-proxy"], (name, deployment)
            assert spec["initContainers"][1]["restartPolicy"] == "Always"
        else:
            assert inits == ["istio-init"] and spec["containers"][-1]["name"] == "istio-proxy", (name, deployment)
            assert "restartPolicy" not in proxy_of(spec)


def test_one_image_everywhere() -> None:
    for name, deployment, spec in pod_specs():
        for _, c in containers(spec):
            image = c["image"].removeprefix("docker.io/library/")
            assert image == IMAGE or c["image"] in OTHER_IMAGES, (name, deployment, c["name"], c["image"])
    istio = {path: yaml.safe_load((DEPLOY / path).read_text()) for path in ("istio/istiooperator.yaml",
                                                                             "istio/helm-values.yaml")}
    values = [istio["istio/istiooperator.yaml"]["spec"]["values"], istio["istio/helm-values.yaml"]]
    for v in values:  # a name with "/" is used as written by Istio's template
        assert v["global"]["proxy"]["image"] == v["global"]["proxy_init"]["image"] == f"docker.io/library/{IMAGE}"


def test_the_proxy_has_istios_volumes_token_and_probes() -> None:
    for name, deployment, spec in injected():
        volumes = {v["name"]: v for v in spec["volumes"]}
        token = volumes["istio-token"]["projected"]["sources"][0]["serviceAccountToken"]
        assert (token["audience"], token["path"], token["expirationSeconds"]) == ("istio-ca", "istio-token", 43200)
        assert [i["path"] for i in volumes["istio-podinfo"]["downwardAPI"]["items"]] == ["labels", "annotations"]
        assert volumes["istio-envoy"]["emptyDir"] == {"medium": "Memory"}
        assert volumes["istiod-ca-cert"]["configMap"]["name"] == "istio-ca-root-cert"
        proxy = proxy_of(spec)
        mounts = {m["mountPath"]: m["name"] for m in proxy["volumeMounts"]}
        assert mounts == {"/var/run/secrets/workload-spiffe-uds": "workload-socket",
                          "/var/run/secrets/credential-uds": "credential-socket",
                          "/var/run/secrets/workload-spiffe-credentials": "workload-certs",
                          "/var/run/secrets/istio": "istiod-ca-cert", "/var/lib/istio/data": "istio-data",
                          "/etc/istio/proxy": "istio-envoy", "/var/run/secrets/tokens": "istio-token",
                          "/etc/istio/pod": "istio-podinfo"}, (name, deployment)
        for probe in ("startupProbe", "readinessProbe"):
            assert proxy[probe]["httpGet"] == {"path": "/healthz/ready", "port": 15021}, (name, probe)


def test_the_args_are_the_templates_and_pilotfish_accepts_them() -> None:
    for name, deployment, spec in injected():
        init = next(c for _, c in containers(spec) if c["name"] == "istio-init")
        assert init["args"] == INIT_ARGV, (name, deployment)
        env = {e["name"]: e["value"] for e in init["env"]}
        _, rest = init_parse_args(init["args"][1:], env)
        assert rest == [], rest
        proxy = proxy_of(spec)
        assert proxy["args"] == [a.replace("default.svc", "$(POD_NAMESPACE).svc") for a in PROXY_ARGV]
        parser = cli.build_parser("proxy", "pilot-agent")
        kept, dropped = cli.drop_unknown_flags(proxy["args"][1:], cli.known_flags(parser, "proxy"))
        assert dropped == [], dropped  # each flag is one pilotfish knows, not one it ignores
        assert isinstance(parser.parse_args(["proxy", *kept]), argparse.Namespace)
        names = {e["name"] for e in proxy["env"]}
        assert names - {"PATH"} <= set(template_env()) | PROXY_EXTRA_ENV, names - set(template_env())
        assert set(template_env()) - {"PATH"} <= names, set(template_env()) - names


def test_the_mesh_file_parses_and_matches_the_samples_services() -> None:
    configmap = next(d for n, d in DOCS if n == "controlplane/mesh.yaml")
    mesh = parse_mesh(configmap["data"]["mesh.yaml"], "controlplane/mesh.yaml")
    served = {(s.namespace, s.name): s for s in mesh.services}
    services = [d for n, d in DOCS if n == "standalone/common.yaml" and kind_of(d) == "Service"]
    assert services
    for svc in services:
        key = (svc["metadata"]["namespace"], svc["metadata"]["name"])
        assert key in served, key
        assert served[key].default_address == svc["spec"]["clusterIP"], key
        assert served[key].ports == tuple(port["port"] for port in svc["spec"]["ports"]), key


def test_the_controlplane_command_is_one_pilotfish_accepts() -> None:
    deployment = next(d for n, d in DOCS if n == "controlplane/deployment.yaml")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    command = container["command"]
    assert command[:2] == ["/usr/local/bin/pilotfish", "controlplane"]
    args = cli.build_parser("controlplane").parse_args(command[1:])
    assert (args.mesh, args.token_review, args.listen) == ("/etc/pilotfish/mesh.yaml", True, "0.0.0.0:15012")
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert {"/etc/pilotfish", args.state_dir} <= mounts
