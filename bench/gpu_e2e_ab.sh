#!/usr/bin/env bash
# The services path A/B on the GPU: bench/gpu_e2e.py's phases for this tree and for a baseline tree, one
# after the other on the same machine (the services path varies ~20 % between machines: compare within a run).
#
#   bench/gpu_e2e_ab.sh OUT BASE_DIR [gpu_e2e args...]
#
# BASE_DIR: another revision's tree with its generated protos, made here with
#   rev=557a93e; rm -rf var/old && mkdir -p var/old && git archive $rev services bench tools protos | tar -x -C var/old \
#     && (cd var/old && ../../.venv/bin/python -m grpc_tools.protoc -I protos --python_out=. --pyi_out=. \
#         --grpc_python_out=. protos/magnus/v1/*.proto)
# and carried with var/e2e and the wheels of bench/GPU_SERVING_E2E.md (carry [".whl", "magnus", "var/e2e", "var/old"]).
# Each variant's output goes to OUT/<name>.tgz and OUT/<name>.log. Env MAGNUS_AB_VARIANTS picks and orders them
# ("new old" by default): each is NAME[:VAR=VALUE[,VAR=VALUE...]], run from BASE_DIR when NAME starts with "old",
# else from this tree, with those variables set, e.g. "new new_gil1ms:MAGNUS_WORKER_GIL_SWITCH_INTERVAL_S=0.001".
# MAGNUS_AB_PYSPY=path/to/py-spy samples the GIL holder of each service in MAGNUS_AB_PYSPY_SERVICES (default
# "worker"; e.g. "worker batcher predictor driver", driver = bench/gpu_e2e.py, the clients) for MAGNUS_AB_PYSPY_S (8) s of each burst into <name>.tgz as
# pyspy_<service>.txt (MAGNUS_AB_PYSPY_ARGS, default --gil; --idle samples every thread's wall time instead),
# starting once the driver's log has a line matching MAGNUS_AB_PYSPY_AFTER (default "rate   12.0/s": the first
# burst; "rate  400.0/s:" with --stream both: the streamed burst, which follows the unstreamed one).
set -uo pipefail
out=$(realpath -m "$1"); base=$(realpath "$2"); shift 2
root=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$out"
if [ -d "$root/.whl" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$root"/.whl/*.whl \
    && export PYTHONPATH=/tmp/site || exit 1
fi
export PYTHONUNBUFFERED=1
common=(--backend paged --workload "$root/var/e2e/workload.jsonl" --state "$root/var/e2e/state"
        --calibration "$root/reports/gpu/e2e_raw/h100_calibration.json" --skip-calibration "$@")
for variant in ${MAGNUS_AB_VARIANTS:-new old}; do
  name=${variant%%:*}; env=()
  [[ $variant == *:* ]] && IFS=, read -r -a env <<< "${variant#*:}"
  dir=$root; [[ $name == old* ]] && dir=$base
  started=$(date +%s)
  if [ -n "${MAGNUS_AB_PYSPY:-}" ]; then  # who holds each service's GIL during the burst (py-spy binary path)
    for service in ${MAGNUS_AB_PYSPY_SERVICES:-worker}; do
      (for _ in $(seq 900); do grep -q "${MAGNUS_AB_PYSPY_AFTER:-rate   12.0/s}" "$out/$name.log" 2>/dev/null && break; sleep 1; done
       sleep 0.3; pattern="services.$service"; [ "$service" = driver ] && pattern="bench/gpu_e2e.py"
       pid=$(pgrep -n -f "$pattern") && mkdir -p "$out/$name" && "$MAGNUS_AB_PYSPY" record \
         --pid "$pid" --duration "${MAGNUS_AB_PYSPY_S:-8}" --rate 200 ${MAGNUS_AB_PYSPY_ARGS:---gil} --threads --nonblocking \
         --format raw -o "$out/$name/pyspy_${service}.txt" > "$out/$name/pyspy_${service}.log" 2>&1) &
    done
  fi
  (cd "$dir" && env "${env[@]}" python3 bench/gpu_e2e.py "${common[@]}" --out "$out/$name" \
     --workdir "/tmp/magnus-ab-$name") > "$out/$name.log" 2>&1
  rc=$?; wait
  echo "$variant: rc $rc in $(( $(date +%s) - started )) s"
  grep -E " ok, |Traceback|Error" "$out/$name.log" | tail -6
  (cd "$out" && tar czf "$name.tgz" "$name" && rm -rf "$name")
done
