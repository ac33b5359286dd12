/*
 * npu-cgroup-exec: joins a cgroup, then becomes the worker.
 *
 * npu-supervisord spawns workers with posix_spawn (it never forks: it is multi-threaded), so it cannot run code
 * in the child between fork and exec. To place a worker in its memory cgroup before the worker runs a single
 * instruction of its own, the supervisor spawns this program instead, with the target cgroup's `cgroup.procs`
 * open as fd 4: it writes its own pid there, closes fd 4 and execs the worker (same pid, same fds 0-3, same
 * environment). Usage: npu-cgroup-exec PROGRAM [ARG...]   (fd 4 = cgroup.procs, opened for writing)
 */
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: npu-cgroup-exec PROGRAM [ARG...]  (fd 4: the cgroup's cgroup.procs)\n");
        return 64;
    }
    char pid[32];
    int n = snprintf(pid, sizeof pid, "%d\n", (int)getpid());
    if (write(4, pid, (size_t)n) != n) {
        fprintf(stderr, "npu-cgroup-exec: cannot join the worker's cgroup (fd 4): %s\n", strerror(errno));
        return 71; /* EX_OSERR */
    }
    close(4);
    execv(argv[1], argv + 1);
    fprintf(stderr, "npu-cgroup-exec: cannot execute %s: %s\n", argv[1], strerror(errno));
    return 127;
}
