"""The Gateway API Inference Extension endpoint picker (EPP), as far as swapper's tests need it.

Transcribed from the EPP's Go sources, checked against kubernetes-sigs/gateway-api-inference-extension
tag v1.5.0 (df9f8909fe06fe2dfd4a6fc0bd0c01a0acabf849, the release the chart's `inferencepool`
dependency pins) and llm-d/llm-d-router main at ebab687927f5331c1b39defcb579a07951bce56c (after
v0.10.0), where the EPP now lives. Paths below are relative to either repository.

- `extract()` mirrors `pkg/epp/framework/plugins/datalayer/extractor/metrics/extractor.go`,
  `spec.go` and `loraspec.go`: metric specs in PromQL selector syntax, the standard metrics take
  the matching series with the greatest exposition timestamp (first on ties), the LoRA metric the
  series with the greatest *value*, adapter lists split on "," with spaces trimmed.
- `lora_affinity_score()` mirrors `pkg/epp/framework/plugins/scheduling/scorer/loraaffinity`.
- `CONFIG_FIELDS` / `PLUGIN_PARAMS` are the JSON tags of `apix/config/v1alpha1/
  endpointpickerconfig_types.go` and of the plugins' parameter structs; `validate_config()` decodes
  strictly, as the EPP's loader does (`serializer.EnableStrict`), and checks references the way
  `pkg/epp/config/loader` resolves them.
The Go sources cannot run here (no Go toolchain, no network), hence this transcription; each table
names the struct it copies so that a release bump can be re-checked field by field.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

# ------------------------------------------------------------------------------ metric specs (spec.go)

_METRIC_SPEC = re.compile(r"^\s*(\S+?)\s*(?:\{([^}]*)\})?\s*$")
_LABEL_PAIR = re.compile(r'^\s*(\S+?)\s*=\s*"([^"]*)"\s*$')
_ADD_QUOTES = re.compile(r'(\w+)\s*=\s*([^",}\s]+)')
# prometheus/common model.LegacyValidation
_METRIC_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
_LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")


@dataclass(frozen=True)
class Spec:
    name: str
    labels: dict[str, str]


def parse_spec(spec: str) -> Spec | None:
    """parseStringToSpec: "" disables the metric; anything malformed is an error."""
    if spec == "":
        return None
    quoted = _ADD_QUOTES.sub(r'\1="\2"', spec)
    m = _METRIC_SPEC.match(quoted)
    if not m or not _METRIC_NAME.match(m.group(1)):
        raise ValueError(f"not a valid metric specification: {spec!r}")
    labels: dict[str, str] = {}
    block = (m.group(2) or "").strip()
    if block:
        for pair in block.split(","):
            lm = _LABEL_PAIR.match(pair)
            if not lm or not _LABEL_NAME.match(lm.group(1)):
                raise ValueError(f"invalid label pair {pair!r} in specification: {spec!r}")
            labels[lm.group(1)] = lm.group(2)
    return Spec(m.group(1), labels)


@dataclass
class Series:
    labels: dict[str, str]
    value: float
    timestamp_ms: int


def families(text: str) -> dict[str, list[Series]]:
    out: dict[str, list[Series]] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            ts = int(s.timestamp * 1000) if s.timestamp is not None else 0
            out.setdefault(fam.name, []).append(Series(dict(s.labels), s.value, ts))
    return out


def _matches(spec: Spec, series: Series) -> bool:
    return all(series.labels.get(k) == v for k, v in spec.labels.items())


def latest(spec: Spec, fams: dict[str, list[Series]]) -> Series:
    """Spec.getLatestMetric: greatest timestamp, the first on ties; missing is an error."""
    found = fams.get(spec.name)
    if not found:
        raise LookupError(f"metric family {spec.name!r} not found")
    best, recent = None, -1
    for s in found:
        if _matches(spec, s) and s.timestamp_ms > recent:
            best, recent = s, s.timestamp_ms
    if best is None:
        raise LookupError(f"no matching metric found for {spec.name!r} with labels {spec.labels}")
    return best


def latest_lora(spec: Spec, fams: dict[str, list[Series]]) -> Series | None:
    """LoRASpec.getLatestMetric: the series with the greatest value (its timestamp); none is fine."""
    best, recent = None, -1.0
    for s in fams.get(spec.name, []):
        if _matches(spec, s) and s.value > recent:
            best, recent = s, s.value
    return best


@dataclass
class EndpointMetrics:
    """The fields of the EPP's `fwkdl.Metrics` that the extractor fills."""

    waiting_queue_size: int = 0
    running_requests_size: int = 0
    kv_cache_usage_percent: float = 0.0
    active_models: dict[str, int] = field(default_factory=dict)
    waiting_models: dict[str, int] = field(default_factory=dict)
    max_active_models: int = 0


