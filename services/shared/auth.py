"""Who may call what: client API keys bound to tenants and one service credential, both sent as gRPC metadata.

Every call carries `authorization: Bearer <secret>`. A secret that equals the service token is a
SERVICE caller (the batcher, workers, the trainer); one whose SHA-256 is listed in
`MAGNUS_AUTH_API_KEYS` is a CLIENT of that entry's tenant. Clients may call the public API
(GenerationService) and read-only model/status RPCs; the internal RPCs that move work or change
models (INTERNAL_METHODS) need the service token, so an API-key holder gets PERMISSION_DENIED
there. A call without a known secret gets UNAUTHENTICATED. Health and reflection never ask
(Kubernetes probes carry no secret).

API keys are configured as `TENANT:sha256:HEX` entries: the services hold only digests, so a
leaked config or environment dump gives nobody a working client key. Make an entry with
`python -m services.shared.auth hash-key --tenant TENANT` (it prints the raw key once).

Off unless `MAGNUS_AUTH_SERVICE_TOKEN` is set, so `make run` needs no secrets. Secrets are
`SecretStr`: they never appear in reprs, logs or error messages.
"""

from __future__ import annotations

import argparse
import contextvars
import enum
import hashlib
import hmac
import re
import secrets
import sys
from dataclasses import dataclass

import grpc
from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.shared.errors import RpcError

METADATA_KEY = "authorization"
BEARER = "Bearer "
HASH_KEY_COMMAND = "python -m services.shared.auth hash-key --tenant TENANT"
# A tenant name in an API-key entry: also what prompt.tenant_id must then be (<= 64 bytes).
TENANT_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_HEX_SHA256 = re.compile(r"[0-9a-fA-F]{64}")

