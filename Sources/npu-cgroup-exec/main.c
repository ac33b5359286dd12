/*
 * npu-cgroup-exec: joins a cgroup, then becomes the worker.
 *
 * npu-supervisord spawns workers with posix_spawn (it never forks: it is multi-threaded), so it cannot run code
 * in the child between fork and exec. To place a worker in its memory cgroup before the worker runs a single
 * instruction of its own, the supervisor spawns this program instead, with the target cgroup's `cgroup.procs`
 * open as fd 4: it writes its own pid there, closes fd 4 and execs the worker (same pid, same fds 0-3, same
 * environment). Usage: npu-cgroup-exec PROGRAM [ARG...]   (fd 4 = cgroup.procs, opened for writing)
 *
 * Standby: npu-cgroup-exec --standby PROGRAM [ARG...], with fd 5 the supervisor's "go" socket. Joining a cgroup
 * is slow (the write to cgroup.procs takes the kernel's cgroup_threadgroup_rwsem for writing, which waits for
 * an RCU grace period: 6-24 ms measured on kernel 6.18, v1 memory), so the supervisor starts the next worker's
 * process ahead of need: it joins its cgroup at once and then blocks on fd 5. A restart sends one byte, and the
 * worker is exec'd without any cgroup work left. EOF on fd 5 (the supervisor discarded the standby, or died):
 * exit 0 without running the worker.
 */
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

int main(int argc, char **argv) {
    int standby = argc >= 2 && strcmp(argv[1], "--standby") == 0;
    if (argc < 2 + standby) {
        fprintf(stderr, "usage: npu-cgroup-exec [--standby] PROGRAM [ARG...]  (fd 4: the cgroup's cgroup.procs;"
                        " fd 5 with --standby: the go socket)\n");
        return 64;
    }
    char pid[32];
    int n = snprintf(pid, sizeof pid, "%d\n", (int)getpid());
    if (write(4, pid, (size_t)n) != n) {
        fprintf(stderr, "npu-cgroup-exec: cannot join the worker's cgroup (fd 4): %s\n", strerror(errno));
        return 71; /* EX_OSERR */
    }
    close(4);
    if (standby) {
        char go;
        ssize_t r;
        do {
            r = read(5, &go, 1);
        } while (r < 0 && errno == EINTR);
        if (r != 1) _exit(0); /* discarded */
        close(5);
    }
    char **program = argv + 1 + standby;
    execv(program[0], program);
    fprintf(stderr, "npu-cgroup-exec: cannot execute %s: %s\n", program[0], strerror(errno));
    return 127;
}
