"""The Helm chart, rendered offline by Helm's Go SDK: the fields a platform engineer relies on."""

from __future__ import annotations

import importlib
import json
import re

import helm_python as helm
import pytest
from prometheus_client import REGISTRY

import services.batcher.metrics  # noqa: F401 - registers the batcher's metrics
import services.trainer.metrics  # noqa: F401 - registers the trainer's metrics
import services.worker.metrics  # noqa: F401 - registers the worker's metrics
from deploy.check_chart import (
    CHART_DIR,
    VALUE_SETS,
    load_values,
    render,
    validate_manifests,
    with_api_key,
)
from services.shared.auth import AuthSettings
from services.shared.server import LIVENESS_SERVICE
from services.shared.tls import TlsSettings

COMPONENTS = ("batcher", "predictor", "estimator", "trainer", "worker")
GPU = "nvidia.com/gpu"


@pytest.fixture(scope="module", params=list(VALUE_SETS))
def manifests(request):
    return request.param, render(load_values(VALUE_SETS[request.param]))


def find(documents, kind, name):
    return next(d for d in documents if d["kind"] == kind and d["metadata"]["name"] == name)


def workloads(documents):
    return {d["metadata"]["name"]: d for d in documents if d["kind"] in ("Deployment", "StatefulSet", "Job")}


def container_of(workload):
    (container,) = workload["spec"]["template"]["spec"]["containers"]
    return container


def env_of(container):
    return {e["name"]: e for e in container.get("env", [])}


def test_every_value_set_renders_valid_manifests(manifests):
    name, documents = manifests
    assert validate_manifests(documents) == []
    for component in COMPONENTS:
        kind = "StatefulSet" if component in ("predictor", "estimator") else "Deployment"
        find(documents, kind, f"magnus-{component}")


def test_gpu_limits_on_workers_only(manifests):
    name, documents = manifests
    values = load_values(VALUE_SETS[name])
    num_gpus = values.get("worker", {}).get("gpu", {}).get("count", 1)  # values.yaml default: 1
    for workload_name, workload in workloads(documents).items():
        resources = container_of(workload).get("resources", {})
        gpus = {**resources.get("limits", {}), **resources.get("requests", {})}.get(GPU)
        if workload_name == "magnus-worker":
            assert gpus == (num_gpus or None), name
        else:
            assert gpus is None, f"{workload_name} asks for a GPU"
    worker = find(documents, "Deployment", "magnus-worker")
    device = env_of(container_of(worker))["MAGNUS_WORKER_DEVICE"]["value"]
    assert device == ("cuda" if num_gpus else "cpu")
    assert ("worker-cuda" in container_of(worker)["image"]) == bool(num_gpus)


def test_production_workers_get_gpu_scheduling_fields():
    documents = render(load_values(VALUE_SETS["production"]))
    pod = find(documents, "Deployment", "magnus-worker")["spec"]["template"]["spec"]
    assert pod["runtimeClassName"] == "nvidia"
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert pod["tolerations"][0]["key"] == GPU
    batcher_pod = find(documents, "Deployment", "magnus-batcher")["spec"]["template"]["spec"]
    assert "runtimeClassName" not in batcher_pod and "nodeSelector" not in batcher_pod


def test_grpc_probes_on_the_standard_health_service(manifests):
    name, documents = manifests
    is_tls = bool(load_values(VALUE_SETS[name]).get("tls", {}).get("secretName"))
    for component in COMPONENTS:
        workload = workloads(documents)[f"magnus-{component}"]
        container = container_of(workload)
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        if is_tls:  # the kubelet's gRPC probe speaks plaintext only: a TLS client runs in the pod
            for probe, service in (("readinessProbe", ""), ("livenessProbe", LIVENESS_SERVICE)):
                command = container[probe]["exec"]["command"]
                assert command[:3] == ["python", "-m", "tools.health_probe"], component
                assert command[command.index("--port") + 1] == str(ports["grpc"]), component
                assert command[command.index("--service") + 1] == service, component
        else:
            readiness, liveness = container["readinessProbe"]["grpc"], container["livenessProbe"]["grpc"]
            assert readiness == {"port": ports["grpc"], "service": ""}, component
            assert liveness == {"port": ports["grpc"], "service": LIVENESS_SERVICE}, component
        env = env_of(container)
        prefix = f"MAGNUS_{component.upper()}_"
        assert env[f"{prefix}PORT"]["value"] == str(ports["grpc"])
        assert env[f"{prefix}METRICS_PORT"]["value"] == str(ports["metrics"])
        assert env[f"{prefix}HOST"]["value"] == "0.0.0.0"


def test_migration_runs_as_a_hook_before_the_pods(manifests):
    name, documents = manifests
    job = find(documents, "Job", "magnus-migrate")
    hooks = set(job["metadata"]["annotations"]["helm.sh/hook"].split(","))
    bundled_db = load_values(VALUE_SETS[name]).get("postgresql", {}).get("enabled", False)
    assert hooks == ({"post-install", "pre-upgrade"} if bundled_db else {"pre-install", "pre-upgrade"})
    container = container_of(job)
    assert container["args"] == ["python", "-m", "services.shared.db", "upgrade"]
    secret_ref = env_of(container)["MAGNUS_DATABASE_URL"]["valueFrom"]["secretKeyRef"]
    for component in COMPONENTS:  # the Job migrates the very database the services use
        service_env = env_of(container_of(workloads(documents)[f"magnus-{component}"]))
        assert service_env["MAGNUS_DATABASE_URL"]["valueFrom"]["secretKeyRef"] == secret_ref
    chart_secrets = [d for d in documents if d["kind"] == "Secret" and d["metadata"]["name"] == secret_ref["name"]]
    if chart_secrets:  # created by the chart: it must exist before the Job, so it is an earlier hook
        annotations = chart_secrets[0]["metadata"]["annotations"]
        assert "pre-install" in annotations["helm.sh/hook"]
        assert int(annotations["helm.sh/hook-weight"]) < int(job["metadata"]["annotations"]["helm.sh/hook-weight"])


