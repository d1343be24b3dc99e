"""Pushing a stored version to replicas through ModelAdminService.LoadModel."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import grpc

from magnus.v1 import model_admin_pb2, model_admin_pb2_grpc
from services.shared.channels import open_channel

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class PushOutcome:
    target: str
    is_ok: bool
    detail: str


async def push_one(target: str, kind: str, version: int, timeout_s: float) -> PushOutcome:
    """LoadModel(version) on one replica; an unreachable or failing replica is logged, not raised."""
    async with open_channel(target) as channel:
        stub = model_admin_pb2_grpc.ModelAdminServiceStub(channel)
        try:
            response = await stub.LoadModel(model_admin_pb2.LoadModelRequest(version=version), timeout=timeout_s)
        except grpc.aio.AioRpcError as error:
            detail = f"{error.code().name}: {error.details()}"
            log.warning("push of %s v%d to %s failed: %s", kind, version, target, detail)
            return PushOutcome(target=target, is_ok=False, detail=detail)
    if response.model.version != version or response.model.kind != kind:
        detail = f"replica reports {response.model.kind} v{response.model.version}"
        log.warning("push of %s v%d to %s: %s", kind, version, target, detail)
        return PushOutcome(target=target, is_ok=False, detail=detail)
    log.info("pushed %s v%d to %s", kind, version, target)
    return PushOutcome(target=target, is_ok=True, detail="ok")


async def push_to_all(targets: list[str], kind: str, version: int, timeout_s: float) -> list[PushOutcome]:
    """Push to every target concurrently; one outcome per target, in order."""
    return list(await asyncio.gather(*(push_one(t, kind, version, timeout_s) for t in targets)))


async def serving_version(target: str, timeout_s: float) -> int | None:
    """The version a replica serves now; None if it has none yet or cannot be reached."""
    async with open_channel(target) as channel:
        stub = model_admin_pb2_grpc.ModelAdminServiceStub(channel)
        try:
            response = await stub.GetModelInfo(model_admin_pb2.GetModelInfoRequest(), timeout=timeout_s)
        except grpc.aio.AioRpcError:
            return None
    return response.model.version


async def catch_up(targets: list[str], kind: str, version: int, timeout_s: float) -> list[PushOutcome]:
    """Push `version` to the replicas that serve an older one; one outcome per replica pushed to.

    A replica misses a push when it was unreachable at the time, or when the trainer died between
    storing a version and pushing it. Replicas with no model yet load the latest pushed version
    by themselves, and one serving a newer version (loaded by hand) is left alone.
    """
    versions = await asyncio.gather(*(serving_version(t, timeout_s) for t in targets))
    behind = [t for t, v in zip(targets, versions, strict=True) if v is not None and v < version]
    for target, serving in zip(targets, versions, strict=True):
        if target in behind:
            log.warning("%s replica %s serves v%d, latest pushed is v%d: pushing it", kind, target, serving, version)
    return list(await asyncio.gather(*(push_one(t, kind, version, timeout_s) for t in behind)))


def summarize(outcomes: list[PushOutcome]) -> str:
    if not outcomes:
        return "no replicas configured"
    failed = [f"{o.target} ({o.detail})" for o in outcomes if not o.is_ok]
    text = f"pushed to {len(outcomes) - len(failed)}/{len(outcomes)} replicas"
    return f"{text}; failed: {', '.join(failed)}" if failed else text
