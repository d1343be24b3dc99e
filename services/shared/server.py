"""The frame every service runs in: grpc.aio server, health, reflection, signals, shutdown.

A service's `server.py` builds its state, registers servicers through `ServiceRunner.add`,
starts, flips health to SERVING once its model (or dependency) is ready, and awaits
`wait_for_shutdown()`, which returns on SIGTERM or SIGINT.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from types import ModuleType

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from services.shared.auth import AuthSettings, make_authorizer
from services.shared.channels import channel_options
from services.shared.metrics import MetricsEndpoint, start_metrics_endpoint
from services.shared.rpc import add_servicer
from services.shared.settings import ServiceSettings
from services.shared.tls import TlsSettings, server_credentials

log = logging.getLogger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING
# Health service name that is SERVING while the process answers at all (Kubernetes liveness);
# "" and the API services only turn SERVING once the service is ready (readiness).
LIVENESS_SERVICE = "liveness"
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def server_options(settings: ServiceSettings) -> list[tuple[str, int]]:
    """The channel options of `channel_options`, and how many calls the gRPC core may hold before the
    event loop takes them up: one limit, no random early drops below it (soft = hard)."""
    return [
        *channel_options(settings.max_message_bytes),
        ("grpc.server.max_pending_requests", settings.max_unanswered_rpcs),
        ("grpc.server.max_pending_requests_hard_limit", settings.max_unanswered_rpcs),
    ]


class ServiceRunner:
    """Owns one grpc.aio server and its health state."""

    def __init__(
        self,
        name: str,
        settings: ServiceSettings,
        *,
        auth: AuthSettings | None = None,
        tls: TlsSettings | None = None,
        internal_port: int | None = None,
    ) -> None:
        """`auth` / `tls` default to the MAGNUS_AUTH_* / MAGNUS_TLS_* environment (both off unless set).

        `internal_port` (0 = a free one) opens a second listener on the same host for the services
        added with `is_internal=True`; the client port then does not serve them at all.
        """
        if internal_port and internal_port == settings.port:
            # gRPC binds with SO_REUSEPORT: both listeners would share the port and take turns
            raise ValueError(f"{name}: the internal port must differ from the client port {settings.port}")
        self.name = name
        self.settings = settings
        self.authorizer = make_authorizer(auth)
        self.tls = tls or TlsSettings()
        self.server = grpc.aio.server(options=server_options(settings))
        self.health = HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self._service_names: list[str] = []
        self._internal_names: list[str] = []
        self._internal_port_setting = internal_port
        self.internal_server = (
            None if internal_port is None else grpc.aio.server(options=server_options(settings))
        )
        self._shutdown = asyncio.Event()
        self.port = 0
        self.internal_port = 0
        self.metrics: MetricsEndpoint | None = None

    def add(self, pb2: ModuleType, service_name: str, servicer: object, *, is_internal: bool = False) -> None:
        """Serve `servicer`; with `is_internal`, only on the internal listener (`internal_port`)."""
        if not is_internal:
            self._service_names.append(add_servicer(self.server, pb2, service_name, servicer, self.authorizer))
            return
        if self.internal_server is None:
            raise ValueError(f"{self.name}: {service_name} is internal, but no internal_port was given")
        self._internal_names.append(add_servicer(self.internal_server, pb2, service_name, servicer, self.authorizer))

    def _bind(self, server: grpc.aio.Server, port: int, credentials) -> int:
        address = f"{self.settings.host}:{port}"
        # TLS only when configured: then there is no plaintext port at all
        bound = server.add_insecure_port(address) if credentials is None else server.add_secure_port(address, credentials)
        if bound == 0:
            raise RuntimeError(f"{self.name}: could not bind {address}")
        return bound

    async def start(self) -> int:
        """Bind, start, and report NOT_SERVING until `set_serving(True)`. Returns the bound port."""
        names = [*self._service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name]
        reflection.enable_server_reflection([*names, reflection.SERVICE_NAME], self.server)
        credentials = server_credentials(self.tls)
        self.port = self._bind(self.server, self.settings.port, credentials)
        if self.internal_server is not None:
            reflection.enable_server_reflection([*self._internal_names, reflection.SERVICE_NAME], self.internal_server)
            self.internal_port = self._bind(self.internal_server, self._internal_port_setting or 0, credentials)
        await self.set_serving(False)
        await self.health.set(LIVENESS_SERVICE, SERVING)
        await self.server.start()
        if self.internal_server is not None:
            await self.internal_server.start()
            log.info(
                "%s internal API (%s) listening on %s:%d", self.name, ", ".join(self._internal_names),
                self.settings.host, self.internal_port,
            )
        if self.settings.metrics_port >= 0:
            self.metrics = start_metrics_endpoint(self.settings.host, self.settings.metrics_port)
        self._install_signal_handlers()
        log.info(
            "%s listening on %s:%d (%s, auth %s)", self.name, self.settings.host, self.port,
            ("mutual TLS" if self.tls.require_client_cert else "TLS") if credentials else "plaintext",
            "on" if self.authorizer else "off",
        )
        return self.port

    async def set_serving(self, is_serving: bool) -> None:
        status = SERVING if is_serving else NOT_SERVING
        for name in ["", *self._service_names]:
            await self.health.set(name, status)

    def _install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_shutdown)

    def request_shutdown(self) -> None:
        if not self._shutdown.is_set():
            log.info("%s: shutdown requested", self.name)
        self._shutdown.set()

    @property
    def is_shutting_down(self) -> bool:
        return self._shutdown.is_set()

    async def wait_for_shutdown(self) -> None:
        await self._shutdown.wait()

    async def stop(self, grace_s: float | None = None) -> None:
        """NOT_SERVING, refuse new RPCs, let in-flight ones finish within the grace period."""
        await self.health.enter_graceful_shutdown()
        grace_s = self.settings.shutdown_grace_s if grace_s is None else grace_s
        servers = [self.server] if self.internal_server is None else [self.server, self.internal_server]
        await asyncio.gather(*(server.stop(grace_s) for server in servers))
        if self.metrics is not None:
            self.metrics.stop()
            self.metrics = None
        log.info("%s stopped", self.name)
