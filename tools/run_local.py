"""`make run`: start every service on localhost, wait for health, send the demo, print a summary.

Expects the set-up steps of the Makefile to have run (environment, generated code, migrations,
default model, first predictor and estimator versions). Ctrl-C stops everything cleanly.

TLS and auth: the services and this launcher read the same MAGNUS_TLS_* / MAGNUS_AUTH_* variables.
With auth on, the demo sends MAGNUS_API_KEY; without one, a key for tenant "demo" is made for this
run and added to the services' MAGNUS_AUTH_API_KEYS. `--serve` supervises: a service that exits is
restarted with exponential backoff (tools/supervise.py).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import signal
import sys
from pathlib import Path

from services.shared.auth import api_key_entry
from services.shared.settings import VAR_DIR, default_database_url
from tools import demo
from tools.stack import BATCHER_INTERNAL, HTTP_SERVICES, Stack
from tools.supervise import Supervisor


def demo_credentials(env: dict[str, str]) -> tuple[dict[str, str], str | None, bool]:
    """(extra service env, the demo's API key or None, whether the key was made here).

    Auth off: nothing. Auth on and MAGNUS_API_KEY set: that key (its entry must be in
    MAGNUS_AUTH_API_KEYS). Otherwise a fresh key for tenant "demo", its entry appended to the keys.
    """
    if not env.get("MAGNUS_AUTH_SERVICE_TOKEN"):
        return {}, None, False
    if env.get(demo.API_KEY_ENV):
        return {}, env[demo.API_KEY_ENV], False
    key = secrets.token_urlsafe(32)
    entries = [e for e in env.get("MAGNUS_AUTH_API_KEYS", "").split(",") if e.strip()]
    entries.append(api_key_entry(demo.DEFAULT_TENANT, key))
    return {"MAGNUS_AUTH_API_KEYS": ",".join(entries)}, key, True


def curl_example(base_url: str, api_key: str | None) -> str:
    """A curl line that works against this stack (the README shows the same)."""
    auth = f" -H 'Authorization: Bearer {api_key}'" if api_key else ""
    return (f"  curl -sN {base_url}/v1/chat/completions -H 'Content-Type: application/json'{auth} \\\n"
            """    -d '{"messages": [{"role": "user", "content": "She go to school yesterday ."}], """
            """"max_tokens": 16, "stream": true}'""")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=demo.DEFAULT_DATA_DIR, help="task folder or one JSONL file")
    parser.add_argument("--num-requests", type=int, default=48)
    parser.add_argument("--rate", type=float, default=8.0, help="Poisson arrivals, requests/s")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--serve", action="store_true", help="keep the stack running after the demo")
    parser.add_argument("--workers", type=int, default=1,
                        help="workers pulling from the one batcher (worker, worker-1, ...; ports picked free)")
    args = parser.parse_args()

    ports = dict(zip(("batcher", "predictor", "estimator", "trainer", "worker"), range(50051, 50056)))
    ports[BATCHER_INTERNAL] = 50061  # the batcher's worker-only listener, its default port
    ports["gateway"] = 8080  # the OpenAI-compatible HTTP API, its default port
    auth_env, api_key, is_key_made_here = demo_credentials(dict(os.environ))
    stack = Stack(
        workdir=VAR_DIR / "run",
        database_url=os.environ.get("MAGNUS_DATABASE_URL", default_database_url()),
        model_store_dir=Path(os.environ.get("MAGNUS_MODEL_STORE_DIR", VAR_DIR / "model-store")),
        ports=ports,
        extra_env=auth_env,
        num_workers=args.workers,
    )
    tls, auth = stack.tls_settings(), stack.auth_settings()
    # a key given in MAGNUS_API_KEY acts for its own tenant, which the batcher takes from an empty tenant_id
    tenant_id = "" if api_key and not is_key_made_here else demo.DEFAULT_TENANT
    access = demo.ClientAccess(tls=tls if tls.is_enabled else None, api_key=api_key, tenant_id=tenant_id)
    supervisor = Supervisor(stack) if args.serve else None
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        print(
            f"starting {', '.join(stack.names)} ({'TLS' if tls.is_enabled else 'plaintext'}, "
            f"auth {'on' if auth.is_enabled else 'off'}); logs in {stack.workdir / 'logs'}"
        )
        stack.start_all()
        for name in stack.names:
            internal = f" (workers: {stack.target(BATCHER_INTERNAL)})" if name == "batcher" else ""
            address = f"http {stack.url(name)}/v1" if name in HTTP_SERVICES else f"grpc {stack.target(name)}"
            print(f"  {name:9s} {address}{internal}  metrics {stack.metrics_url(name)}")
        stack.wait_healthy(stack.names, timeout_s=180)
        print("all services SERVING")
        if supervisor is not None:
            supervisor.start()
        requests = demo.load_requests(args.data, args.num_requests, args.max_new_tokens, seed=0)
        print(f"sending {len(requests)} requests at {args.rate:g}/s ...")
        load_before = demo.machine_load()
        outcomes = asyncio.run(demo.run_workload(stack.target("batcher"), requests, args.rate, seed=0, access=access))
        summary = demo.summarize(outcomes)
        summary["latency_note"] = demo.what_latency_measures(load_before, demo.machine_load())
        demo.print_summary(summary)
        print(f"\nOpenAI-compatible API (while the stack runs: make serve):\n{curl_example(stack.url('gateway'), api_key)}")
        if args.serve:
            print(f"\nstack running and supervised; batcher at {stack.target('batcher')}. Ctrl-C to stop.")
            if is_key_made_here:
                print(f"API key of tenant {demo.DEFAULT_TENANT!r} for this run: {api_key}")
            signal.pause()
        return 0 if summary["num_failed"] == 0 else 1
    except KeyboardInterrupt:
        print("\nstopping ...")
        return 130
    finally:
        if supervisor is not None:
            supervisor.stop()
        stack.stop_all()
        print("stopped.")


if __name__ == "__main__":
    sys.exit(main())
