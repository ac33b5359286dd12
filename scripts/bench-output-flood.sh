#!/usr/bin/env bash
# Issue 14, item 4: another device's latency next to a worker flooding its stdout, and how much of the flood the
# supervisor reads and keeps. Usage: scripts/bench-output-flood.sh [BIN_DIR] [WORKER_DIR] [output_rate_limit]
#   BIN_DIR: npu-supervisord/npu-supervisorctl (default .build/release); WORKER_DIR: npu-worker (default BIN_DIR).
# Device 1 (--token-ms 5, 5 tokens) is measured with 300 pinned requests, first with device 0 stopped, then
# with device 0 running `npu-worker --flood-output`; the daemon's CPU and the kept output are sampled meanwhile.
set -euo pipefail
BIN=$(realpath "${1:-.build/release}")
WBIN=$(realpath "${2:-$BIN}")
RATE=${3:-8MiB}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
DIR=$(mktemp -d /tmp/npu-flood.XXXX)
trap 'kill $DAEMON 2>/dev/null || true; wait 2>/dev/null; rm -rf "$DIR"' EXIT
RATE_LINE="output_rate_limit = \"$RATE\""
"$BIN/npu-supervisord" --help 2>&1 | grep -q . || true
cat > "$DIR/config.toml" <<TOML
[supervisor]
run_dir = "run"
output_lines = 1000
[defaults]
command = ["$WBIN/npu-worker", "--token-ms", "5"]
inference_probe = { enabled = false }
$( [ "$RATE" = "none" ] || echo "$RATE_LINE" )
[[device]]
id = "0"
command = ["$WBIN/npu-worker", "--token-ms", "5", "--flood-output"]
[[device]]
id = "1"
TOML
"$BIN/npu-supervisord" --config "$DIR/config.toml" 2> "$DIR/daemon.log" &
DAEMON=$!
CTL=("$BIN/npu-supervisorctl" --socket "$DIR/run/control.sock")
for _ in $(seq 100); do "${CTL[@]}" status >/dev/null 2>&1 && break; sleep 0.1; done
sleep 1
"${CTL[@]}" stop 0 >/dev/null
sleep 1
measure() {
  PYTHONPATH="$ROOT/python" python3 - "$DIR/run/requests.sock" <<'PY'
import sys, time, statistics
from npu_supervisor.client import Client
c = Client(sys.argv[1])
for _ in range(20): c.infer({"prompt": "p", "max_new_tokens": 5}, device="1")
s = []
for _ in range(300):
    t = time.perf_counter(); c.infer({"prompt": "p", "max_new_tokens": 5}, device="1"); s.append((time.perf_counter() - t) * 1000)
s.sort()
print(f"p50 {s[len(s)//2]:.1f} ms  p95 {s[int(len(s)*0.95)]:.1f} ms")
PY
}
cpu() { awk '{print $14+$15}' /proc/$DAEMON/stat; }
echo "quiet:    $(measure)"
"${CTL[@]}" start 0 >/dev/null
sleep 2
lastline() { "${CTL[@]}" tail 0 -n 5 | grep -o 'flood line [0-9]*' | tail -1 | awk '{print $3}'; }
N0=$(lastline); LOG0=$(stat -c %s "$DIR/daemon.log"); C0=$(cpu); T0=$(date +%s.%N)
echo "flooding: $(measure)"
N1=$(lastline); LOG1=$(stat -c %s "$DIR/daemon.log"); C1=$(cpu); T1=$(date +%s.%N)
# Flood lines are numbered and ~100 bytes: the newest kept line's number tells how much the daemon read.
awk -v n="$(( (N1-N0) * 100 ))" -v l="$((LOG1-LOG0))" -v c="$((C1-C0))" -v t0="$T0" -v t1="$T1" -v hz="$(getconf CLK_TCK)" \
  'BEGIN { d = t1 - t0; printf "during the flood: daemon CPU %.0f%%, output read %.1f MiB/s, log written %.1f MiB/s\n", 100*c/hz/d, n/d/1048576, l/d/1048576 }'
echo "dropped markers in the log: $(grep -c 'of output dropped' "$DIR/daemon.log" || true)"
