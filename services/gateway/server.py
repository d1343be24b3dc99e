"""Gateway wiring: the batcher channel, the ASGI app on uvicorn, shutdown.

Starlette on uvicorn (not FastAPI): the API is six routes whose request and error shapes are
OpenAI's, not the framework's; FastAPI's automatic 422 validation errors and OpenAPI schema would
have to be overridden to speak OpenAI's error shape, so the smaller layer it is built on is used
directly with pydantic models for the bodies (requests.py).
"""

from __future__ import annotations

import logging

import uvicorn

from services.gateway.app import Gateway
from services.gateway.chat import ChatRenderer
from services.gateway.config import GatewaySettings
from services.shared.auth import AuthSettings
from services.shared.channels import open_channel

log = logging.getLogger(__name__)


def build(settings: GatewaySettings) -> tuple[Gateway, object]:
    """The gateway and its channel. The channel carries TLS but never the service token: every call
    acts for the HTTP caller's own API key."""
    channel = open_channel(settings.batcher_target, settings.max_message_bytes, auth=AuthSettings(service_token=""))
    return Gateway(settings, channel, ChatRenderer(settings.chat_template_model)), channel


async def serve(settings: GatewaySettings) -> None:
    gateway, channel = build(settings)
    config = uvicorn.Config(
        gateway.app(), host=settings.host, port=settings.port, log_config=None, access_log=False,
        timeout_graceful_shutdown=int(settings.shutdown_grace_s), lifespan="off",
    )
    server = uvicorn.Server(config)
    log.info("OpenAI-compatible API on http://%s:%d/v1 (model %r, chat: %s) -> batcher %s", settings.host,
             settings.port, gateway.model, gateway.renderer.name, settings.batcher_target)
    try:
        await server.serve()  # returns after SIGTERM/SIGINT, once in-flight requests ended (or the grace ran out)
    finally:
        await channel.close()
