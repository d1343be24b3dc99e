"""`python -m services.trainer.cli retrain|status [--kind K] [--target host:port]`."""

from __future__ import annotations

import argparse
import asyncio
import sys

import grpc

from magnus.v1 import trainer_pb2, trainer_pb2_grpc
from services.shared.channels import open_channel

KIND_ENUMS = {
    "both": trainer_pb2.MODEL_KIND_UNSPECIFIED,
    "predictor": trainer_pb2.MODEL_KIND_PREDICTOR,
    "estimator": trainer_pb2.MODEL_KIND_ESTIMATOR,
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m services.trainer.cli", description="Talk to the trainer.")
    parser.add_argument("command", choices=("retrain", "status"))
    parser.add_argument("--kind", choices=sorted(KIND_ENUMS), default="both", help="for retrain")
    parser.add_argument("--target", default="127.0.0.1:50054", help="trainer address, host:port")
    parser.add_argument("--timeout-s", type=float, default=600.0, help="RPC deadline, seconds")
    return parser.parse_args(argv)


def format_round(r: trainer_pb2.TrainingRound) -> str:
    version = f"v{r.new_version}" if r.new_version else "no new version"
    pushed = "pushed" if r.is_pushed else "not pushed"
    when = r.finished_at.ToDatetime().isoformat(timespec="seconds")
    return f"{r.kind:9s} {when}  +{r.num_samples_added} samples, {version}, {pushed}: {r.note}"


async def run(args: argparse.Namespace) -> int:
    async with open_channel(args.target) as channel:
        stub = trainer_pb2_grpc.TrainerServiceStub(channel)
        if args.command == "retrain":
            request = trainer_pb2.RetrainRequest(kind=KIND_ENUMS[args.kind])
            response = await stub.Retrain(request, timeout=args.timeout_s)
            for r in response.rounds:
                print(format_round(r))
            return 0
        status = await stub.GetStatus(trainer_pb2.GetStatusRequest(), timeout=args.timeout_s)
        for m in status.latest_models:
            print(f"{m.kind:9s} latest v{m.version} ({m.model_name}, {m.num_train_samples} samples) {m.metrics_json}")
        for r in status.last_rounds:
            print(format_round(r))
        if not status.latest_models and not status.last_rounds:
            print("no model versions and no rounds yet")
        return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return asyncio.run(run(args))
    except grpc.aio.AioRpcError as error:
        print(f"{args.target}: {error.code().name}: {error.details()}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