# Full method names that move work or change served models: service credential only.
INTERNAL_METHODS = frozenset(
    {
        "/magnus.v1.WorkerQueueService/RegisterWorker",
        "/magnus.v1.WorkerQueueService/PullBatch",
        "/magnus.v1.WorkerQueueService/CompleteBatch",
        "/magnus.v1.WorkerQueueService/CompleteBatches",
        "/magnus.v1.WorkerQueueService/ReportBatchFailure",
        "/magnus.v1.WorkerQueueService/Heartbeat",
        "/magnus.v1.WorkerQueueService/StreamTokens",
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


@dataclass(frozen=True)
class Caller:
    """Who an authenticated call comes from. `tenant` is the API key's tenant; None for SERVICE."""

    role: Role
    tenant: str | None = None


@dataclass(frozen=True)
class ApiKeyEntry:
    """One `TENANT:sha256:HEX` entry: the tenant and the SHA-256 digest (32 bytes) of its raw key."""

    tenant: str
    key_sha256: bytes


def hash_api_key(raw_key: str) -> bytes:
    return hashlib.sha256(raw_key.encode()).digest()


def api_key_entry(tenant: str, raw_key: str) -> str:
    """The MAGNUS_AUTH_API_KEYS entry for `raw_key` of `tenant`."""
    if not TENANT_PATTERN.fullmatch(tenant):
        raise ValueError(f"tenant {tenant!r} must be 1-64 characters of A-Z a-z 0-9 . _ - (not starting with . _ -)")
    return f"{tenant}:sha256:{hash_api_key(raw_key).hex()}"


def parse_api_key_entries(text: str) -> list[ApiKeyEntry]:
    """Parse comma-separated `TENANT:sha256:HEX` entries; raise ValueError naming the bad entry.

    Messages never quote an entry: a mistaken plain entry may be a raw key.
    """
    entries: list[ApiKeyEntry] = []
    owner_of: dict[bytes, tuple[int, str]] = {}
    for number, entry in enumerate((e.strip() for e in text.split(",") if e.strip()), start=1):
        tenant, scheme, digest = (entry.split(":", 2) + ["", ""])[:3]
        where = f"MAGNUS_AUTH_API_KEYS entry {number}"
        if scheme != "sha256":
            raise ValueError(
                f"{where} is not TENANT:sha256:HEX; plain API keys are refused (the services keep only "
                f"digests). Make an entry with `{HASH_KEY_COMMAND} --key <key>`"
            )
        if not TENANT_PATTERN.fullmatch(tenant):
            raise ValueError(f"{where}: tenant {tenant!r} must be 1-64 characters of A-Z a-z 0-9 . _ -")
        if not _HEX_SHA256.fullmatch(digest):
            raise ValueError(f"{where} (tenant {tenant!r}): the sha256 digest must be 64 hex digits")
        key_sha256 = bytes.fromhex(digest)
        if key_sha256 in owner_of and owner_of[key_sha256][1] != tenant:
            first, other = owner_of[key_sha256]
            raise ValueError(f"{where}: the same key is listed for tenants {other!r} (entry {first}) and {tenant!r}")
        owner_of.setdefault(key_sha256, (number, tenant))
        entries.append(ApiKeyEntry(tenant, key_sha256))
    return entries


class AuthSettings(BaseSettings):
    """Env prefix MAGNUS_AUTH_ (shared by every service)."""

    model_config = SettingsConfigDict(env_prefix="MAGNUS_AUTH_", extra="ignore")

    service_token: SecretStr = Field(
        SecretStr(""),
        description="Credential of the services themselves (internal RPCs). Empty = auth off everywhere.",
    )
    api_keys: SecretStr = Field(
        SecretStr(""),
        description="Comma-separated client keys as TENANT:sha256:HEX (HEX = SHA-256 of the raw key; make one with "
        "`python -m services.shared.auth hash-key --tenant T`). A key may call the public RPCs as its tenant only.",
    )

    @property
    def is_enabled(self) -> bool:
        return bool(self.service_token.get_secret_value())

    def api_key_entries(self) -> list[ApiKeyEntry]:
        return parse_api_key_entries(self.api_keys.get_secret_value())


class Authorizer:
    """Decides, per call, from the method name and the caller's metadata. Pure: no I/O."""

    def __init__(self, settings: AuthSettings) -> None:
        self._service_token = settings.service_token.get_secret_value().encode()
        self._entries = settings.api_key_entries()
        if self._service_token and any(
            hmac.compare_digest(e.key_sha256, hashlib.sha256(self._service_token).digest()) for e in self._entries
        ):
            raise ValueError("MAGNUS_AUTH_API_KEYS must not contain the service token")

    def identify(self, metadata: tuple[tuple[str, str | bytes], ...] | None) -> Caller | None:
        """The caller a bearer secret stands for, or None if it is missing or unknown."""
        secret = _bearer(metadata)
        if secret is None:
            return None
        # compare_digest against every candidate: timing reveals neither which key nor how much matched
        is_service = hmac.compare_digest(secret, self._service_token)
        digest = hashlib.sha256(secret).digest()
        matches = [hmac.compare_digest(digest, entry.key_sha256) for entry in self._entries]
        if is_service:
            return Caller(Role.SERVICE)
        for entry, is_match in zip(self._entries, matches):
            if is_match:
                return Caller(Role.CLIENT, entry.tenant)
        return None

    def role_of(self, metadata: tuple[tuple[str, str | bytes], ...] | None) -> Role | None:
        caller = self.identify(metadata)
        return caller.role if caller else None

    def check(self, method: str, metadata: tuple[tuple[str, str | bytes], ...] | None) -> Caller:
        """The caller of `method`, or raise Unauthenticated / PermissionDenied."""
        caller = self.identify(metadata)
        if caller is None:
            raise Unauthenticated(f"{method}: send '{METADATA_KEY}: Bearer <API key>' metadata")
        if method in INTERNAL_METHODS and caller.role is not Role.SERVICE:
            raise PermissionDenied(f"{method} is internal: an API key may not call it")
        return caller


# The authenticated caller of the RPC being handled; set by services.shared.rpc before the
# servicer runs (each grpc.aio RPC runs in its own task, so one call never sees another's).
# None while auth is off.
_CURRENT_CALLER: contextvars.ContextVar[Caller | None] = contextvars.ContextVar("magnus_caller", default=None)


def set_current_caller(caller: Caller | None) -> None:
    _CURRENT_CALLER.set(caller)


def current_caller() -> Caller | None:
    """The caller of the RPC this task is handling; None while auth is off."""
    return _CURRENT_CALLER.get()


def tenant_for(requested_tenant: str, caller: Caller | None) -> str:
    """The tenant a request is accounted to (quotas, idempotency keys).

    An API key acts for its own tenant only: an empty `requested_tenant` means that tenant, another
    one is refused. With auth off (caller None) or for the service credential, the request's
    tenant_id is taken as sent: nothing is known about the caller to check it against.
    """
    if caller is None or caller.tenant is None:
        return requested_tenant
    if requested_tenant and requested_tenant != caller.tenant:
        raise PermissionDenied(
            f"prompt.tenant_id: this API key belongs to tenant {caller.tenant!r}; it may not act for "
            f"{requested_tenant[:64]!r} (leave tenant_id empty or send {caller.tenant!r})"
        )
    return caller.tenant


def _bearer(metadata: tuple[tuple[str, str | bytes], ...] | None) -> bytes | None:
    for key, value in metadata or ():
        if key == METADATA_KEY:
            text = value.decode(errors="replace") if isinstance(value, bytes) else value
            if text.startswith(BEARER) and len(text) > len(BEARER):
                return text[len(BEARER):].encode()
    return None


def make_authorizer(settings: AuthSettings | None = None) -> Authorizer | None:
    """An Authorizer when auth is on (MAGNUS_AUTH_SERVICE_TOKEN set), else None.

    Raises ValueError on malformed API-key entries, and on API keys without a service token: that
    would silently run with auth off while the operator believes clients need a key.
    """
    settings = settings or AuthSettings()
    if not settings.is_enabled:
        if settings.api_key_entries():
            raise ValueError(
                "MAGNUS_AUTH_API_KEYS is set but MAGNUS_AUTH_SERVICE_TOKEN is empty, which turns auth off: "
                "set the service token too (or unset the API keys)"
            )
        return None
    return Authorizer(settings)


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.shared.auth", description="Magnus auth helpers.")
    commands = parser.add_subparsers(dest="command", required=True)
    hash_key = commands.add_parser(
        "hash-key", help="print a client API key and its MAGNUS_AUTH_API_KEYS entry (TENANT:sha256:HEX)"
    )
    hash_key.add_argument("--tenant", required=True, help="tenant the key acts for")
    hash_key.add_argument(
        "--key", help="an existing raw key to hash ('-' reads it from stdin); default: generate a new one"
    )
    args = parser.parse_args(argv)
    raw_key = args.key
    if raw_key == "-":
        raw_key = sys.stdin.readline().strip()
    if raw_key is None:
        raw_key = secrets.token_urlsafe(32)  # 256 random bits
    if not raw_key:
        parser.error("the key must not be empty")
    try:
        entry = api_key_entry(args.tenant, raw_key)
    except ValueError as error:
        parser.error(str(error))
    print(f"api key (give it to the client; the services never store it): {raw_key}")
    print(f"MAGNUS_AUTH_API_KEYS entry: {entry}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
