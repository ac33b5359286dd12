#!/bin/sh
# SIGKILL -> the device answering a request again, the same npu-worker binary under npu-supervisord (memory
# cgroups on and off; pidfd and the NPU_SUPERVISOR_NO_PIDFD=1 waitid fallback), runit's runsv and supervisord,
# in one invocation, interleaved kill by kill (npu-bench restart-peers). Figures: BENCHMARKS.md, issue 10.
#
#   scripts/bench-restart-peers.sh [BIN_DIR] [CYCLES] [OLD_BIN_DIR]
#
# BIN_DIR: release build (default .build/release). CYCLES: kills per target (default 40). OLD_BIN_DIR: optional
# folder with another build's npu-supervisord, npu-cgroup-exec and npu-worker, added as "old" targets (cgroups
# on and off, pidfd) for a before/after in the same run.
#
# runit comes from Debian (apt-get download runit; dpkg -x into a scratch folder: nothing is installed on the
# system) and supervisor from PyPI into a scratch venv. SCRATCH (default /tmp/npu-bench-peers) keeps both
# between runs. Each supervisor is set to its fastest restart: npu-supervisord backoff_initial 10ms and
# backoff_reset_after 1s (a worker that served 1 s is restarted at once); runsv has no setting (it restarts at
# once a service that ran for more than 1 s); supervisord startsecs=0, autorestart=true, a huge startretries.
# Every worker serves 1.1 s before it is killed, so that no supervisor's start throttle applies.
# Memory cgroups need root; without it the cgroup targets run without cgroups (the log line says so).
set -eu
BIN=$(cd "${1:-.build/release}" && pwd)
CYCLES=${2:-40}
OLD=${3:-}
SCRATCH=${SCRATCH:-/tmp/npu-bench-peers}
mkdir -p "$SCRATCH"
cd "$SCRATCH"

if [ ! -x runit/usr/bin/runsv ]; then
    apt-get download runit >/dev/null 2>&1 || { echo "apt-get download runit failed" >&2; exit 1; }
    dpkg -x runit_*.deb runit
fi
if [ ! -x venv/bin/supervisord ]; then
    python3 -m venv venv
    venv/bin/pip install -q supervisor
fi

RUN=$SCRATCH/run.$$
mkdir -p "$RUN/sv/worker"
cleanup() {
    # runsv: "d" stops the worker (TERM), "x" makes runsv exit once it is down.
    [ -p "$RUN/sv/worker/supervise/control" ] && printf dx >"$RUN/sv/worker/supervise/control"
    [ -n "${SUPD:-}" ] && kill "$SUPD" 2>/dev/null
    [ -n "${RUNSV:-}" ] && wait "$RUNSV" 2>/dev/null
    [ -n "${SUPD:-}" ] && wait "$SUPD" 2>/dev/null
    rm -rf "$RUN"
}
trap cleanup EXIT INT TERM

# runit: one service, its run script execs the worker (runsv's child is the worker itself).
cat >"$RUN/sv/worker/run" <<EOF
#!/bin/sh
exec "$BIN/npu-worker" --listen "$RUN/runit.sock" 2>/dev/null
EOF
chmod +x "$RUN/sv/worker/run"
"$SCRATCH/runit/usr/bin/runsv" "$RUN/sv/worker" &
RUNSV=$!

# supervisord: one program, restarted as fast as it allows.
cat >"$RUN/supervisord.conf" <<EOF
[supervisord]
nodaemon=true
pidfile=$RUN/supervisord.pid
logfile=$RUN/supervisord.log
loglevel=warn
[program:worker]
command=$BIN/npu-worker --listen $RUN/supervisord.sock
startsecs=0
startretries=1000000
autorestart=true
stopsignal=KILL
stdout_logfile=/dev/null
stderr_logfile=/dev/null
EOF
venv/bin/supervisord -c "$RUN/supervisord.conf" >"$RUN/supervisord.out" 2>&1 &
SUPD=$!

i=0
while [ ! -S "$RUN/runit.sock" ] || [ ! -S "$RUN/supervisord.sock" ]; do
    i=$((i + 1)); [ $i -gt 100 ] && { echo "peers did not start" >&2; exit 1; }
    sleep 0.1
done

OLD_TARGETS=""
if [ -n "$OLD" ]; then
    OLD=$(cd "$OLD" && pwd)
    OLD_TARGETS="--ours name=old-cgroups-pidfd,cgroups=auto,pidfd=on,bin=$OLD --ours name=old-nocgroups-pidfd,cgroups=off,pidfd=on,bin=$OLD"
fi

echo "# $(uname -r), $(nproc) CPUs, load $(cut -d' ' -f1-3 /proc/loadavg), runsv $(dpkg-deb -f "$SCRATCH"/runit_*.deb Version), supervisord $(venv/bin/supervisord --version)"
# shellcheck disable=SC2086
"$BIN/npu-bench" restart-peers --bin "$BIN" --cycles "$CYCLES" --reference runit \
    --ours name=cgroups-pidfd,cgroups=auto,pidfd=on \
    --ours name=cgroups-waitid,cgroups=auto,pidfd=off \
    --ours name=nocgroups-pidfd,cgroups=off,pidfd=on \
    --ours name=nocgroups-waitid,cgroups=off,pidfd=off \
    $OLD_TARGETS \
    --peer "name=runit,socket=$RUN/runit.sock" \
    --peer "name=supervisord,socket=$RUN/supervisord.sock"
