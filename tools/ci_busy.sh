#!/bin/bash
# usage: tools/ci_busy.sh [LOG_DIR]  (from the repo root; the clone goes beside it, next to ../shared)
REPO=$(pwd); CLONE=$(dirname "$REPO")/busyci; LOGS=${1:-$(dirname "$REPO")}
# issue 20: CI=true bash .ci/run three times in a row on clean clones while two spinners keep both cores busy
python3 -c 'while True: pass' & S1=$!
python3 -c 'while True: pass' & S2=$!
trap "kill $S1 $S2" EXIT
COMMIT=$(git -C "$REPO" rev-parse --short HEAD)
echo "commit $COMMIT, spinners $S1 $S2, start $(date -u +%T)"
for i in 1 2 3; do
  rm -rf "$CLONE"
  git clone -q "$REPO" "$CLONE"
  start=$(date +%s)
  (cd "$CLONE" && CI=true bash .ci/run) > "$LOGS"/busy_ci_run$i.log 2>&1
  rc=$?
  echo "run $i: rc=$rc, $(( $(date +%s) - start )) s, ended $(date -u +%T); $(grep -E '[0-9]+ passed' "$LOGS"/busy_ci_run$i.log | tail -1)"
done
