"""`make run`'s credentials for the demo: none without auth, the given key, or one made for the run."""

from __future__ import annotations

from services.shared.auth import parse_api_key_entries
from tools.run_local import demo_credentials

EXISTING = "ops:sha256:" + "ab" * 32


def test_auth_off_needs_no_key():
    assert demo_credentials({"MAGNUS_API_KEY": "k"}) == ({}, None, False)


def test_a_given_key_is_used_as_is():
    env = {"MAGNUS_AUTH_SERVICE_TOKEN": "t", "MAGNUS_AUTH_API_KEYS": EXISTING, "MAGNUS_API_KEY": "mine"}
    assert demo_credentials(env) == ({}, "mine", False)


def test_without_a_key_one_is_made_for_tenant_demo_beside_the_configured_ones():
    extra_env, key, is_made = demo_credentials({"MAGNUS_AUTH_SERVICE_TOKEN": "t", "MAGNUS_AUTH_API_KEYS": EXISTING})
    assert is_made and len(key) >= 32
    entries = parse_api_key_entries(extra_env["MAGNUS_AUTH_API_KEYS"])
    assert [e.tenant for e in entries] == ["ops", "demo"]
    assert key not in extra_env["MAGNUS_AUTH_API_KEYS"], "only the digest goes to the services"
