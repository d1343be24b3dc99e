"""Versioned model artifacts: joblib files under a store folder, registered in `model_versions`.

Shared by the predictor and estimator (which load and serve a version) and the trainer (which
fits and saves new ones). An artifact is a joblib file holding `{"format", "kind", "model_name",
"model"}`; its sha256 is kept in the DB row, and loading verifies it, so a truncated or replaced
file is refused instead of served. (joblib is pickle: the store folder must only be writable by
the trainer, as with any pickled model.)

`ModelSlot` holds the serving model. A new version is loaded fully beside the old one and then
one reference is swapped, so an in-flight request keeps the object it grabbed.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import joblib
from pydantic import AliasChoices, Field
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.shared.db.models import ModelVersion
from services.shared.db.queries import add_model_version
from services.shared.errors import Unavailable
from services.shared.settings import VAR_DIR

log = logging.getLogger(__name__)

ARTIFACT_FORMAT = 1
DEFAULT_STORE_DIR = VAR_DIR / "model-store"


def model_store_dir_field() -> Any:
    """Settings field shared by predictor, estimator and trainer: they must agree on the folder.

    Read from `MAGNUS_MODEL_STORE_DIR` (no service prefix) or the field name.
    """
    return Field(
        DEFAULT_STORE_DIR,
        validation_alias=AliasChoices("MAGNUS_MODEL_STORE_DIR", "model_store_dir"),
        description="Folder holding model artifacts as <kind>/v<N>.joblib (env MAGNUS_MODEL_STORE_DIR).",
    )


class ModelStoreError(Exception):
    """A version cannot be found or loaded; the message says which and why."""


class VersionNotFound(ModelStoreError):
    pass


class ArtifactMissing(ModelStoreError):
    pass


class ArtifactCorrupt(ModelStoreError):
    pass


@dataclass(frozen=True)
class VersionInfo:
    """One `model_versions` row, detached from the DB session."""

    kind: str
    version: int
    artifact_uri: str
    sha256: str
    num_train_samples: int
    metrics: dict[str, Any] = field(default_factory=dict)
    is_pushed: bool = False
    note: str | None = None
    created_at: datetime | None = None

    @property
    def model_name(self) -> str:
        return str(self.metrics.get("model_name", ""))

    @classmethod
    def from_row(cls, row: ModelVersion) -> VersionInfo:
        return cls(
            kind=row.kind,
            version=row.version,
            artifact_uri=row.artifact_uri,
            sha256=row.sha256,
            num_train_samples=row.num_train_samples,
            metrics=dict(row.metrics or {}),
            is_pushed=bool(row.is_pushed),
            note=row.note,
            created_at=row.created_at,
        )


@dataclass(frozen=True)
class LoadedModel:
    """A model object and the version it came from. Never mutated once serving."""

    info: VersionInfo
    model: Any


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_artifact(path: Path, kind: str, model_name: str, model: Any) -> str:
    """Write `model` to `path` atomically (temp file + rename); return its sha256 (hex)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    payload = {"format": ARTIFACT_FORMAT, "kind": kind, "model_name": model_name, "model": model}
    try:
        joblib.dump(payload, tmp_path)
        sha256 = sha256_file(tmp_path)
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)
    return sha256


def read_artifact(path: Path, kind: str, expected_sha256: str) -> Any:
    """Load the model stored at `path`; raise ArtifactMissing / ArtifactCorrupt with the reason."""
    if not path.is_file():
        raise ArtifactMissing(f"artifact {path} does not exist")
    actual = sha256_file(path)
    if actual != expected_sha256:
        raise ArtifactCorrupt(
            f"artifact {path} has sha256 {actual[:12]}..., the DB expects {expected_sha256[:12]}..."
        )
    try:
        payload = joblib.load(path)
    except Exception as error:  # noqa: BLE001 - any unpickling failure means a bad artifact
        raise ArtifactCorrupt(f"artifact {path} could not be read: {type(error).__name__}: {error}")
    if not isinstance(payload, dict) or payload.get("format") != ARTIFACT_FORMAT:
        raise ArtifactCorrupt(f"artifact {path} is not a Magnus artifact of format {ARTIFACT_FORMAT}")
    if payload.get("kind") != kind:
        raise ArtifactCorrupt(f"artifact {path} holds a {payload.get('kind')!r} model, not {kind!r}")
    return payload["model"]


