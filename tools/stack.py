"""Start the services as real processes on localhost: used by `make run` and the tests.

Every service gets its port and its peers' addresses through the same environment variables a
deployment would set, logs to its own file, and is stopped with SIGTERM (then SIGKILL).

TLS and auth follow the MAGNUS_TLS_* / MAGNUS_AUTH_* variables the services get (the launcher's
environment plus `extra_env`): health checks and `open_channel` speak TLS (presenting the client
certificate for mutual TLS) and send the service token, exactly as the services do among themselves.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.shared.auth import AuthSettings
from services.shared.channels import channel_options, open_channel
from services.shared.tls import TlsSettings, channel_credentials

REPO_ROOT = Path(__file__).resolve().parents[1]
SERVICES = ("predictor", "estimator", "trainer", "batcher", "worker", "gateway")
# HTTP services: health is GET /health (200 = SERVING), /metrics on the same port
HTTP_SERVICES = ("gateway",)
# Key in `Stack.ports` of the batcher's internal listener (WorkerQueueService, workers only).
BATCHER_INTERNAL = "batcher_internal"
WORKER = "worker"


def worker_name(index: int) -> str:
    """Name of a stack's index-th worker: "worker", then "worker-1", "worker-2", ..."""
    return WORKER if index == 0 else f"{WORKER}-{index}"


_HANDED_OUT_PORTS: set[int] = set()
LOWEST_TEST_PORT = 10000


def free_port() -> int:
    """A port nothing listens on now. Under pytest-xdist each test worker draws at random from its own
    slice of the ports below the kernel's ephemeral range: with the kernel's choice (port 0), two
    workers starting stacks at once were handed the same just-released port (a service then failed
    to bind, busy CI run 3 of 2026-12-02), and an outgoing connection can take an ephemeral one."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    if not worker.startswith("gw"):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            return sock.getsockname()[1]
    index, count = int(worker[2:]), max(1, int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    span = (_ephemeral_low() - LOWEST_TEST_PORT) // count
    first = LOWEST_TEST_PORT + index * span
    for _ in range(1000):
        port = random.randrange(first, first + span)
        if port in _HANDED_OUT_PORTS:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        _HANDED_OUT_PORTS.add(port)
        return port
    raise RuntimeError(f"no free port in {first}..{first + span - 1}")


def _ephemeral_low() -> int:
    """The lowest port the kernel hands out for outgoing connections (Linux; 32768 elsewhere)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


