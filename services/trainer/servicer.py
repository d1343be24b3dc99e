"""TrainerService: Retrain runs rounds now; GetStatus shows latest versions and last rounds."""

from __future__ import annotations

from google.protobuf.timestamp_pb2 import Timestamp

from magnus.v1 import trainer_pb2
from services.shared.db.models import ModelKind
from services.shared.errors import InvalidArgument
from services.shared.model_admin import model_info_to_proto
from services.shared.model_store import VersionNotFound
from services.trainer.rounds import RoundResult, Trainer

KINDS_BY_ENUM = {
    trainer_pb2.MODEL_KIND_UNSPECIFIED: (ModelKind.PREDICTOR, ModelKind.ESTIMATOR),
    trainer_pb2.MODEL_KIND_PREDICTOR: (ModelKind.PREDICTOR,),
    trainer_pb2.MODEL_KIND_ESTIMATOR: (ModelKind.ESTIMATOR,),
}


def round_to_proto(result: RoundResult) -> trainer_pb2.TrainingRound:
    finished_at = Timestamp()
    finished_at.FromDatetime(result.finished_at)
    return trainer_pb2.TrainingRound(
        kind=result.kind,
        finished_at=finished_at,
        num_samples_added=result.num_samples_added,
        new_version=result.new_version,
        is_pushed=result.is_pushed,
        note=result.note,
    )


class TrainerServicer:
    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer

    async def Retrain(self, request, context) -> trainer_pb2.RetrainResponse:
        kinds = KINDS_BY_ENUM.get(request.kind)
        if kinds is None:
            raise InvalidArgument("kind", f"unknown model kind {request.kind}")
        rounds = [await self.trainer.run_round(kind) for kind in kinds]
        return trainer_pb2.RetrainResponse(rounds=[round_to_proto(r) for r in rounds])

    async def GetStatus(self, request, context) -> trainer_pb2.GetStatusResponse:
        response = trainer_pb2.GetStatusResponse()
        for kind in self.trainer.kinds:
            try:
                info = await self.trainer.store.find(kind)
            except VersionNotFound:
                continue
            response.latest_models.append(model_info_to_proto(info))
        for kind in self.trainer.kinds:
            if kind in self.trainer.last_rounds:
                response.last_rounds.append(round_to_proto(self.trainer.last_rounds[kind]))
        return response
