#!/bin/sh
# What a v1/v2 memory cgroup costs per worker start, step by step (issue 10): mkdir, writing the limit, moving a
# process in (cgroup.procs), rmdir. Needs root; compiles a small C program with cc.
#
#   scripts/cgroup-attach-cost.sh [PARENT_CGROUP_DIR] [PAUSE_MS]
#
# PARENT_CGROUP_DIR defaults to this shell's own v1 memory cgroup; PAUSE_MS (default 300) is slept between rounds:
# the move of a pid takes cgroup_threadgroup_rwsem for writing, which waits for an RCU grace period unless
# another writer went just before (PAUSE_MS 0 shows the fast case).
set -eu
PARENT=${1:-/sys/fs/cgroup/memory$(awk -F: '$2 == "memory" {print $3}' /proc/self/cgroup)}
PAUSE=${2:-300}
T=$(mktemp -d)
trap 'rm -rf "$T"; rmdir "$PARENT/attach-cost" 2>/dev/null || true' EXIT
cat >"$T/t.c" <<'C'
#define _GNU_SOURCE
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
static double ms(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec * 1e3 + t.tv_nsec / 1e6; }
int main(int argc, char **argv) {
    char p[512], f[600], b[32];
    for (int i = 0; i < 10; i++) {
        usleep(atoi(argv[2]) * 1000);
        snprintf(p, sizeof p, "%s/w%d", argv[1], i);
        double t0 = ms(); mkdir(p, 0755); double t1 = ms();
        snprintf(f, sizeof f, "%s/memory.limit_in_bytes", p);
        int fd = open(f, O_WRONLY); if (fd < 0) { snprintf(f, sizeof f, "%s/memory.max", p); fd = open(f, O_WRONLY); }
        if (fd >= 0) { write(fd, "1073741824\n", 11); close(fd); }
        double t2 = ms();
        pid_t c = fork(); if (c == 0) { pause(); _exit(0); }
        snprintf(f, sizeof f, "%s/cgroup.procs", p); fd = open(f, O_WRONLY);
        int n = snprintf(b, sizeof b, "%d\n", c);
        double t3 = ms(); write(fd, b, n); double t4 = ms(); close(fd);
        kill(c, SIGKILL); waitpid(c, 0, 0);
        double t5 = ms(); rmdir(p); double t6 = ms();
        printf("mkdir %.2f ms  limit %.2f ms  move pid in %.2f ms  rmdir %.2f ms\n", t1 - t0, t2 - t1, t4 - t3, t6 - t5);
    }
    return 0;
}
C
cc -O2 "$T/t.c" -o "$T/t"
mkdir -p "$PARENT/attach-cost"
"$T/t" "$PARENT/attach-cost" "$PAUSE"
