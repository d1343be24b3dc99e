"""One training round per model kind, and the trainer state that survives restarts.

A round: read log rows after the kind's watermark -> select new samples (pure rules: bad misses,
and every row of an instruction the latest version has few samples of) -> refit on
the latest stored version's samples + the new ones -> score candidate and serving model on the
held-back rows -> store the version and advance the watermark in ONE transaction (so a crash or
restart never adds the same rows twice) -> push to the replicas unless it is measurably worse.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import asdict, dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

import numpy as np

from services.shared.db.models import ModelKind, utc_now
from services.shared.db.queries import get_state, set_state
from services.shared.model_store import LoadedModel, ModelStore, ModelStoreError, VersionNotFound
from services.trainer import metrics
from services.trainer.config import TrainerSettings
from services.trainer.push import catch_up, push_to_all, summarize
from services.trainer.selection import keep_newest, should_push
from services.trainer.specs import ModelSpec, make_specs

log = logging.getLogger(__name__)


class RoundOutcome(StrEnum):
    """How a round ended (stored in the trainer state by value; the `outcome` metric label)."""

    TRAINED = "trained"
    NO_NEW_ROWS = "no_new_rows"
    NO_BAD_MISSES = "no_bad_misses"
    FAILED = "failed"


@dataclass(frozen=True)
class RoundResult:
    """What one round did; `new_version` is 0 when nothing was trained."""

    kind: ModelKind
    finished_at: datetime
    num_samples_added: int = 0
    new_version: int = 0
    is_pushed: bool = False
    note: str = ""
    outcome: RoundOutcome = RoundOutcome.TRAINED
    candidate_error: float | None = None  # the spec's error_metric on held-back rows; None = none held back

    def to_state(self) -> dict[str, Any]:
        return {**asdict(self), "finished_at": self.finished_at.isoformat()}

    @classmethod
    def from_state(cls, value: dict[str, Any]) -> RoundResult:
        outcome = RoundOutcome(value.get("outcome", RoundOutcome.TRAINED))
        finished_at = datetime.fromisoformat(value["finished_at"])
        return cls(**{**value, "kind": ModelKind(value["kind"]), "finished_at": finished_at, "outcome": outcome})


def watermark_key(kind: str) -> str:
    return f"watermark:{kind}"


def last_round_key(kind: str) -> str:
    return f"last_round:{kind}"


@dataclass(frozen=True)
class Scores:
    """Both models' metrics on the held-back rows, and their per-row errors (None: nothing to compare)."""

    candidate: dict[str, float]
    serving: dict[str, float] | None
    candidate_errors: np.ndarray | None = None
    serving_errors: np.ndarray | None = None


