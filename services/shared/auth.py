"""Who may call what: client API keys and one service credential, both sent as gRPC metadata.

Every call carries `authorization: Bearer <secret>`. A secret that equals the service token is a
SERVICE caller (the batcher, workers, the trainer); one of the API keys is a CLIENT. Clients may
call the public API (GenerationService) and read-only model/status RPCs; the internal RPCs that
move work or change models (INTERNAL_METHODS) need the service token, so an API-key holder gets
PERMISSION_DENIED there. A call without a known secret gets UNAUTHENTICATED. Health and
reflection never ask (Kubernetes probes carry no secret).

Off unless `MAGNUS_AUTH_SERVICE_TOKEN` is set, so `make run` needs no secrets. Secrets are
`SecretStr`: they never appear in reprs, logs or error messages.
"""

from __future__ import annotations

import enum
import hmac

import grpc
from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.shared.errors import RpcError

METADATA_KEY = "authorization"
BEARER = "Bearer "

# Full method names that move work or change served models: service credential only.
INTERNAL_METHODS = frozenset(
    {
        "/magnus.v1.WorkerQueueService/RegisterWorker",
        "/magnus.v1.WorkerQueueService/PullBatch",
        "/magnus.v1.WorkerQueueService/CompleteBatch",
        "/magnus.v1.WorkerQueueService/ReportBatchFailure",
        "/magnus.v1.WorkerQueueService/Heartbeat",
        "/magnus.v1.ModelAdminService/LoadModel",
        "/magnus.v1.TrainerService/Retrain",
    }
)


class Unauthenticated(RpcError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(RpcError):
    code = grpc.StatusCode.PERMISSION_DENIED


class Role(enum.Enum):
    CLIENT = "client"
    SERVICE = "service"


class AuthSettings(BaseSettings):
    """Env prefix MAGNUS_AUTH_ (shared by every service)."""

    model_config = SettingsConfigDict(env_prefix="MAGNUS_AUTH_", extra="ignore")

    service_token: SecretStr = Field(
        SecretStr(""),
        description="Credential of the services themselves (internal RPCs). Empty = auth off everywhere.",
    )
    api_keys: SecretStr = Field(
        SecretStr(""), description="Comma-separated client API keys (public RPCs only). Ignored while auth is off."
    )

    @property
    def is_enabled(self) -> bool:
        return bool(self.service_token.get_secret_value())

    def api_key_list(self) -> list[str]:
        return [k.strip() for k in self.api_keys.get_secret_value().split(",") if k.strip()]


class Authorizer:
    """Decides, per call, from the method name and the caller's metadata. Pure: no I/O."""

    def __init__(self, settings: AuthSettings) -> None:
        self._service_token = settings.service_token.get_secret_value().encode()
        self._api_keys = [k.encode() for k in settings.api_key_list()]
        if self._service_token and any(hmac.compare_digest(k, self._service_token) for k in self._api_keys):
            raise ValueError("MAGNUS_AUTH_API_KEYS must not contain the service token")

    def role_of(self, metadata: tuple[tuple[str, str | bytes], ...] | None) -> Role | None:
        secret = _bearer(metadata)
        if secret is None:
            return None
        # compare_digest against every candidate: timing reveals neither which key nor how much matched
        is_service = hmac.compare_digest(secret, self._service_token)
        is_client = any([hmac.compare_digest(secret, key) for key in self._api_keys])
        return Role.SERVICE if is_service else Role.CLIENT if is_client else None

    def check(self, method: str, metadata: tuple[tuple[str, str | bytes], ...] | None) -> Role:
        """The caller's role for `method`, or raise Unauthenticated / PermissionDenied."""
        role = self.role_of(metadata)
        if role is None:
            raise Unauthenticated(f"{method}: send '{METADATA_KEY}: Bearer <API key>' metadata")
        if method in INTERNAL_METHODS and role is not Role.SERVICE:
            raise PermissionDenied(f"{method} is internal: an API key may not call it")
        return role


def _bearer(metadata: tuple[tuple[str, str | bytes], ...] | None) -> bytes | None:
    for key, value in metadata or ():
        if key == METADATA_KEY:
            text = value.decode(errors="replace") if isinstance(value, bytes) else value
            if text.startswith(BEARER) and len(text) > len(BEARER):
                return text[len(BEARER):].encode()
    return None


def make_authorizer(settings: AuthSettings | None = None) -> Authorizer | None:
    """An Authorizer when auth is on (MAGNUS_AUTH_SERVICE_TOKEN set), else None."""
    settings = settings or AuthSettings()
    return Authorizer(settings) if settings.is_enabled else None


def bearer_metadata(secret: str) -> tuple[tuple[str, str], ...]:
    return ((METADATA_KEY, f"{BEARER}{secret}"),)


class _AddMetadata(
    grpc.aio.UnaryUnaryClientInterceptor, grpc.aio.UnaryStreamClientInterceptor
):
    """Adds the service credential to every outgoing call (works on insecure channels too)."""

    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self._metadata = metadata

    def _with_metadata(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata(*(details.metadata or ()), *self._metadata)
        return details._replace(metadata=metadata)

    async def intercept_unary_unary(self, continuation, client_call_details, request):
        return await continuation(self._with_metadata(client_call_details), request)

    async def intercept_unary_stream(self, continuation, client_call_details, request):
        return await continuation(self._with_metadata(client_call_details), request)


def service_credential_interceptors(settings: AuthSettings | None = None) -> list[_AddMetadata]:
    """Client interceptors that send this process's service token; none while auth is off."""
    settings = settings or AuthSettings()
    if not settings.is_enabled:
        return []
    return [_AddMetadata(bearer_metadata(settings.service_token.get_secret_value()))]