def test_worker_replicas_are_independent_of_the_other_services():
    documents = render(with_api_key({"worker": {"replicas": 7}, "predictor": {"replicas": 3}}))
    assert find(documents, "Deployment", "magnus-worker")["spec"]["replicas"] == 7
    assert find(documents, "StatefulSet", "magnus-predictor")["spec"]["replicas"] == 3
    assert find(documents, "Deployment", "magnus-batcher")["spec"]["replicas"] == 1
    assert find(documents, "StatefulSet", "magnus-estimator")["spec"]["replicas"] == 1


def test_worker_autoscaling_hands_replicas_to_keda():
    documents = render(load_values(VALUE_SETS["production"]))
    assert "replicas" not in find(documents, "Deployment", "magnus-worker")["spec"]
    scaled = find(documents, "ScaledObject", "magnus-worker")
    assert scaled["spec"]["scaleTargetRef"]["name"] == "magnus-worker"
    assert "magnus_queue_requests" in scaled["spec"]["triggers"][0]["metadata"]["query"]
    assert not [d for d in render(with_api_key({})) if d["kind"] == "ScaledObject"]  # off by default


def test_trainer_pushes_to_every_predictor_and_estimator_replica():
    documents = render(with_api_key({"predictor": {"replicas": 3}, "estimator": {"replicas": 2}}))
    env = env_of(container_of(find(documents, "Deployment", "magnus-trainer")))
    for component, count in (("predictor", 3), ("estimator", 2)):
        stateful = find(documents, "StatefulSet", f"magnus-{component}")
        headless = find(documents, "Service", stateful["spec"]["serviceName"])
        assert headless["spec"]["clusterIP"] == "None"
        targets = env[f"MAGNUS_TRAINER_{component.upper()}_TARGETS"]["value"].split(",")
        assert targets == [
            f"magnus-{component}-{i}.{headless['metadata']['name']}.serving.svc:{headless['spec']['ports'][0]['port']}"
            for i in range(count)
        ]


def test_every_rendered_magnus_variable_is_a_real_setting():
    """A typo in the chart's wiring (MAGNUS_WORKER_BATCHER_TARGT) would be ignored silently at run time."""
    fields = {
        c: set(importlib.import_module(f"services.{c}.config").__dict__[f"{c.capitalize()}Settings"].model_fields)
        for c in COMPONENTS
    }
    shared = {"MAGNUS_DATABASE_URL", "MAGNUS_MODEL_STORE_DIR", "MAGNUS_MODEL"}
    shared |= {f"MAGNUS_AUTH_{f.upper()}" for f in AuthSettings.model_fields}
    shared |= {f"MAGNUS_TLS_{f.upper()}" for f in TlsSettings.model_fields}
    for name in VALUE_SETS:
        documents = render(load_values(VALUE_SETS[name]))
        configs = {d["metadata"]["name"]: d.get("data") or {} for d in documents if d["kind"] == "ConfigMap"}
        for component in COMPONENTS:
            container = container_of(workloads(documents)[f"magnus-{component}"])
            names = set(env_of(container)) | set(configs[f"magnus-{component}"])
            prefix = f"MAGNUS_{component.upper()}_"
            for variable in names:
                if variable.startswith(prefix):
                    assert variable.removeprefix(prefix).lower() in fields[component], (name, variable)
                elif variable.startswith("MAGNUS_") and not variable.startswith("MAGNUS_EXAMPLE"):
                    assert variable in shared, (name, variable)


@pytest.mark.parametrize(
    "bad_values",
    [
        {"batcher": {"replicas": 2}},  # the queue lives in one process
        {"worker": {"gpu": {"count": -1}}},
        {"worker": {"config": {"BATCH_SIZE": "8"}}},  # not a MAGNUS_ variable
        {"databse": {"url": "x"}},  # typo of a top-level key
        {"database": {"url": "mysql://db/magnus"}},
    ],
)
def test_schema_refuses_bad_values(bad_values):
    with pytest.raises(helm.HelmValuesError):
        render(with_api_key(bad_values))


def test_no_database_configured_fails_with_a_clear_message():
    with pytest.raises(helm.HelmError, match="database.existingSecret"):
        render(with_api_key({"database": {"existingSecret": ""}}))


def test_grafana_dashboard_only_uses_exported_metrics():
    dashboard = json.loads((CHART_DIR / "dashboards" / "magnus.json").read_text())
    expressions = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    used = {re.sub(r"_(bucket|sum|count)$", "", m) for e in expressions for m in re.findall(r"magnus_[a-z_]+", e)}
    exported = {
        sample_name
        for family in REGISTRY.collect()
        for sample_name in (family.name, f"{family.name}_total")
        if family.name.startswith("magnus_")
    }
    assert used and used <= exported, used - exported
    domain = {"magnus_queue_requests", "magnus_batch_size_requests", "magnus_batch_wma_token_reads",
              "magnus_length_prediction_error_tokens", "magnus_batch_time_estimate_error_seconds",
              "magnus_model_version", "magnus_worker_utilisation_ratio", "magnus_oom_splits_total",
              "magnus_rpc_requests_total", "magnus_rpc_duration_seconds"}
    assert domain <= used