@dataclass
class Stack:
    """A set of service processes sharing one log DB and one model store."""

    workdir: Path
    database_url: str
    model_store_dir: Path | None = None  # default: <workdir>/model-store
    ports: dict[str, int] = field(default_factory=dict)
    metrics_ports: dict[str, int] = field(default_factory=dict)  # Prometheus /metrics per service
    extra_env: dict[str, str] = field(default_factory=dict)
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    # Workers pulling from the one batcher: "worker", "worker-1", ... (worker_names), each with its
    # own worker id, health port and metrics port. With more than one, each announces its name as id.
    num_workers: int = 1
    # CUDA_VISIBLE_DEVICES of the i-th worker (one GPU each, e.g. ("0", "1")); empty = inherited
    worker_devices: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {self.num_workers}")
        if self.worker_devices and len(self.worker_devices) != self.num_workers:
            raise ValueError(f"worker_devices names {len(self.worker_devices)} devices for {self.num_workers} workers")
        self.workdir.mkdir(parents=True, exist_ok=True)
        for name in (*SERVICES, *self.worker_names[1:]):
            self.ports.setdefault(name, free_port())
            self.metrics_ports.setdefault(name, self.ports[name] if name in HTTP_SERVICES else free_port())
        self.ports.setdefault(BATCHER_INTERNAL, free_port())

    @property
    def worker_names(self) -> tuple[str, ...]:
        return tuple(worker_name(i) for i in range(self.num_workers))

    @property
    def names(self) -> tuple[str, ...]:
        """Every service start_all starts: SERVICES, then the workers after the first."""
        return (*SERVICES, *self.worker_names[1:])

    def target(self, name: str) -> str:
        return f"127.0.0.1:{self.ports[name]}"

    def metrics_url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.metrics_ports[name]}/metrics"

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            {
                "PYTHONUNBUFFERED": "1",
                "MAGNUS_DATABASE_URL": self.database_url,
                "MAGNUS_MODEL_STORE_DIR": str(self.model_store_dir or self.workdir / "model-store"),
                "MAGNUS_BATCHER_PREDICTOR_TARGET": self.target("predictor"),
                "MAGNUS_BATCHER_ESTIMATOR_TARGET": self.target("estimator"),
                "MAGNUS_BATCHER_INTERNAL_PORT": str(self.ports[BATCHER_INTERNAL]),
                "MAGNUS_WORKER_BATCHER_TARGET": self.target(BATCHER_INTERNAL),
                "MAGNUS_TRAINER_PREDICTOR_TARGETS": self.target("predictor"),
                "MAGNUS_TRAINER_ESTIMATOR_TARGETS": self.target("estimator"),
                "MAGNUS_GATEWAY_BATCHER_TARGET": self.target("batcher"),
            }
        )
        for name in SERVICES:
            env[f"MAGNUS_{name.upper()}_PORT"] = str(self.ports[name])
            env[f"MAGNUS_{name.upper()}_METRICS_PORT"] = str(self.metrics_ports[name])
        env.update(self.extra_env)
        return env

    def tls_settings(self) -> TlsSettings:
        """The TLS settings every service of this stack runs with (off unless MAGNUS_TLS_* is set)."""
        return TlsSettings(**_prefixed(self.env(), "MAGNUS_TLS_"))

    def auth_settings(self) -> AuthSettings:
        """The auth settings every service of this stack runs with (off unless the service token is set)."""
        return AuthSettings(**_prefixed(self.env(), "MAGNUS_AUTH_"))

    def open_channel(self, name: str) -> grpc.aio.Channel:
        """An aio channel to a service as another service would open it: TLS and the service token."""
        return open_channel(self.target(name), tls=self.tls_settings(), auth=self.auth_settings())

    def _sync_channel(self, name: str) -> grpc.Channel:
        tls = self.tls_settings()
        credentials = channel_credentials(tls)
        if credentials is None:
            return grpc.insecure_channel(self.target(name))
        options = [*channel_options(), *([("grpc.ssl_target_name_override", tls.server_name)] if tls.server_name else [])]
        return grpc.secure_channel(self.target(name), credentials, options=options)

    def log_path(self, name: str) -> Path:
        return self.workdir / "logs" / f"{name}.log"

    def start(self, name: str, extra_env: dict[str, str] | None = None) -> None:
        self.log_path(name).parent.mkdir(parents=True, exist_ok=True)
        env = self.env()
        module = name
        if name in self.worker_names:
            module = WORKER
            env.update(self._worker_env(name))
        env.update(extra_env or {})
        with open(self.log_path(name), "ab") as log_file:
            self.processes[name] = subprocess.Popen(
                [sys.executable, "-m", f"services.{module}"],
                cwd=REPO_ROOT,
                env=env,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C in the terminal reaches the launcher only
            )

    def start_all(self) -> None:
        for name in self.names:
            self.start(name)

    def _worker_env(self, name: str) -> dict[str, str]:
        """What sets one worker of several apart: its ports, its id, its GPU."""
        env = {"MAGNUS_WORKER_PORT": str(self.ports[name]), "MAGNUS_WORKER_METRICS_PORT": str(self.metrics_ports[name])}
        if self.num_workers > 1:
            env["MAGNUS_WORKER_WORKER_ID"] = name
        if self.worker_devices:
            env["CUDA_VISIBLE_DEVICES"] = self.worker_devices[self.worker_names.index(name)]
        return env

    def url(self, name: str) -> str:
        """Base URL of an HTTP service (the gateway's OpenAI API is under /v1)."""
        return f"http://127.0.0.1:{self.ports[name]}"

    def health(self, name: str) -> int | None:
        """The health status of a service, or None if it does not answer."""
        if name in HTTP_SERVICES:
            return _http_health(f"{self.url(name)}/health")
        try:
            with self._sync_channel(name) as channel:
                response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                return response.status
        except grpc.RpcError:
            return None

    def wait_healthy(self, names: tuple[str, ...] = SERVICES, timeout_s: float = 120.0) -> None:
        """Block until every named service reports SERVING; raise with its log tail if not."""
        deadline_s = time.monotonic() + timeout_s
        waiting = list(names)
        while waiting and time.monotonic() < deadline_s:
            for name in list(waiting):
                process = self.processes.get(name)
                if process is not None and process.poll() is not None:
                    raise RuntimeError(f"{name} exited with {process.returncode}:\n{self.log_tail(name)}")
                if self.health(name) == health_pb2.HealthCheckResponse.SERVING:
                    waiting.remove(name)
            time.sleep(0.2)
        if waiting:
            tails = "\n".join(f"--- {n} ---\n{self.log_tail(n)}" for n in waiting)
            raise TimeoutError(f"not SERVING after {timeout_s:.0f} s: {', '.join(waiting)}\n{tails}")

    def log_tail(self, name: str, num_lines: int = 30) -> str:
        path = self.log_path(name)
        return "\n".join(path.read_text(errors="replace").splitlines()[-num_lines:]) if path.exists() else ""

    def stop(self, name: str, timeout_s: float = 20.0) -> int | None:
        """SIGTERM, wait, then SIGKILL. Returns the exit code."""
        process = self.processes.get(name)
        if process is None or process.poll() is not None:
            return process.returncode if process else None
        process.send_signal(signal.SIGTERM)
        try:
            return process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            return process.wait()

    def kill(self, name: str) -> None:
        process = self.processes.get(name)
        if process is not None and process.poll() is None:
            process.kill()
            process.wait()

    def stop_all(self, timeout_s: float = 20.0) -> None:
        # the batcher first, so it drains while workers still pull; then the rest together (one after
        # another, each slow stop added up to a minute of a benchmark's device time)
        self.stop("batcher", timeout_s)
        rest = [p for n, p in self.processes.items() if n != "batcher" and p.poll() is None]
        for process in rest:
            process.send_signal(signal.SIGTERM)
        deadline_s = time.monotonic() + timeout_s
        for process in rest:
            try:
                process.wait(max(0.0, deadline_s - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _prefixed(env: dict[str, str], prefix: str) -> dict[str, str]:
    """The `prefix`ed variables of `env` as settings fields (MAGNUS_TLS_CA_FILE -> ca_file)."""
    return {k.removeprefix(prefix).lower(): v for k, v in env.items() if k.startswith(prefix) and v != ""}


def _http_health(url: str) -> int | None:
    """GET /health as a gRPC health status: 200 = SERVING, another status = NOT_SERVING."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=1.0) as response:
            status = response.status
    except urllib.error.HTTPError as error:
        status = error.code
    except OSError:
        return None
    return health_pb2.HealthCheckResponse.SERVING if status == 200 else health_pb2.HealthCheckResponse.NOT_SERVING
