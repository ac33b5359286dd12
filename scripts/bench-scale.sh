#!/bin/sh
# Scale (issue 10, item 5): 64 workers from cold start to all ready (model load 0), the idle supervisor's CPU
# with 64 workers, its RSS idle with 8 workers, and RSS and descriptors over many SIGKILL/restart cycles.
#
#   scripts/bench-scale.sh [BIN_DIR] [ROUNDS] [IDLE_SECONDS] [CYCLES]
#
# Defaults: .build/release, 2 rounds (memory cgroups on and off alternated in each), 60 s idle, 10000 cycles.
# Optional: OLD=DIR adds another build's npu-supervisord (with its npu-worker and npu-cgroup-exec) to the
# cold-start rounds; STATIC=DIR measures the idle RSS of that folder's npu-supervisord too (for example the
# --static-swift-stdlib build that the packages ship, with npu-worker and npu-cgroup-exec copied next to it).
# Figures: BENCHMARKS.md, "Scale".
set -eu
BIN=$(cd "${1:-.build/release}" && pwd)
ROUNDS=${2:-2}
IDLE=${3:-60}
CYCLES=${4:-10000}
OLD=${OLD:+$(cd "$OLD" && pwd)}
STATIC=${STATIC:+$(cd "$STATIC" && pwd)}
echo "# $(uname -r), $(nproc) CPUs, load $(cut -d' ' -f1-3 /proc/loadavg)"
r=1
while [ "$r" -le "$ROUNDS" ]; do
    for cg in auto off; do
        "$BIN/npu-bench" scale --bin "$BIN" --workers 64 --cgroups "$cg" --idle "$IDLE"
        [ -n "$OLD" ] && "$BIN/npu-bench" scale --bin "$OLD" --workers 64 --cgroups "$cg" --idle 1 --settle 0 \
            | sed 's/^/old: /'
    done
    r=$((r + 1))
done
echo "# idle RSS, 8 workers (cgroups auto)"
"$BIN/npu-bench" idle --bin "$BIN" --workers 8 8
[ -n "$STATIC" ] && "$BIN/npu-bench" idle --bin "$STATIC" --workers 8 8 | sed 's/^/static: /'
echo "# $CYCLES SIGKILL/restart cycles (cgroups auto)"
"$BIN/npu-bench" soak --bin "$BIN" --cycles "$CYCLES" --every $((CYCLES / 5))
echo "# 300 cycles, each worker killed after ~400 ms (every restart takes the slot's standby)"
"$BIN/npu-bench" soak --bin "$BIN" --cycles 300 --every 100 --pause-ms 800