def _add_adapters(into: dict[str, int], csv: str) -> None:
    for name in csv.split(","):
        if name.strip():
            into[name.strip()] = 0


def extract(text: str, engine: dict[str, str]) -> EndpointMetrics:
    """Extractor.Extract for one pod whose engine mapping is `engine` (an engineConfigs entry)."""
    fams = families(text)
    out = EndpointMetrics()
    if spec := parse_spec(engine.get("queuedRequestsSpec", "")):
        out.waiting_queue_size = int(latest(spec, fams).value)
    if spec := parse_spec(engine.get("runningRequestsSpec", "")):
        out.running_requests_size = int(latest(spec, fams).value)
    if spec := parse_spec(engine.get("kvUsageSpec", "")):
        out.kv_cache_usage_percent = latest(spec, fams).value
    if (spec := parse_spec(engine.get("loraSpec", ""))) and (s := latest_lora(spec, fams)):
        for k, v in s.labels.items():
            if k == "running_lora_adapters":
                _add_adapters(out.active_models, v)
            elif k == "waiting_lora_adapters":
                _add_adapters(out.waiting_models, v)
            elif k == "max_lora" and v != "":
                out.max_active_models = int(v)  # strconv.Atoi: anything else is an error
    return out


def lora_affinity_score(m: EndpointMetrics, target_model: str) -> float:
    """LoraAffinityScorer.Score for one endpoint."""
    if target_model in m.active_models:
        return 1.0
    if len(m.active_models) + len(m.waiting_models) < m.max_active_models:
        return 0.8
    if target_model in m.waiting_models:
        return 0.6
    return 0.0


# ------------------------------------------------------------------------------ configuration types

# apix/config/v1alpha1/endpointpickerconfig_types.go: JSON tags -> kind of value. Fields present
# in both GAIE v1.5.0 and llm-d-router main (the latter adds requestHandler, discovery, ...).
CONFIG_FIELDS: dict[str, dict[str, str]] = {
    "EndpointPickerConfig": {"apiVersion": "str", "kind": "str", "featureGates": "list[str]",
                             "plugins": "list[PluginSpec]", "schedulingProfiles": "list[SchedulingProfile]",
                             "saturationDetector": "SaturationDetectorConfig", "dataLayer": "DataLayerConfig",
                             "flowControl": "any", "parser": "ParserConfig"},
    "PluginSpec": {"name": "str", "type": "str", "parameters": "any"},
    "SchedulingProfile": {"name": "str", "plugins": "list[SchedulingPlugin]"},
    "SchedulingPlugin": {"pluginRef": "str", "weight": "float"},
    "SaturationDetectorConfig": {"pluginRef": "str"},
    "DataLayerConfig": {"sources": "list[DataLayerSource]"},
    "DataLayerSource": {"pluginRef": "str", "extractors": "list[DataLayerExtractor]"},
    "DataLayerExtractor": {"pluginRef": "str"},
    "ParserConfig": {"pluginRef": "str"},
    # pkg/epp/framework/plugins/datalayer/extractor/metrics/factories.go
    "modelServerExtractorParams": {"engineLabelKey": "str", "defaultEngine": "str",
                                   "engineConfigs": "list[engineConfigParams]"},
    "engineConfigParams": {"name": "str", "queuedRequestsSpec": "str", "runningRequestsSpec": "str",
                           "kvUsageSpec": "str", "loraSpec": "str", "cacheInfoSpec": "str",
                           "cacheBlockSizeLabelName": "str", "cacheNumBlocksLabelName": "str",
                           "cacheBlockSizeSpec": "str", "cacheNumBlocksSpec": "str"},
    # pkg/epp/framework/plugins/datalayer/source/metrics/datasource.go
    "metricsDataSourceParams": {"scheme": "str", "path": "str", "insecureSkipVerify": "bool"},
    # pkg/epp/framework/plugins/scheduling/picker/common.go
    "pickerParams": {"maxNumOfEndpoints": "int"},
}

API_VERSIONS = {"inference.networking.x-k8s.io/v1alpha1"}  # GAIE's group; llm-d-router still accepts it
KIND = "EndpointPickerConfig"
# Registered plugin types (their `...Type` constants) -> the struct of their parameters, or None
# when their factory ignores parameters.
PLUGIN_PARAMS: dict[str, str | None] = {
    "metrics-data-source": "metricsDataSourceParams",
    "core-metrics-extractor": "modelServerExtractorParams",
    "lora-affinity-scorer": None,
    "queue-scorer": None,
    "kv-cache-utilization-scorer": None,
    "running-requests-size-scorer": None,
    "prefix-cache-scorer": "any",
    "max-score-picker": "pickerParams",
    "random-picker": "pickerParams",
    "weighted-random-picker": "pickerParams",
    "single-profile-handler": None,
}
SCORERS = {"lora-affinity-scorer", "queue-scorer", "kv-cache-utilization-scorer",
           "running-requests-size-scorer", "prefix-cache-scorer"}
