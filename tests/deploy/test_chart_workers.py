"""The chart's workers (issue 21): one GPU per pod, a replica count, spread over nodes."""

from __future__ import annotations

from deploy.check_chart import VALUE_SETS, load_values, render, validate_manifests, with_api_key


def worker_spec(values: dict) -> dict:
    documents = render(with_api_key(values))
    assert validate_manifests(documents) == []
    worker = next(d for d in documents if d["kind"] == "Deployment" and d["metadata"]["name"] == "magnus-worker")
    return worker


def test_workers_ask_one_gpu_each_and_spread_softly_over_hosts_by_default():
    values = {**load_values(VALUE_SETS["default"]), "worker": {"replicas": 2}}
    worker = worker_spec(values)
    assert worker["spec"]["replicas"] == 2
    pod = worker["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    (spread,) = pod["topologySpreadConstraints"]
    assert spread["topologyKey"] == "kubernetes.io/hostname"
    assert spread["whenUnsatisfiable"] == "ScheduleAnyway"
    assert spread["labelSelector"]["matchLabels"] == worker["spec"]["selector"]["matchLabels"]


def test_spread_can_be_hard_or_off():
    values = {**load_values(VALUE_SETS["default"]), "worker": {}}
    values["worker"]["spread"] = {"mode": "hard", "topologyKey": "topology.kubernetes.io/zone", "maxSkew": 2}
    (spread,) = worker_spec(values)["spec"]["template"]["spec"]["topologySpreadConstraints"]
    assert (spread["whenUnsatisfiable"], spread["topologyKey"], spread["maxSkew"]) == (
        "DoNotSchedule", "topology.kubernetes.io/zone", 2)
    values["worker"]["spread"] = {"mode": "off"}
    assert "topologySpreadConstraints" not in worker_spec(values)["spec"]["template"]["spec"]
