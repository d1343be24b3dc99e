"""Pushing a stored version to replicas through ModelAdminService.LoadModel."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import grpc

from magnus.v1 import model_admin_pb2, model_admin_pb2_grpc
from services.shared.channels import open_channel

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
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
            return PushOutcome(target, False, detail)
    if response.model.version != version or response.model.kind != kind:
        detail = f"replica reports {response.model.kind} v{response.model.version}"
        log.warning("push of %s v%d to %s: %s", kind, version, target, detail)
        return PushOutcome(target, False, detail)
    log.info("pushed %s v%d to %s", kind, version, target)
    return PushOutcome(target, True, "ok")


async def push_to_all(targets: list[str], kind: str, version: int, timeout_s: float) -> list[PushOutcome]:
    """Push to every target concurrently; one outcome per target, in order."""
    return list(await asyncio.gather(*(push_one(t, kind, version, timeout_s) for t in targets)))


def summarize(outcomes: list[PushOutcome]) -> str:
    if not outcomes:
        return "no replicas configured"
    failed = [f"{o.target} ({o.detail})" for o in outcomes if not o.is_ok]
    text = f"pushed to {len(outcomes) - len(failed)}/{len(outcomes)} replicas"
    return f"{text}; failed: {', '.join(failed)}" if failed else text
