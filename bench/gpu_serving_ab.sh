#!/usr/bin/env bash
# The engine alone (bench/gpu_serving.py, mix workload) for several variants on one machine, after the GPU
# tests of the paged engine: the engine varies ~20 % between machines, so compare within one run.
#
#   bench/gpu_serving_ab.sh OUT BASE_DIR [gpu_serving args...]
#
# BASE_DIR: another revision's tree (see bench/gpu_e2e_ab.sh for how var/old is made). Env MAGNUS_AB_VARIANTS
# picks and orders the variants ("new old" by default): each is NAME[:ARG ARG ...] (extra gpu_serving
# arguments, spaces as commas), run from BASE_DIR when NAME starts with "old", else from this tree, e.g.
# "new new_eager:--mixed-graphs,off old". MAGNUS_AB_TESTS=0 skips the tests. Each variant writes
# OUT/<name>/ (serving.json, serving.md, its log); the summary table is printed last.
set -uo pipefail
out=$(realpath -m "$1"); base=$(realpath "$2"); shift 2
root=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$out"
export PYTHONUNBUFFERED=1
if [ "${MAGNUS_AB_TESTS:-1}" = 1 ]; then
  started=$(date +%s)
  (cd "$root" && timeout 300 python3 -m pytest -q -p no:cacheprovider --noconftest tests/worker/test_paged_mixed_step.py \
     tests/worker/test_paged_decode_step.py tests/worker/test_paged_attention.py tests/worker/test_paged_skinny_gemm.py \
     tests/worker/test_paged_fused_ops.py \
     "tests/worker/test_paged_engine.py::test_gpu_engine_with_triton_kernels_and_graphs_gives_the_cpu_tokens" \
     "tests/worker/test_paged_speculation.py::test_gpu_drafts_with_triton_kernels_and_graphs" -rs -s \
     > "$out/pytest.log" 2>&1)
  echo "tests: rc $? in $(( $(date +%s) - started )) s: $(tail -1 "$out/pytest.log")"
  grep -E "GPU paged engine|FAILED" "$out/pytest.log"
fi
for variant in ${MAGNUS_AB_VARIANTS:-new old}; do
  name=${variant%%:*}; extra=()
  [[ $variant == *:* ]] && IFS=, read -r -a extra <<< "${variant#*:}"
  dir=$root; [[ $name == old* ]] && dir=$base
  started=$(date +%s)
  (cd "$dir" && timeout "${MAGNUS_AB_TIMEOUT_S:-150}" python3 bench/gpu_serving.py --lengths "$root/var/serving/mix_lengths.jsonl" \
     --trace "$root/.gpu_data/azure2023_conv.csv" --out "$out/$name" "$@" "${extra[@]}") > "$out/$name.log" 2>&1
  echo "$variant: rc $? in $(( $(date +%s) - started )) s"
  grep -E "step graphs|decode graphs|Traceback|Error" "$out/$name.log" | tail -3
done
for variant in ${MAGNUS_AB_VARIANTS:-new old}; do
  name=${variant%%:*}
  python3 - "$out/$name/serving.json" "$name" <<'PY'
import json, sys
try:
    report = json.load(open(sys.argv[1]))
except OSError:
    sys.exit(print(f"{sys.argv[2]}: no serving.json"))
for workload, entry in report["workloads"].items():
    for policy, phases in entry["policies"].items():
        burst, rate = phases.get("burst", {}), phases.get("rate", {})
        print(f"{sys.argv[2]:>14} {workload} {policy}: burst {burst.get('requests_per_s')} req/s, mixed step "
              f"{burst.get('mixed_step_ms')} ms, decode-only {burst.get('decode_only_step_ms')} ms, steps "
              f"{burst.get('steps')}; at rate mean {rate.get('mean_latency_s')} s p99 {rate.get('p99_latency_s')} s, "
              f"decode-only {rate.get('decode_only_step_ms')} ms, steps {rate.get('steps')}, drafts kept "
              f"{rate.get('accepted_draft_tokens')} of {rate.get('draft_tokens')}")
PY
done
