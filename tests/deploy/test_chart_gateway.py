"""The chart's gateway: HTTP probes, a Service whose metrics port the ServiceMonitor scrapes, the
batcher's client address, and no service credential (it acts with each caller's own API key)."""

from __future__ import annotations

from deploy.check_chart import VALUE_SETS, load_values, render
from tests.deploy.test_chart import container_of, env_of, find


def test_gateway_deployment_and_service_in_every_value_set():
    for name in VALUE_SETS:
        documents = render(load_values(VALUE_SETS[name]))
        container = container_of(find(documents, "Deployment", "magnus-gateway"))
        assert container["args"] == ["python", "-m", "services.gateway"]
        assert container["readinessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
        assert container["livenessProbe"]["httpGet"] == {"path": "/health/live", "port": "http"}
        env = env_of(container)
        assert env["MAGNUS_GATEWAY_BATCHER_TARGET"]["value"] == "magnus-batcher:50051"
        assert not any(key.startswith("MAGNUS_AUTH_") for key in env), name
        ports = {p["name"]: p for p in find(documents, "Service", "magnus-gateway")["spec"]["ports"]}
        assert ports["http"]["targetPort"] == "http" and ports["metrics"]["targetPort"] == "http"


def test_gateway_can_be_left_out():
    values = load_values(VALUE_SETS["default"])
    values.setdefault("gateway", {})["enabled"] = False
    documents = render(values)
    assert not [d for d in documents if d["metadata"]["name"] == "magnus-gateway"]