class ModelStore:
    """Saves and loads versioned artifacts of one store folder and one log DB."""

    def __init__(self, store_dir: Path, session_factory: async_sessionmaker[AsyncSession]) -> None:
        self.store_dir = Path(store_dir)
        self.session_factory = session_factory

    def artifact_path(self, kind: str, version: int) -> Path:
        return (self.store_dir / kind / f"v{version}.joblib").resolve()

    def resolve(self, artifact_uri: str) -> Path:
        """Absolute URIs are used as they are; relative ones are taken from the store folder."""
        path = Path(artifact_uri.removeprefix("file://"))
        return path if path.is_absolute() else self.store_dir / path

    async def save(self, kind: str, model: Any, **fields: Any) -> VersionInfo:
        """Store `model` as the next version of `kind` in its own transaction. See `save_in`."""
        async with self.session_factory() as session, session.begin():
            return await self.save_in(session, kind, model, **fields)

    async def save_in(
        self,
        session: AsyncSession,
        kind: str,
        model: Any,
        *,
        model_name: str,
        num_train_samples: int,
        metrics: dict[str, Any] | None = None,
        is_pushed: bool = False,
        note: str | None = None,
    ) -> VersionInfo:
        """Write the artifact and add its row inside the caller's transaction.

        The version number is allocated first, so the file is written straight to v<N>; if the
        transaction then fails, the orphan file is overwritten by the next save of number N.
        `metrics` gets `model_name` added, since the row has no column of its own for it.
        """
        row = await add_model_version(
            session,
            kind=kind,
            artifact_uri="",
            sha256="",
            num_train_samples=num_train_samples,
            metrics={**(metrics or {}), "model_name": model_name},
            is_pushed=is_pushed,
            note=note,
        )
        path = self.artifact_path(kind, row.version)
        row.sha256 = await asyncio.to_thread(write_artifact, path, kind, model_name, model)
        row.artifact_uri = str(path)
        await session.flush()
        log.info("stored %s v%d (%d samples) at %s", kind, row.version, num_train_samples, path)
        return VersionInfo.from_row(row)

    async def find(self, kind: str, version: int | None = None, *, only_pushed: bool = False) -> VersionInfo:
        """Version `version` of `kind`, or the newest (pushed, if `only_pushed`) when None."""
        query = select(ModelVersion).where(ModelVersion.kind == kind)
        if version is not None:
            query = query.where(ModelVersion.version == version)
        elif only_pushed:
            query = query.where(ModelVersion.is_pushed.is_(True))
        query = query.order_by(ModelVersion.version.desc()).limit(1)
        async with self.session_factory() as session:
            row = await session.scalar(query)
        if row is None:
            if version is not None:
                raise VersionNotFound(f"no {kind} version {version} in the log DB")
            raise VersionNotFound(f"no {'pushed ' if only_pushed else ''}{kind} version in the log DB")
        return VersionInfo.from_row(row)

    async def load(self, kind: str, version: int | None = None, *, only_pushed: bool = False) -> LoadedModel:
        """Find a version (see `find`) and load its artifact off the event loop."""
        info = await self.find(kind, version, only_pushed=only_pushed)
        path = self.resolve(info.artifact_uri)
        model = await asyncio.to_thread(read_artifact, path, kind, info.sha256)
        return LoadedModel(info=info, model=model)

    async def mark_pushed(self, kind: str, version: int, *, is_pushed: bool, note: str | None) -> None:
        async with self.session_factory() as session, session.begin():
            await session.execute(
                update(ModelVersion)
                .where(ModelVersion.kind == kind, ModelVersion.version == version)
                .values(is_pushed=is_pushed, note=note)
            )


class ModelSlot:
    """The model a replica serves now. Readers take `current` once per request and keep it."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._loaded: LoadedModel | None = None
        # Serialises loads so two LoadModel calls cannot interleave their swaps out of order.
        self.load_lock = asyncio.Lock()

    @property
    def current(self) -> LoadedModel | None:
        return self._loaded

    def require(self) -> LoadedModel:
        """The serving model, or Unavailable while none is loaded."""
        loaded = self._loaded
        if loaded is None:
            raise Unavailable(f"no {self.kind} model loaded yet")
        return loaded

    def swap(self, new: LoadedModel) -> LoadedModel | None:
        """Make `new` the serving model (one reference assignment); return the old one."""
        if new.info.kind != self.kind:
            raise ValueError(f"slot for {self.kind!r} cannot serve a {new.info.kind!r} model")
        old, self._loaded = self._loaded, new
        return old

    async def load_and_swap(
        self,
        store: ModelStore,
        version: int | None = None,
        *,
        only_pushed: bool = False,
        only_if_empty: bool = False,
    ) -> LoadedModel:
        """Load a version fully, then swap it in. The old model serves until the swap.

        `only_if_empty` (the start-up loader) keeps a model that a LoadModel call put in first.
        """
        async with self.load_lock:
            if only_if_empty and self._loaded is not None:
                return self._loaded
            new = await store.load(self.kind, version, only_pushed=only_pushed)
            old = self.swap(new)
        if old is None or old.info.version != new.info.version:
            log.info(
                "%s model v%d now serving (was %s)",
                self.kind,
                new.info.version,
                f"v{old.info.version}" if old else "none",
            )
        return new