PICKERS = {"max-score-picker", "random-picker", "weighted-random-picker"}
DEFAULT_ENGINE_LABEL_KEYS = ("inference.networking.k8s.io/engine-type",  # GAIE v1.4, v1.5
                             "llm-d.ai/engine-type")  # llm-d-router; falls back to the former


def _check(value: Any, kind: str, where: str) -> None:
    if kind == "any":
        return
    if kind.startswith("list["):
        if not isinstance(value, list):
            raise TypeError(f"{where}: expected a list, got {value!r}")
        for i, item in enumerate(value):
            _check(item, kind[5:-1], f"{where}[{i}]")
        return
    simple = {"str": str, "bool": bool, "int": int, "float": (int, float)}
    if kind in simple:
        if isinstance(value, bool) and kind != "bool" or not isinstance(value, simple[kind]):
            raise TypeError(f"{where}: expected {kind}, got {value!r}")
        return
    if not isinstance(value, dict):
        raise TypeError(f"{where}: expected a {kind} object, got {value!r}")
    fields = CONFIG_FIELDS[kind]
    for k, v in value.items():
        if k not in fields:
            raise KeyError(f'{where}: unknown field "{k}" in {kind}')
        if v is not None:
            _check(v, fields[k], f"{where}.{k}")


def validate_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """Decode strictly and resolve references; returns {plugin name: plugin spec}."""
    _check(cfg, "EndpointPickerConfig", "config")
    if cfg.get("apiVersion") not in API_VERSIONS or cfg.get("kind") != KIND:
        raise ValueError(f"not an EndpointPickerConfig: {cfg.get('apiVersion')}/{cfg.get('kind')}")
    plugins: dict[str, Any] = {}
    for p in cfg.get("plugins") or []:
        if p.get("type") not in PLUGIN_PARAMS:
            raise ValueError(f"unknown plugin type {p.get('type')!r}")
        name = p.get("name") or p["type"]  # applyStaticDefaults
        if name in plugins:
            raise ValueError(f"plugin name {name!r} used twice")
        params_kind = PLUGIN_PARAMS[p["type"]]
        if p.get("parameters") is not None and params_kind is not None:
            _check(p["parameters"], params_kind, f"plugins[{name}].parameters")
        plugins[name] = p
    for prof in cfg.get("schedulingProfiles") or []:
        for sp in prof.get("plugins") or []:
            if sp["pluginRef"] not in plugins:
                raise ValueError(f"profile {prof['name']!r} refers to unknown plugin {sp['pluginRef']!r}")
    for src in (cfg.get("dataLayer") or {}).get("sources") or []:
        if plugins.get(src["pluginRef"], {}).get("type") != "metrics-data-source":
            raise ValueError(f"data source {src['pluginRef']!r} is not a data source plugin")
        for ex in src.get("extractors") or []:
            if plugins.get(ex["pluginRef"], {}).get("type") != "core-metrics-extractor":
                raise ValueError(f"extractor {ex['pluginRef']!r} is not an extractor plugin")
    for p in plugins.values():
        if p["type"] == "core-metrics-extractor":
            params = p.get("parameters") or {}
            engines = params.get("engineConfigs") or []
            for e in engines:
                if not e.get("name") or e["name"] == "default":
                    raise ValueError("engine config name cannot be empty or 'default'")
                for key in ("queuedRequestsSpec", "runningRequestsSpec", "kvUsageSpec", "loraSpec", "cacheInfoSpec"):
                    parse_spec(e.get(key, ""))
            default = params.get("defaultEngine") or "vllm"
            if default not in {e["name"] for e in engines} | {"vllm", "sglang", "trtllm-serve", "triton-tensorrt-llm"}:
                raise ValueError(f"defaultEngine {default!r} not found in engineConfigs")
    return plugins


def engine_mapping(cfg: dict[str, Any], pod_labels: dict[str, str]) -> tuple[str, dict[str, str]]:
    """The engine config the extractor uses for a pod with these labels (getEngineTypeFromEndpoint)."""
    ex = next(p for p in cfg["plugins"] if p["type"] == "core-metrics-extractor")
    params = ex.get("parameters") or {}
    key = params.get("engineLabelKey") or DEFAULT_ENGINE_LABEL_KEYS[0]
    engine = pod_labels.get(key) or pod_labels.get(DEFAULT_ENGINE_LABEL_KEYS[0]) or params.get("defaultEngine") or "vllm"
    engines = {e["name"]: e for e in params.get("engineConfigs") or []}
    return engine, engines[engine]
