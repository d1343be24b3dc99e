"""ModelAdminService for every model-serving replica (predictor, estimator), and its start-up loop.

`ModelAdminServicer` loads a stored version beside the serving one and swaps it in (see
`ModelSlot`); `load_until_ready` keeps trying to load a first model at start-up, logging each
distinct reason once instead of a stack trace every few seconds.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable

from google.protobuf.timestamp_pb2 import Timestamp

from magnus.v1 import model_admin_pb2
from services.shared.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from services.shared.model_store import (
    LoadedModel,
    ModelSlot,
    ModelStore,
    ModelStoreError,
    VersionInfo,
    VersionNotFound,
)

log = logging.getLogger(__name__)

OnLoaded = Callable[[LoadedModel], Awaitable[None]]


def model_info_to_proto(info: VersionInfo) -> model_admin_pb2.ModelInfo:
    """The wire form of a version row (metrics as a JSON string)."""
    message = model_admin_pb2.ModelInfo(
        kind=info.kind,
        version=info.version,
        artifact_uri=info.artifact_uri,
        sha256=info.sha256,
        num_train_samples=info.num_train_samples,
        metrics_json=json.dumps(info.metrics, sort_keys=True),
        model_name=info.model_name,
    )
    if info.created_at is not None:
        timestamp = Timestamp()
        timestamp.FromDatetime(info.created_at)
        message.created_at.CopyFrom(timestamp)
    return message


class ModelAdminServicer:
    """LoadModel / GetModelInfo over one `ModelSlot`. `on_loaded` runs after each swap."""

    def __init__(self, slot: ModelSlot, store: ModelStore, on_loaded: OnLoaded | None = None) -> None:
        self.slot = slot
        self.store = store
        self.on_loaded = on_loaded

    async def LoadModel(self, request, context) -> model_admin_pb2.LoadModelResponse:
        if request.version < 0:
            raise InvalidArgument("version", f"must be >= 0 (0 = latest pushed), got {request.version}")
        version = request.version or None
        try:
            # 0 means the latest *pushed* version: a candidate the trainer rejected is stored
            # too, but must not be served by someone asking for "the latest".
            loaded = await self.slot.load_and_swap(self.store, version, only_pushed=version is None)
        except VersionNotFound as error:
            raise NotFound(str(error)) from error
        except ModelStoreError as error:
            raise FailedPrecondition(f"cannot load {self.slot.kind}: {error}") from error
        if self.on_loaded is not None:
            await self.on_loaded(loaded)
        return model_admin_pb2.LoadModelResponse(model=model_info_to_proto(loaded.info))

    async def GetModelInfo(self, request, context) -> model_admin_pb2.GetModelInfoResponse:
        loaded = self.slot.current
        if loaded is None:
            raise Unavailable(f"no {self.slot.kind} model loaded yet")
        return model_admin_pb2.GetModelInfoResponse(model=model_info_to_proto(loaded.info))


FirstModelSource = Callable[[], Awaitable[bool]]


async def load_until_ready(
    slot: ModelSlot,
    store: ModelStore,
    *,
    retry_s: float,
    on_loaded: OnLoaded,
    create_first: FirstModelSource | None = None,
    missing_hint: str = "",
) -> LoadedModel:
    """Load the latest pushed version into `slot`, retrying every `retry_s` seconds until it works.

    When no version exists, `create_first` (if given) may create one (the estimator fits v1 from
    calibration samples) and returns True if it did; `missing_hint` tells the operator what to do. Returns early if something else (LoadModel)
    filled the slot meanwhile. Each distinct failure reason is logged once, without a traceback:
    these are operator problems (run the bootstrap), not bugs.
    """
    last_reason = ""
    while True:
        if slot.current is not None:
            return slot.current
        try:
            loaded = await slot.load_and_swap(store, only_pushed=True, only_if_empty=True)
            await on_loaded(loaded)
            return loaded
        except VersionNotFound as error:
            reason = f"{error}{missing_hint}"
            if create_first is not None and await _try_create_first(create_first, slot.kind):
                continue
        except ModelStoreError as error:
            reason = str(error)
        except Exception as error:  # noqa: BLE001 - e.g. the DB is down or not migrated yet
            reason = one_line_reason(error)
        if reason != last_reason:
            log.warning(
                "%s NOT_SERVING: %s (retrying every %.0f s)", slot.kind, reason, retry_s
            )
            last_reason = reason
        await asyncio.sleep(retry_s)


def one_line_reason(error: Exception) -> str:
    """`Type: first line` of an error; SQLAlchemy errors carry the driver's error in `orig`."""
    cause = getattr(error, "orig", None) or error
    lines = str(cause).strip().splitlines()
    reason = f"{type(cause).__name__}: {lines[0] if lines else ''}"
    if "no such table" in reason or "does not exist" in reason:
        reason += " (is the log DB migrated? `python -m services.shared.db upgrade`)"
    return reason


async def _try_create_first(create_first: FirstModelSource, kind: str) -> bool:
    try:
        return await create_first()
    except Exception as error:  # noqa: BLE001 - logged by the caller's retry loop next time
        log.warning("%s: could not create a first model: %s", kind, one_line_reason(error))
        return False
