#!/bin/sh
# Scale (issue 10, item 5): 64 workers from cold start to all ready (model load 0), the idle supervisor's CPU
# with 64 workers, its RSS idle with 8 workers, and RSS and descriptors over 10,000 SIGKILL/restart cycles.
#
#   scripts/bench-scale.sh [BIN_DIR] [ROUNDS] [IDLE_SECONDS] [CYCLES]
#
# Defaults: .build/release, 2 rounds (cgroups on and off alternated in each), 60 s idle, 10000 cycles.
# Figures: BENCHMARKS.md, "Scale".
set -eu
BIN=${1:-.build/release}
ROUNDS=${2:-2}
IDLE=${3:-60}
CYCLES=${4:-10000}
echo "# $(uname -r), $(nproc) CPUs, load $(cut -d' ' -f1-3 /proc/loadavg)"
r=1
while [ "$r" -le "$ROUNDS" ]; do
    for cg in auto off; do
        "$BIN/npu-bench" scale --bin "$BIN" --workers 64 --cgroups "$cg" --idle "$IDLE"
    done
    r=$((r + 1))
done
"$BIN/npu-bench" idle --bin "$BIN" --workers 8 8
"$BIN/npu-bench" soak --bin "$BIN" --cycles "$CYCLES" --every $((CYCLES / 5))
