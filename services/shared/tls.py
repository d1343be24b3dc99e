"""TLS and mutual TLS for every gRPC server and channel, switched on in settings.

Env prefix MAGNUS_TLS_ (shared by every service). With `cert_file` and `key_file` set, servers
listen with TLS only (a plaintext client cannot connect) and channels verify the peer against
`ca_file`. With `require_client_cert` as well, servers demand a client certificate signed by
`ca_file` (mutual TLS) and channels present `cert_file`/`key_file`. Off by default.
"""

from __future__ import annotations

from pathlib import Path

import grpc
from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class TlsSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MAGNUS_TLS_", extra="ignore")

    cert_file: Path | None = Field(None, description="PEM certificate of this process (server and mTLS client).")
    key_file: Path | None = Field(None, description="PEM private key of cert_file.")
    ca_file: Path | None = Field(None, description="PEM CA bundle that signs the peers' certificates.")
    require_client_cert: bool = Field(False, description="Servers demand client certificates (mutual TLS).")
    server_name: str = Field("", description="Name to verify in server certificates when it differs from the target host.")

    @model_validator(mode="after")
    def _complete(self) -> TlsSettings:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("MAGNUS_TLS_CERT_FILE and MAGNUS_TLS_KEY_FILE are set together")
        if self.require_client_cert and (self.ca_file is None or self.cert_file is None):
            raise ValueError("mutual TLS needs MAGNUS_TLS_CA_FILE, MAGNUS_TLS_CERT_FILE and MAGNUS_TLS_KEY_FILE")
        return self

    @property
    def is_enabled(self) -> bool:
        return self.cert_file is not None


def server_credentials(settings: TlsSettings) -> grpc.ServerCredentials | None:
    """TLS credentials for a server port, or None (plaintext) when TLS is off."""
    if not settings.is_enabled:
        return None
    pair = (settings.key_file.read_bytes(), settings.cert_file.read_bytes())
    ca = settings.ca_file.read_bytes() if settings.ca_file else None
    return grpc.ssl_server_credentials(
        [pair], root_certificates=ca, require_client_auth=settings.require_client_cert
    )


def channel_credentials(settings: TlsSettings) -> grpc.ChannelCredentials | None:
    """TLS credentials for a channel (with this process's certificate for mTLS), or None."""
    if not settings.is_enabled and settings.ca_file is None:
        return None
    ca = settings.ca_file.read_bytes() if settings.ca_file else None
    if settings.cert_file is not None:
        return grpc.ssl_channel_credentials(ca, settings.key_file.read_bytes(), settings.cert_file.read_bytes())
    return grpc.ssl_channel_credentials(ca)
