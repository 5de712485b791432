"""The Helm chart, offline: Helm's own SDK lints and renders it, Kubernetes' schemas validate what
it renders, swapper itself loads the config it renders, and values.schema.json refuses bad values.
The example manifests (KServe, llmkube) are parsed and their pods' containers validated too."""

from __future__ import annotations

import copy
import json
import re
import shutil
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

import epp
from conftest import REPO, link, synth_file
from swapper import config as swcfg
from swapper.cli import _parser
from swapper.settings_load import list_presets, load_settings
from swapper.units import parse_duration

CHART = REPO / "charts" / "swapper"
EXAMPLES = REPO / "charts" / "examples"
KUBE_VERSIONS = ("1.27.0", kubernetes_validate.utils.latest_version())
CORE_KINDS = {"Deployment", "Service", "ConfigMap", "Secret"}

REPRESENTATIVE: dict[str, Any] = {
    "image": {"repository": "registry.example.com/swapper", "variant": "rocm"},
    "gpu": {"resource": "amd.com/gpu", "count": 1},
    "models": {"existingClaim": "models"},
    "state": {"existingClaim": "swapper-state"},
    "preset": "mi300x-192g",
    "preload": ["qwen-coder"],
    "pin": ["embedder"],
    "readiness": {"gateTraffic": True},
    "drainTimeoutSeconds": 45,
    "apiKeys": {"keys": ["k-one", "k-two"]},
    "adminKeys": {"keys": ["a-one"]},
    "config": {
        "budget": "90%", "reserve": "2GiB", "max_models": 3, "idle_ttl": "15m",
        "queue": {"size": 32, "timeout": "120s", "max_wait": "30s"},
        "defaults": {"ctx_size": 8192, "parallel": 2},
        "engines": {"llamacpp": {"args": ["--metrics", "--flash-attn", "on"]}},
        "models": {
            "qwen-coder": {"path": "qwen2.5-coder-7b-q4_k_m.gguf", "aliases": ["coder"],
                           "adapters": {"sql-lora": "sql-lora.gguf"}},
            "embedder": {"path": "bge-small.gguf", "args": ["--embeddings"]},
        },
    },
    "env": [{"name": "SWAPPER_LOG_FORMAT", "value": "json"}],
    "podSecurityContext": {"runAsNonRoot": True, "runAsUser": 10001, "fsGroup": 10001, "supplementalGroups": [44, 992]},
    "nodeSelector": {"amd.com/gpu.product-name": "AMD_Instinct_MI300X"},
    "tolerations": [{"key": "amd.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
    "serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}},
    "httpRoute": {"enabled": True, "parentRefs": [{"name": "inference-gateway", "namespace": "gateway"}],
                  "models": ["extra-model"]},
}


def merged(*layers: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for layer in layers:
        _merge(out, copy.deepcopy(layer))
    return out


def _merge(dst: dict[str, Any], src: dict[str, Any]) -> None:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _merge(dst[k], v)
        else:
            dst[k] = v


def render(values: dict[str, Any] | None = None, chart: Path = CHART, name: str = "demo") -> list[dict[str, Any]]:
    with helm.Chart.load(chart) as c:
        out = c.render(values or {}, name=name, namespace="ai")
    docs = []
    for path, text in sorted(out.items()):
        if path.endswith("NOTES.txt"):
            continue
        docs += [d for d in yaml.safe_load_all(text) if d]
    return docs


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def the(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = by_kind(docs, kind)
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (c,) = the(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    return c


def rejected(values: dict[str, Any]) -> str:
    with helm.Chart.load(CHART) as c:
        with pytest.raises(helm.HelmValuesError) as e:
            c.validate_schema(values)
        with pytest.raises(helm.HelmValuesError):
            c.render(values, name="demo")
    return str(e.value)


# ------------------------------------------------------------------------------ lint


def test_lint_default_values_offline():
    """Offline the optional dependency is absent: a warning, never an error; nothing else to say."""
    report = helm.lint(CHART, kube_version="v1.27.0")
    assert report["errors"] == []
    serious = [m["error"] for m in report["messages"] if m["severity"] >= 2]
    assert serious == ["chart directory is missing these dependencies: inferencepool"]
    deps = helm.dependency_list(CHART)
    assert [(d["name"], d["status"]) for d in deps] == [("inferencepool", "missing")]
    meta = yaml.safe_load((CHART / "Chart.yaml").read_text())["dependencies"][0]
    assert meta["condition"] == "inferencepool.enabled"
    assert meta["repository"] == "oci://registry.k8s.io/gateway-api-inference-extension/charts"


def test_lint_strict_with_the_dependency_present(tmp_path):
    chart = vendored_chart(tmp_path)
    for values in ({}, REPRESENTATIVE, merged(REPRESENTATIVE, {"inferencepool": {"enabled": True}})):
        report = helm.lint(chart, values, strict=True, kube_version="v1.27.0")
        assert report["errors"] == [], report


# ------------------------------------------------------------------------------ render + validate


@pytest.mark.parametrize("values", [{}, REPRESENTATIVE], ids=["defaults", "representative"])
def test_every_rendered_manifest_is_valid(values):
    docs = render(values)
    kinds = {d["kind"] for d in docs}
    assert CORE_KINDS - {"Secret"} <= kinds
    for doc in docs:
        if doc["kind"] in CORE_KINDS:
            for version in KUBE_VERSIONS:
                kubernetes_validate.validate(doc, version, strict=True)
        elif doc["kind"] == "HTTPRoute":
            check_httproute(doc)
        elif doc["kind"] == "ServiceMonitor":
            check_servicemonitor(doc, the(docs, "Service"))
        else:
            raise AssertionError(f"unexpected kind {doc['kind']}")
    if values:
        assert {"Secret", "HTTPRoute", "ServiceMonitor"} <= kinds


def check_httproute(route: dict[str, Any]) -> None:
    """The parts of Gateway API's HTTPRoute (v1) schema this chart uses."""
    assert route["apiVersion"] == "gateway.networking.k8s.io/v1"
    spec = route["spec"]
    assert spec["parentRefs"] and all(p["name"] for p in spec["parentRefs"])
    assert 1 <= len(spec["rules"]) <= 16
    for rule in spec["rules"]:
        assert 1 <= len(rule["matches"]) <= 64
        for m in rule["matches"]:
            assert m["path"] == {"type": "PathPrefix", "value": "/"}
            (h,) = m["headers"]
            assert h["type"] == "Exact" and h["name"] in ("X-Gateway-Model-Name", "X-Gateway-Base-Model-Name")
            assert re.fullmatch(r"[^\x00-\x1f\x7f]{1,4096}", h["value"])
        assert len(rule["backendRefs"]) == 1
        assert re.fullmatch(r"([0-9]{1,5}(h|m|s|ms)){1,4}", rule["timeouts"]["request"]), "Gateway API duration"


def check_servicemonitor(sm: dict[str, Any], service: dict[str, Any]) -> None:
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    labels = service["metadata"]["labels"]
    assert sm["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (ep,) = sm["spec"]["endpoints"]
    assert ep["port"] == service["spec"]["ports"][0]["name"] and ep["path"] == "/metrics"


def test_deployment_shape():
    docs = render(REPRESENTATIVE)
    dep = the(docs, "Deployment")
    spec, pod = dep["spec"], dep["spec"]["template"]["spec"]
    c = container(docs)
    assert spec["replicas"] == 1 and spec["strategy"] == {"type": "Recreate"}
    assert c["image"] == "registry.example.com/swapper:0.1.0-rocm"
    assert c["resources"]["limits"]["amd.com/gpu"] == 1 and "nvidia.com/gpu" not in c["resources"]["limits"]
    assert c["ports"] == [{"name": "http", "containerPort": 8080, "protocol": "TCP"}]
    for probe in ("startupProbe", "livenessProbe"):
        assert c[probe]["httpGet"] == {"path": "/health/live", "port": "http"}
    ready = c["readinessProbe"]
    assert ready["httpGet"]["path"] == "/health/ready"
    assert ready["periodSeconds"] * ready["failureThreshold"] >= 60, "a swap does not take the pod out"
    assert pod["securityContext"]["runAsNonRoot"] is True and c["securityContext"]["readOnlyRootFilesystem"]
    svc = the(docs, "Service")
    assert svc["spec"]["ports"][0]["port"] == 8080 and svc["spec"]["ports"][0]["targetPort"] == "http"
    assert svc["spec"]["selector"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["models"]["persistentVolumeClaim"] == {"claimName": "models", "readOnly": True}
    assert volumes["state"]["persistentVolumeClaim"] == {"claimName": "swapper-state"}

    cpu = container(render({"gpu": {"resource": "", "count": 1}, "image": {"variant": "cpu"}}))
    assert not any("/" in k for k in cpu["resources"]["limits"]), "no GPU asked for on CPU nodes"
    assert container(render({}))["readinessProbe"]["httpGet"]["path"] == "/health/live"
    host = the(render({"models": {"hostPath": "/srv/models"}}), "Deployment")["spec"]["template"]["spec"]
    assert {"name": "models", "hostPath": {"path": "/srv/models", "type": "Directory"}} in host["volumes"]


def test_rendered_config_is_swappers_own_schema(tmp_path):
    """The ConfigMap's file, the container's args and env, loaded by swapper itself."""
    docs = render(REPRESENTATIVE)
    c = container(docs)
    pod = the(docs, "Deployment")["spec"]["template"]["spec"]
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    cfg_text = the(docs, "ConfigMap")["data"]["config.yaml"]
    cfg_file = tmp_path / "config.yaml"
    cfg_file.write_text(cfg_text)

    args = list(c["args"])
    assert args[:2] == ["--config", f"{mounts['config']}/config.yaml"]
    args[1] = str(cfg_file)
    secrets = {s["metadata"]["name"]: s["stringData"] for s in by_kind(docs, "Secret")}
    env = {}
    for e in c["env"]:
        if "valueFrom" in e:
            ref = e["valueFrom"]["secretKeyRef"]
            env[e["name"]] = secrets[ref["name"]][ref["key"]]
        else:
            env[e["name"]] = e["value"]
    st = load_settings(_parser().parse_args(["serve", *args]), env=env)

    assert st.preset == "mi300x-192g" and st.device == "amd:0", "the preset is applied under the config"
    assert (st.listen.host, st.listen.port) == ("0.0.0.0", 8080)
    assert st.models_dir == mounts["models"] and st.state_dir == mounts["state"] == env["HOME"]
    assert st.drain_timeout == 45
    assert st.preload == ["qwen-coder"] and st.pin == ["embedder"]
    assert st.models["qwen-coder"].adapters == {"sql-lora": "sql-lora.gguf"}
    assert st.models["qwen-coder"].aliases == ["coder"]
    assert st.budget.fraction == 0.9 and st.reserve == 2 << 30 and st.queue.size == 32
    assert st.log_format == "json" and st.admin_keys == ["a-one"]
    key_file = Path(st.api_key_file)
    assert str(key_file.parent) == mounts["api-keys"]
    api_secret = next(v for v in pod["volumes"] if v["name"] == "api-keys")["secret"]
    assert api_secret["items"] == [{"key": "api-keys", "path": key_file.name}]
    local = tmp_path / key_file.name
    local.write_text(secrets[api_secret["secretName"]]["api-keys"])
    st.api_key_file = str(local)
    assert st.all_api_keys() == ["k-one", "k-two"]
    assert pod["terminationGracePeriodSeconds"] > parse_duration(yaml.safe_load(cfg_text)["drain_timeout"])

    default = yaml.safe_load(the(render({}), "ConfigMap")["data"]["config.yaml"])
    assert "api_key_file" not in default and "preload" not in default


def test_config_change_rolls_the_pods():
    a = the(render({}), "Deployment")["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
    b = the(render({"config": {"budget": "80%"}}), "Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert a != b["checksum/config"]


def test_termination_grace_covers_the_drain():
    for drain in (1, 30, 600):
        docs = render({"drainTimeoutSeconds": drain})
        cfg = yaml.safe_load(the(docs, "ConfigMap")["data"]["config.yaml"])
        grace = the(docs, "Deployment")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        assert parse_duration(cfg["drain_timeout"]) == drain and grace >= drain + 20


# ------------------------------------------------------------------------------ schema


def test_schema_requires_preload_or_pin_when_readiness_gates_traffic():
    msg = rejected({"readiness": {"gateTraffic": True}})
    assert "preload" in msg and "pin" in msg
    with helm.Chart.load(CHART) as c:
        c.validate_schema({"readiness": {"gateTraffic": True}, "preload": ["a"]})
        c.validate_schema({"readiness": {"gateTraffic": True}, "pin": ["a"]})
        c.validate_schema({"readiness": {"gateTraffic": False}})


@pytest.mark.parametrize("values", [
    {"config": {"listen": {"port": 9000}}},
    {"config": {"models_dir": "/elsewhere"}},
    {"config": {"state_dir": "/elsewhere"}},
    {"config": {"drain_timeout": "10s"}},
    {"config": {"preload": ["a"]}},
    {"config": {"api_keys": ["k"]}},
    {"config": {"api_key_file": "/k"}},
    {"config": {"admin_keys": ["k"]}},
    {"config": {"bugdet": "90%"}},
    {"config": {"device": "tpu:0"}},
    {"config": {"queue": {"size": 1, "depth": 2}}},
    {"config": {"models": {"m": {"aliases": ["x"]}}}},
    {"config": {"models": {"m": {"path": "m.gguf", "pinnned": True}}}},
    {"gpu": {"resource": "gpu", "count": 1}},
    {"gpu": {"resource": "nvidia.com/gpu", "count": 0}},
    {"image": {"variant": "metal"}},
    {"models": {"existingClaim": "models", "hostPath": "/srv/models"}},
    {"models": {"hostPath": "relative/path"}},
    {"drainTimeoutSeconds": 0},
    {"drainTimeoutSeconds": "30s"},
    {"probes": {"readiness": {"periodSeconds": 10, "failureThreshold": 1, "timeoutSeconds": 5}}},
    {"preload": ["a", "a"]},
    {"replicaCount": -1},
    {"replicas": 2},
])
def test_schema_rejects_bad_values(values):
    rejected(values)


def test_schema_config_keys_follow_swappers_settings():
    """Every setting swapper knows is either owned by the chart or allowed in `config`."""
    schema = json.loads((CHART / "values.schema.json").read_text())
    cfg = schema["properties"]["config"]["properties"]
    top = {o.key.split(".")[0] for o in swcfg.OPTIONS} | {"engines", "defaults", "models", "devices"}
    owned = {"listen", "models_dir", "state_dir", "drain_timeout", "preload", "pin", "api_keys", "api_key_file",
             "admin_keys"}
    assert set(cfg) - {"cors_origin"} == top - owned
    assert set(cfg["models"]["additionalProperties"]["properties"]) == swcfg._MODEL_KEYS
    assert set(cfg["defaults"]["properties"]) == swcfg._DEFAULT_KEYS
    assert set(cfg["queue"]["properties"]) == swcfg._QUEUE_KEYS
    assert set(cfg["engines"]["properties"]) == set(swcfg.ENGINES)
    assert set(cfg["engines"]["properties"]["vllm"]["properties"]) == swcfg._ENGINE_KEYS
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    with helm.Chart.load(CHART) as c:
        c.validate_schema(values)
        c.validate_schema(REPRESENTATIVE)
    assert all(p in list_presets() for p in ("mi300x-192g", "l4-24g"))


# ------------------------------------------------------------------------------ Gateway API


def test_httproute_matches_every_advertised_model_and_adapter_base():
    route = the(render(REPRESENTATIVE), "HTTPRoute")
    headers = [m["headers"][0] for r in route["spec"]["rules"] for m in r["matches"]]
    by_name = {h["value"] for h in headers if h["name"] == "X-Gateway-Model-Name"}
    assert by_name == {"extra-model", "qwen-coder", "embedder", "coder"}
    assert {h["value"] for h in headers if h["name"] == "X-Gateway-Base-Model-Name"} == {"qwen-coder"}
    (backend,) = route["spec"]["rules"][0]["backendRefs"]
    svc = the(render(REPRESENTATIVE), "Service")
    assert backend == {"name": svc["metadata"]["name"], "port": 8080}, "no pool: the Service"


def test_httproute_splits_into_rules_within_gateway_api_limits():
    names = [f"model-{i}" for i in range(150)]
    route = the(render({"httpRoute": {"enabled": True, "models": names}}), "HTTPRoute")
    check_httproute(route)
    assert [len(r["matches"]) for r in route["spec"]["rules"]] == [64, 64, 22]
    got = [m["headers"][0]["value"] for r in route["spec"]["rules"] for m in r["matches"]]
    assert got == names


def test_httproute_without_names_fails_clearly():
    with helm.Chart.load(CHART) as c:
        with pytest.raises(helm.HelmError) as e:
            c.render({"httpRoute": {"enabled": True}}, name="demo")
    assert "httpRoute needs model names" in str(e.value)


STUB_POOL = """\
{{- /* test double keeping the inferencepool v1.5.0 chart's value contract: the InferencePool from
inferencePool.*; the EPP's ConfigMap holds inferenceExtension.pluginsCustomConfig beside its own
default-plugins.yaml, and the EPP runs with --config-file /config/<pluginsConfigFile> plus
inferenceExtension.flags (config/charts/epplib/templates/_config.yaml and _deployment.yaml) */}}
apiVersion: inference.networking.k8s.io/v1
kind: InferencePool
metadata:
  name: {{ .Release.Name }}
spec:
  targetPorts: {{ toJson .Values.inferencePool.targetPorts }}
  selector:
    matchLabels: {{ toJson .Values.inferencePool.modelServers.matchLabels }}
  endpointPickerRef:
    name: {{ .Release.Name }}-epp
    port: {number: 9002}
---
apiVersion: v1
kind: ConfigMap
metadata:
  name: {{ .Release.Name }}-epp
data:
  default-plugins.yaml: "stand-in"
  {{- with .Values.inferenceExtension.pluginsCustomConfig }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
---
apiVersion: v1
kind: ConfigMap
metadata:
  name: {{ .Release.Name }}-epp-args
data:
  args: {{ $a := list "--config-file" (printf "/config/%s" .Values.inferenceExtension.pluginsConfigFile) }}{{ range $k, $v := .Values.inferenceExtension.flags }}{{ $a = append $a (printf "--%s=%v" $k $v) }}{{ end }}{{ toJson $a | quote }}
"""


def vendored_chart(tmp_path: Path) -> Path:
    """A copy of the chart with a stand-in `inferencepool` subchart, as `helm dependency build` would leave it."""
    chart = tmp_path / "swapper"
    shutil.copytree(CHART, chart)
    sub = chart / "charts" / "inferencepool"
    (sub / "templates").mkdir(parents=True)
    dep = yaml.safe_load((CHART / "Chart.yaml").read_text())["dependencies"][0]
    (sub / "Chart.yaml").write_text(yaml.safe_dump({"apiVersion": "v2", "name": "inferencepool",
                                                    "version": dep["version"], "description": "stand-in"}))
    # the subchart's own defaults (v1.5.0 values.yaml) that the parent's values merge over
    (sub / "values.yaml").write_text("inferencePool: {modelServerType: vllm}\n"
                                     "inferenceExtension: {pluginsConfigFile: default-plugins.yaml, flags: {v: 1}}\n")
    (sub / "templates" / "inferencepool.yaml").write_text(STUB_POOL)
    return chart


def epp_config(docs: list[dict[str, Any]], release: str) -> tuple[dict[str, Any], list[str]]:
    """The EndpointPickerConfig the EPP loads, and its command-line flags."""
    args = json.loads(next(d for d in docs if d["metadata"]["name"] == f"{release}-epp-args")["data"]["args"])
    cm = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == f"{release}-epp")
    path = args[args.index("--config-file") + 1]
    assert path.startswith("/config/")
    return yaml.safe_load(cm["data"][path.removeprefix("/config/")]), args


def test_inferencepool_dependency_is_condition_gated_and_selects_swapper_pods(tmp_path):
    chart = vendored_chart(tmp_path)
    off = render(REPRESENTATIVE, chart)
    assert not by_kind(off, "InferencePool"), "disabled: the subchart renders nothing"
    assert helm.dependency_list(chart)[0]["status"] == "unpacked"

    docs = render(merged(REPRESENTATIVE, {"inferencepool": {"enabled": True}}), chart, name="edge")
    pool = the(docs, "InferencePool")
    pod_labels = the(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert pool["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert pool["spec"]["targetPorts"] == [{"number": container(docs)["ports"][0]["containerPort"]}]
    route = the(docs, "HTTPRoute")
    assert route["spec"]["rules"][0]["backendRefs"] == [
        {"group": "inference.networking.k8s.io", "kind": "InferencePool", "name": pool["metadata"]["name"]}]


def test_endpoint_picker_config_validates_against_the_epps_own_types(tmp_path):
    """The EndpointPickerConfig the EPP loads decodes strictly into its Go types (tests/epp.py),
    every reference resolves, and the swapper pods select the `swapper` engine mapping."""
    docs = render(merged(REPRESENTATIVE, {"inferencepool": {"enabled": True}}), vendored_chart(tmp_path), name="edge")
    cfg, args = epp_config(docs, "edge")
    plugins = epp.validate_config(cfg)
    # EPP v1.4.0+ refuse to start with the old metric flags (pkg/epp/server/options.go Validate)
    assert not [a for a in args if a.split("=")[0] in {
        "--total-queued-requests-metric", "--total-running-requests-metric", "--kv-cache-usage-percentage-metric",
        "--lora-info-metric", "--cache-info-metric"}], args
    pod_labels = the(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    engine, mapping = epp.engine_mapping(cfg, pod_labels)
    assert engine == "swapper"
    assert mapping == {"name": "swapper", "queuedRequestsSpec": "swapper_queued_requests",
                       "runningRequestsSpec": "swapper_running_requests",
                       "kvUsageSpec": "swapper_kv_cache_usage_ratio", "loraSpec": "swapper_lora_requests_info",
                       "cacheInfoSpec": ""}
    # model affinity outweighs queue and KV together, so resident beats room beats waiting
    (profile,) = cfg["schedulingProfiles"]
    weights = {p["pluginRef"]: p.get("weight") for p in profile["plugins"]}
    assert {plugins[r]["type"] for r in weights} >= {"lora-affinity-scorer", "queue-scorer",
                                                     "kv-cache-utilization-scorer", "max-score-picker"}
    tiers = (1.0 - 0.8) * weights["lora-affinity-scorer"]
    assert tiers > weights["queue-scorer"] + weights["kv-cache-utilization-scorer"]
    source = cfg["dataLayer"]["sources"][0]
    assert plugins[source["pluginRef"]]["parameters"]["path"] == "/metrics"


@pytest.mark.parametrize("bad, message", [
    ({"plugins": [{"type": "lora-affinity-scorer", "paramters": {}}]}, "unknown field"),
    ({"schedulingProfiles": [{"name": "default", "plugins": [{"pluginRef": "nope"}]}]}, "unknown plugin"),
    ({"dataLayer": {"sources": [{"pluginRef": "lora-affinity-scorer", "extractors": []}]}}, "not a data source"),
], ids=["typo", "dangling-ref", "wrong-source"])
def test_the_epp_type_check_refuses_what_the_epp_refuses(bad, message):
    """The checker above is not a rubber stamp."""
    cfg = yaml.safe_load(yaml.safe_load((CHART / "values.yaml").read_text())["inferencepool"]["inferenceExtension"]
                         ["pluginsCustomConfig"]["swapper-plugins.yaml"])
    for key, value in bad.items():
        cfg[key] = value if key != "plugins" else cfg["plugins"] + value
    with pytest.raises((KeyError, ValueError)) as e:
        epp.validate_config(cfg)
    assert message in str(e.value)


@pytest.mark.real
def test_metrics_the_endpoint_picker_reads_exist(swapper_factory, tmp_path):
    """A real swapper's /metrics through the EPP's extractor with the chart's mapping."""
    d = tmp_path / "models"
    link(synth_file(8, 1), d / "tiny.gguf")
    s = swapper_factory("--models-dir", str(d))
    text = s.get("/metrics").text
    cfg = yaml.safe_load(yaml.safe_load((CHART / "values.yaml").read_text())["inferencepool"]["inferenceExtension"]
                         ["pluginsCustomConfig"]["swapper-plugins.yaml"])
    _, mapping = epp.engine_mapping(cfg, {"inference.networking.k8s.io/engine-type": "swapper"})
    m = epp.extract(text, mapping)  # raises if a mapped metric is missing
    assert (m.waiting_queue_size, m.running_requests_size, m.kv_cache_usage_percent) == (0, 0, 0.0)
    assert m.active_models == {} and m.max_active_models >= 1


# ------------------------------------------------------------------------------ examples


def load_docs(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((EXAMPLES / name).read_text()) if d]


def validate_container(c: dict[str, Any], **pod: Any) -> None:
    """A container from a custom resource, checked as a Pod's container against Kubernetes' schema."""
    doc = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"}, "spec": {"containers": [c], **pod}}
    for version in KUBE_VERSIONS:
        kubernetes_validate.validate(doc, version, strict=True)


def serve_settings(argv: list[str]) -> swcfg.Settings:
    ns, unknown = _parser().parse_known_args(["serve", *argv])
    # llama-server's router flag; swapper always serves /metrics
    assert set(unknown) <= {"--metrics"}, unknown
    return load_settings(ns, env={})


def test_kserve_example():
    runtime, isvc = load_docs("kserve.yaml")
    assert (runtime["apiVersion"], runtime["kind"]) == ("serving.kserve.io/v1alpha1", "ClusterServingRuntime")
    assert (isvc["apiVersion"], isvc["kind"]) == ("serving.kserve.io/v1beta1", "InferenceService")
    (c,) = runtime["spec"]["containers"]
    assert c["name"] == "kserve-container" and c["image"]
    validate_container(c)
    formats = {f["name"] for f in runtime["spec"]["supportedModelFormats"]}
    pred = isvc["spec"]["predictor"]
    model = pred["model"]
    assert model["runtime"] == runtime["metadata"]["name"] and model["modelFormat"]["name"] in formats
    assert model["storageUri"].startswith("pvc://")
    assert isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "RawDeployment"
    assert pred["deploymentStrategy"] == {"type": "Recreate"} and pred["minReplicas"] == pred["maxReplicas"] == 1
    merged_container = {**c, "args": c["args"] + model["args"], "resources": model["resources"]}
    validate_container(merged_container, terminationGracePeriodSeconds=pred["terminationGracePeriodSeconds"])
    st = serve_settings(merged_container["args"])
    assert st.models_dir == "/mnt/models", "where KServe mounts the storage URI"
    assert st.listen.port == c["ports"][0]["containerPort"] == c["readinessProbe"]["httpGet"]["port"]
    assert c["readinessProbe"]["httpGet"]["path"] == "/health/ready" and st.preload
    assert pred["terminationGracePeriodSeconds"] > st.drain_timeout
    assert model["resources"]["limits"]["nvidia.com/gpu"] == "1"


def test_llmkube_example():
    (isvc,) = load_docs("llmkube.yaml")
    assert (isvc["apiVersion"], isvc["kind"]) == ("inference.llmkube.dev/v1alpha1", "InferenceService")
    spec = isvc["spec"]
    assert spec["runtime"] == "llamacpp-router"
    assert "modelRef" not in spec, "router mode takes models[] instead of modelRef"
    names = [m["name"] for m in spec["models"]]
    assert names and len(set(names)) == len(names)
    assert spec["image"].rsplit(":", 1)[1].endswith(("-cuda", "-rocm", "-cpu", "-vllm"))
    assert spec["resources"]["gpu"] >= 1
    probes = spec["probeOverrides"]
    validate_container({"name": "x", "image": spec["image"], "startupProbe": probes["startup"],
                        "livenessProbe": probes["liveness"], "readinessProbe": probes["readiness"]})
    assert probes["readiness"]["httpGet"]["path"] == "/health/ready"
    assert probes["liveness"]["httpGet"]["path"] == probes["startup"]["httpGet"]["path"] == "/health/live"
    router_argv = ["--models-dir", "/models", "--host", "0.0.0.0", "--port", str(spec["endpoint"]["port"]),
                   "--metrics"]
    st = serve_settings(router_argv + spec["extraArgs"])
    assert st.preload and set(st.preload) <= set(names), "the model loaded at start is one it advertises"
    assert st.listen.port == probes["readiness"]["httpGet"]["port"]


def test_fleet_example_four_nodes_twelve_models(tmp_path):
    """charts/examples/fleet-values.yaml renders into valid manifests: 4 pods spread one per node,
    12 models routed through the InferencePool, and an EPP configuration the EPP accepts."""
    values = yaml.safe_load((EXAMPLES / "fleet-values.yaml").read_text())
    with helm.Chart.load(CHART) as c:
        c.validate_schema(values)
    docs = render(values, vendored_chart(tmp_path), name="fleet")
    for d in docs:
        if d["kind"] in CORE_KINDS:
            for version in KUBE_VERSIONS:
                kubernetes_validate.validate(d, version, strict=True)
    dep = the(docs, "Deployment")
    assert dep["spec"]["replicas"] == 4
    pod = dep["spec"]["template"]
    (term,) = pod["spec"]["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert term["topologyKey"] == "kubernetes.io/hostname"
    assert term["labelSelector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert len(values["config"]["models"]) == 12
    routed = {h["value"] for rule in the(docs, "HTTPRoute")["spec"]["rules"] for m in rule["matches"]
              for h in m["headers"]}
    assert routed >= set(values["config"]["models"]) | {"coder", "llama", "r1"}
    cfg, _ = epp_config(docs, "fleet")
    epp.validate_config(cfg)
    assert epp.engine_mapping(cfg, pod["metadata"]["labels"])[0] == "swapper"
