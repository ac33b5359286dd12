#!/usr/bin/env bash
# A rolling upgrade under closed-loop load, for BENCHMARKS.md: N simulated devices with a model load of
# LOAD_MS, clients sending one request at a time each; the worker command is changed in the config and
# `npu-supervisorctl reload --wait` rolls every device (canary first, bake, then the rest). Prints how long the
# reload took and what the clients saw (answered, ok, failed, never answered).
#
#   scripts/bench-rollout.sh [BIN_DIR] [DEVICES] [LOAD_MS] [BAKE]     (defaults: .build/release 4 1500 5s)
set -euo pipefail
BIN=$(cd "${1:-.build/release}" && pwd)
DEVICES=${2:-4}
LOAD_MS=${3:-1500}
BAKE=${4:-5s}
TMP=$(mktemp -d /tmp/npu-rollout-bench.XXXXXX)
trap 'kill $(cat $TMP/pid 2>/dev/null) 2>/dev/null; wait 2>/dev/null; rm -rf $TMP' EXIT
config() {  # $1: extra worker arguments
    cat <<TOML
[supervisor]
run_dir = "run"
log_level = "notice"
[http]
listen = ""
[rollout]
min_ready_time = "1s"
bake_time = "$BAKE"
progress_deadline = "30s"
[defaults]
command = ["$BIN/npu-worker", "--load-ms", "$LOAD_MS", "--token-ms", "2"$1]
inference_probe = { enabled = false }
TOML
    for i in $(seq 0 $((DEVICES - 1))); do printf '[[device]]\nid = "%s"\n' "$i"; done
}
config "" > $TMP/config.toml
cd $TMP
"$BIN/npu-supervisord" --config config.toml 2> daemon.log & echo $! > pid
for _ in $(seq 1 200); do
    ready=$("$BIN/npu-supervisorctl" --socket run/control.sock status --json 2>/dev/null | grep -c '"state" : "ready"' || true)
    [ "$ready" = "$DEVICES" ] && break
    sleep 0.05
done
LOAD_SECONDS=$(( (LOAD_MS * DEVICES) / 1000 + 20 ))
"$BIN/npu-bench" load --socket run/requests.sock --clients 8 --depth 1 --duration "$LOAD_SECONDS" --machine \
    --json '{"prompt": "rolling upgrade", "max_new_tokens": 8}' > load.json &
LOAD=$!
sleep 2
config ', "--model", "sim-llm-7b-v2"' > config.toml
start=$(date +%s.%N)
"$BIN/npu-supervisorctl" --socket run/control.sock reload --wait
end=$(date +%s.%N)
wait $LOAD
echo "devices=$DEVICES load_ms=$LOAD_MS bake=$BAKE reload_wait_seconds=$(echo "$end - $start" | bc)"
echo "load (${LOAD_SECONDS}s, 8 closed-loop clients, the reload inside it): $(tail -1 load.json)"
"$BIN/npu-supervisorctl" --socket run/control.sock rollout