class Trainer:
    """Runs rounds (one at a time per kind) against one log DB and model store."""

    def __init__(self, settings: TrainerSettings, store: ModelStore) -> None:
        self.settings = settings
        self.store = store
        self.specs = make_specs(settings)
        self.last_rounds: dict[str, RoundResult] = {}
        self._locks = {kind: asyncio.Lock() for kind in self.specs}
        metrics.declare_kinds(self.kinds, outcomes=list(RoundOutcome))

    @property
    def kinds(self) -> list[str]:
        return list(self.specs)

    async def load_last_rounds(self) -> None:
        async with self.store.session_factory() as session:
            for kind in self.specs:
                value = await get_state(session, last_round_key(kind))
                if value is not None:
                    self.last_rounds[kind] = RoundResult.from_state(value)

    async def run_round(self, kind: str) -> RoundResult:
        """Run one round of `kind` now (waiting for a running one of the same kind)."""
        spec = self.specs[kind]
        async with self._locks[kind]:
            started_s = time.monotonic()
            await self._catch_up_replicas(kind)
            try:
                result = await self._round(spec)
            except ModelStoreError as error:
                # e.g. the base artifact is gone: keep the watermark, so nothing is lost.
                log.warning("%s round failed: %s", kind, error)
                result = RoundResult(kind, utc_now(), note=f"failed: {error}", outcome=RoundOutcome.FAILED)
            except Exception:
                metrics.observe_round(kind, RoundOutcome.FAILED, time.monotonic() - started_s)
                raise
            is_trained = result.outcome == RoundOutcome.TRAINED
            metrics.observe_round(
                kind, result.outcome, time.monotonic() - started_s, num_samples_added=result.num_samples_added,
                is_pushed=result.is_pushed if is_trained else None, error_metric=spec.error_metric,
                candidate_error=result.candidate_error,
            )
            log.info(
                "%s round: +%d samples, version %s, pushed=%s (%s)",
                kind, result.num_samples_added, result.new_version or "-", result.is_pushed, result.note,
            )
            self.last_rounds[kind] = result
            async with self.store.session_factory() as session, session.begin():
                await set_state(session, last_round_key(kind), result.to_state())
            return result

    async def _catch_up_replicas(self, kind: str) -> None:
        """Before each round, bring replicas that missed a push up to the latest pushed version."""
        targets = self.settings.targets(kind)
        if not targets:
            return
        try:
            latest = await self.store.find(kind, only_pushed=True)
        except VersionNotFound:
            return
        await catch_up(targets, kind, latest.version, self.settings.push_timeout_s)

    async def _round(self, spec: ModelSpec) -> RoundResult:
        kind = spec.kind
        async with self.store.session_factory() as session:
            since_seq = int(((await get_state(session, watermark_key(kind))) or {}).get("seq", 0))
            rows = await spec.fetch(session, since_seq, self.settings.max_rows_per_round)
        if not rows:
            return RoundResult(kind, utc_now(), note="no new log rows", outcome=RoundOutcome.NO_NEW_ROWS)
        last_seq = rows[-1].seq
        base = await self._load_or_none(kind, only_pushed=False)
        new_samples = spec.select(rows, base.model.samples if base is not None else [])
        if not new_samples:
            async with self.store.session_factory() as session, session.begin():
                await set_state(session, watermark_key(kind), {"seq": last_seq})
            note = f"no bad misses among {len(rows)} new log rows"
            return RoundResult(kind, utc_now(), note=note, outcome=RoundOutcome.NO_BAD_MISSES)
        return await self._train(spec, base, new_samples, last_seq)

    async def _train(self, spec: ModelSpec, base: LoadedModel | None, new_samples: list, last_seq: int) -> RoundResult:
        kind = spec.kind
        serving = base if base is not None and base.info.is_pushed else await self._load_or_none(kind, only_pushed=True)
        holdout = spec.holdout(await self._recent_rows(spec, last_seq))
        base_samples = base.model.samples if base is not None else []
        training = keep_newest(spec.merge(base_samples, new_samples), self.settings.max_train_samples)
        candidate, scores = await asyncio.to_thread(
            self._fit_and_score, spec, base.model if base else None, training, serving, holdout
        )
        candidate_error = scores.candidate.get(spec.error_metric) if holdout else None
        serving_error = scores.serving.get(spec.error_metric) if scores.serving and holdout else None
        is_pushed = should_push(
            scores.candidate_errors, scores.serving_errors, self.settings.push_tolerance_rel, self.settings.push_noise_z
        )
        note = _decision_note(spec.error_metric, candidate_error, serving_error, serving, is_pushed)
        metrics = {
            **scores.candidate,
            "serving": scores.serving,
            "serving_version": serving.info.version if serving else None,
            "base_version": base.info.version if base else None,
            "num_samples_added": len(new_samples),
            "log_seq_through": last_seq,
        }
        async with self.store.session_factory() as session, session.begin():
            info = await self.store.save_in(
                session, kind, candidate, model_name=candidate.name, num_train_samples=len(training),
                metrics=metrics, is_pushed=is_pushed, note=note,
            )
            await set_state(session, watermark_key(kind), {"seq": last_seq})
        if is_pushed:
            outcomes = await push_to_all(self.settings.targets(kind), kind, info.version, self.settings.push_timeout_s)
            note = f"{note}; {summarize(outcomes)}"
            await self.store.mark_pushed(kind, info.version, is_pushed=True, note=note)
        else:
            log.warning("%s v%d not pushed: %s", kind, info.version, note)
        return RoundResult(
            kind, utc_now(), len(new_samples), info.version, is_pushed, note, candidate_error=candidate_error
        )

    @staticmethod
    def _fit_and_score(
        spec: ModelSpec, base_model: Any, training: list, serving: LoadedModel | None, holdout: list
    ) -> tuple[Any, Scores]:
        candidate = spec.fit(base_model, training)
        if not holdout:
            return candidate, Scores({}, None)
        candidate_scores = spec.evaluate(candidate, holdout)
        if serving is None:
            return candidate, Scores(candidate_scores, None)
        return candidate, Scores(
            candidate_scores, spec.evaluate(serving.model, holdout),
            spec.row_errors(candidate, holdout), spec.row_errors(serving.model, holdout),
        )

    async def _recent_rows(self, spec: ModelSpec, last_seq: int) -> list:
        since_seq = max(0, last_seq - self.settings.validation_window_rows)
        async with self.store.session_factory() as session:
            return await spec.fetch(session, since_seq, self.settings.validation_window_rows)

    async def _load_or_none(self, kind: str, *, only_pushed: bool) -> LoadedModel | None:
        try:
            return await self.store.load(kind, only_pushed=only_pushed)
        except VersionNotFound:
            return None


def _decision_note(
    metric: str, candidate: float | None, serving: float | None, serving_model: LoadedModel | None, is_pushed: bool
) -> str:
    if serving_model is None:
        return "no serving version to compare with"
    if candidate is None or serving is None:
        return "no held-back rows to validate on"
    if not is_pushed:
        verdict = "worse than"
    else:
        verdict = "not worse than" if candidate <= serving else "within the held-back rows' noise of"
    return f"candidate {metric} {candidate:.3f} {verdict} serving v{serving_model.info.version} {serving:.3f}"
