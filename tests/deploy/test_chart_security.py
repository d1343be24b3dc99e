"""The chart is secure by default: auth on everywhere, no install without API keys, TLS from a
Secret, the batcher's internal port on its own Service that only workers may reach."""

from __future__ import annotations

import base64

import helm_python as helm
import pytest

from deploy.check_chart import (
    EXAMPLE_API_KEY_ENTRY,
    NO_API_KEYS_MESSAGE,
    VALUE_SETS,
    check_refused,
    load_values,
    refused_value_sets,
    render,
    with_api_key,
)
from services.shared.auth import api_key_entry, parse_api_key_entries

COMPONENTS = ("batcher", "predictor", "estimator", "trainer", "worker")


def find(documents, kind, name):
    return next(d for d in documents if d["kind"] == kind and d["metadata"]["name"] == name)


def service_containers(documents):
    for component in COMPONENTS:
        kind = "StatefulSet" if component in ("predictor", "estimator") else "Deployment"
        (container,) = find(documents, kind, f"magnus-{component}")["spec"]["template"]["spec"]["containers"]
        yield component, container


def env_of(container):
    return {e["name"]: e for e in container.get("env", [])}


@pytest.mark.parametrize("name", list(refused_value_sets()))
def test_install_without_api_keys_fails_with_a_clear_message(name):
    values = refused_value_sets()[name]
    with pytest.raises(helm.HelmError) as raised:
        render(values)
    message = str(raised.value)
    assert NO_API_KEYS_MESSAGE in message
    for hint in ("auth.apiKeys", "auth.apiKeysSecret.name", "auth.insecure=true", "hash-key"):
        assert hint in message
    assert check_refused(values) is None


def test_auth_is_on_in_every_service_by_default_with_a_generated_token():
    documents = render(with_api_key({}))
    secret = find(documents, "Secret", "magnus-auth")
    token = base64.b64decode(secret["data"]["service-token"]).decode()
    assert len(token) >= 32 and token.isalnum()
    entries = base64.b64decode(secret["data"]["api-keys"]).decode()
    assert entries == EXAMPLE_API_KEY_ENTRY
    assert parse_api_key_entries(entries)[0].tenant == "team-a"  # the services accept what the chart stores
    for component, container in service_containers(documents):
        env = env_of(container)
        token_ref = env["MAGNUS_AUTH_SERVICE_TOKEN"]["valueFrom"]["secretKeyRef"]
        keys_ref = env["MAGNUS_AUTH_API_KEYS"]["valueFrom"]["secretKeyRef"]
        assert token_ref == {"name": "magnus-auth", "key": "service-token"}, component
        assert keys_ref == {"name": "magnus-auth", "key": "api-keys"}, component
        assert not any(k.startswith("MAGNUS_TLS_") for k in env), "TLS stays off without tls.secretName"


def test_existing_secrets_replace_the_generated_ones():
    documents = render(
        {
            "auth": {
                "serviceToken": {"existingSecret": "my-token", "existingSecretKey": "token"},
                "apiKeysSecret": {"name": "my-keys", "key": "entries"},
            }
        }
    )
    assert not [d for d in documents if d["kind"] == "Secret" and d["metadata"]["name"] == "magnus-auth"]
    for _, container in service_containers(documents):
        env = env_of(container)
        assert env["MAGNUS_AUTH_SERVICE_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "my-token", "key": "token"}
        assert env["MAGNUS_AUTH_API_KEYS"]["valueFrom"]["secretKeyRef"] == {"name": "my-keys", "key": "entries"}


def test_insecure_flag_turns_auth_off_and_dev_values_use_it():
    for values in ({"auth": {"insecure": True}}, load_values(VALUE_SETS["dev"])):
        documents = render(values)
        assert not [d for d in documents if d["kind"] == "Secret" and d["metadata"]["name"] == "magnus-auth"]
        for _, container in service_containers(documents):
            assert not any(k.startswith("MAGNUS_AUTH_") for k in env_of(container))


@pytest.mark.parametrize("entry", ["plain-raw-key", "team-a:sha256:abc", "team a:sha256:" + "0" * 64])
def test_schema_refuses_raw_or_malformed_api_keys(entry):
    with pytest.raises(helm.HelmValuesError):
        render({"auth": {"apiKeys": [entry]}})


def test_schema_accepts_what_hash_key_prints():
    render({"auth": {"apiKeys": [api_key_entry("tenant.one_2", "some raw key")]}})


def test_tls_secret_is_mounted_and_configured_in_every_service():
    documents = render(with_api_key({"tls": {"secretName": "magnus-tls", "requireClientCert": True}}))
    for component, container in service_containers(documents):
        env = env_of(container)
        mount = next(m for m in container["volumeMounts"] if m["name"] == "tls")
        assert mount["readOnly"] and mount["mountPath"] == "/etc/magnus/tls"
        for variable, file in (("CERT_FILE", "tls.crt"), ("KEY_FILE", "tls.key"), ("CA_FILE", "ca.crt")):
            assert env[f"MAGNUS_TLS_{variable}"]["value"] == f"/etc/magnus/tls/{file}", component
        assert env["MAGNUS_TLS_REQUIRE_CLIENT_CERT"]["value"] == "true"
        assert "grpc" not in container["readinessProbe"], "the kubelet's gRPC probe cannot speak TLS"
    pod = find(documents, "Deployment", "magnus-batcher")["spec"]["template"]["spec"]
    volume = next(v for v in pod["volumes"] if v["name"] == "tls")
    assert volume["secret"]["secretName"] == "magnus-tls"


def test_workers_reach_the_batcher_on_its_internal_service_and_only_they_may():
    documents = render(with_api_key({}))
    (batcher,) = find(documents, "Deployment", "magnus-batcher")["spec"]["template"]["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in batcher["ports"]}
    assert env_of(batcher)["MAGNUS_BATCHER_INTERNAL_PORT"]["value"] == str(ports["grpc-internal"]) == "50061"
    client = find(documents, "Service", "magnus-batcher")
    assert "grpc-internal" not in {p["targetPort"] for p in client["spec"]["ports"]}
    internal = find(documents, "Service", "magnus-batcher-internal")
    assert internal["spec"]["type"] == "ClusterIP"
    assert [(p["port"], p["targetPort"]) for p in internal["spec"]["ports"]] == [(50061, "grpc-internal")]
    (worker,) = find(documents, "Deployment", "magnus-worker")["spec"]["template"]["spec"]["containers"]
    assert env_of(worker)["MAGNUS_WORKER_BATCHER_TARGET"]["value"] == "magnus-batcher-internal:50061"

    policy = find(documents, "NetworkPolicy", "magnus-batcher")
    assert policy["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "batcher"
    rules_by_port = {p["port"]: rule for rule in policy["spec"]["ingress"] for p in rule["ports"]}
    internal_rule = rules_by_port["grpc-internal"]
    (source,) = internal_rule["from"]
    assert source["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "worker"
    assert "from" not in rules_by_port["grpc"], "clients may come from anywhere"
    assert all("grpc-internal" not in {p["port"] for p in r["ports"]} for r in policy["spec"]["ingress"] if "from" not in r)

    assert not [d for d in render(with_api_key({"networkPolicy": {"enabled": False}})) if d["kind"] == "NetworkPolicy"]


def test_api_keys_given_twice_are_refused():
    with pytest.raises(helm.HelmError, match="not both"):
        render({"auth": {"apiKeys": [EXAMPLE_API_KEY_ENTRY], "apiKeysSecret": {"name": "my-keys"}}})
