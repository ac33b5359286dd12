#define _GNU_SOURCE
#include "CSupport.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sched.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

extern char **environ;

char **npu_environ(void) { return environ; }

int npu_spawn(const char *path, char *const argv[], char *const envp[], const char *working_directory,
              int channel_fd, int output_fd, int cgroup_procs_fd, pid_t *pid) {
    return npu_spawn_standby(path, argv, envp, working_directory, channel_fd, output_fd, cgroup_procs_fd, -1, pid);
}

int npu_spawn_standby(const char *path, char *const argv[], char *const envp[], const char *working_directory,
                      int channel_fd, int output_fd, int cgroup_procs_fd, int go_fd, pid_t *pid) {
    posix_spawn_file_actions_t fa;
    posix_spawnattr_t attr;
    int rc = posix_spawn_file_actions_init(&fa);
    if (rc != 0) return rc;
    rc = posix_spawnattr_init(&attr);
    if (rc != 0) { posix_spawn_file_actions_destroy(&fa); return rc; }

    /* Order matters: dup2 onto 0..4 first, then close everything from 5 (or 4) up. dup2 clears
       FD_CLOEXEC on the target, so fds 3 (and 4) survive exec even though the supervisor opened
       every descriptor close-on-exec. */
    if (working_directory && (rc = posix_spawn_file_actions_addchdir_np(&fa, working_directory)) != 0) goto out;
    if ((rc = posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDONLY, 0)) != 0) goto out;
    if ((rc = posix_spawn_file_actions_adddup2(&fa, output_fd, 1)) != 0) goto out;
    if ((rc = posix_spawn_file_actions_adddup2(&fa, output_fd, 2)) != 0) goto out;
    if (channel_fd < 0) {
        /* A probe command: no channel, nothing beyond stdio. */
        if ((rc = posix_spawn_file_actions_addclosefrom_np(&fa, 3)) != 0) goto out;
    } else if ((rc = posix_spawn_file_actions_adddup2(&fa, channel_fd, 3)) != 0) {
        goto out;
    } else if (cgroup_procs_fd >= 0 && go_fd >= 0) {
        if ((rc = posix_spawn_file_actions_adddup2(&fa, cgroup_procs_fd, 4)) != 0) goto out;
        if ((rc = posix_spawn_file_actions_adddup2(&fa, go_fd, 5)) != 0) goto out;
        if ((rc = posix_spawn_file_actions_addclosefrom_np(&fa, 6)) != 0) goto out;
    } else if (cgroup_procs_fd >= 0) {
        if ((rc = posix_spawn_file_actions_adddup2(&fa, cgroup_procs_fd, 4)) != 0) goto out;
        if ((rc = posix_spawn_file_actions_addclosefrom_np(&fa, 5)) != 0) goto out;
    } else {
        if ((rc = posix_spawn_file_actions_addclosefrom_np(&fa, 4)) != 0) goto out;
    }

    /* Dispatch threads block nearly every signal and the runtime ignores SIGPIPE: without these the
       worker would inherit a mask with SIGTERM blocked and could not be stopped politely. */
    sigset_t empty, all;
    sigemptyset(&empty);
    sigfillset(&all);
    if ((rc = posix_spawnattr_setsigmask(&attr, &empty)) != 0) goto out;
    if ((rc = posix_spawnattr_setsigdefault(&attr, &all)) != 0) goto out;
    if ((rc = posix_spawnattr_setpgroup(&attr, 0)) != 0) goto out;
    short flags = POSIX_SPAWN_SETPGROUP | POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF;
    if ((rc = posix_spawnattr_setflags(&attr, flags)) != 0) goto out;

    rc = posix_spawnp(pid, path, &fa, &attr, argv, envp);
out:
    posix_spawnattr_destroy(&attr);
    posix_spawn_file_actions_destroy(&fa);
    return rc;
}

int npu_pidfd_open(pid_t pid) { return (int)syscall(SYS_pidfd_open, pid, 0); }

int npu_set_child_subreaper(void) { return prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0); }

pid_t npu_wait_any_exited(void) {
    for (;;) {
        siginfo_t info;
        memset(&info, 0, sizeof info);
        if (waitid(P_ALL, 0, &info, WEXITED | WNOWAIT) == 0) return info.si_pid;
        if (errno != EINTR) return -errno;
    }
}

int npu_wifexited(int status) { return WIFEXITED(status); }
int npu_wexitstatus(int status) { return WEXITSTATUS(status); }
int npu_wifsignaled(int status) { return WIFSIGNALED(status); }
int npu_wtermsig(int status) { return WTERMSIG(status); }
int npu_wcoredump(int status) { return WCOREDUMP(status); }

void npu_crash_segv(void) {
    signal(SIGSEGV, SIG_DFL);
    raise(SIGSEGV);
    _exit(139);
}

int npu_pipe_cloexec(int fds[2]) { return pipe2(fds, O_CLOEXEC); }

int npu_peer_credentials(int fd, pid_t *pid, uid_t *uid, gid_t *gid) {
    struct ucred cred;
    socklen_t len = sizeof(cred);
    if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0) return -1;
    *pid = cred.pid;
    *uid = cred.uid;
    *gid = cred.gid;
    return 0;
}

#ifndef SCHED_RESET_ON_FORK
#define SCHED_RESET_ON_FORK 0x40000000
#endif
#ifndef SCHED_FLAG_RESET_ON_FORK
#define SCHED_FLAG_RESET_ON_FORK 0x01
#endif

/* struct sched_attr, its first version (glibc before 2.41 has no wrapper). */
struct npu_sched_attr {
    uint32_t size;
    uint32_t sched_policy;
    uint64_t sched_flags;
    int32_t sched_nice;
    uint32_t sched_priority;
    uint64_t sched_runtime;
    uint64_t sched_deadline;
    uint64_t sched_period;
};

int npu_set_thread_nice(int nice_value) {
    pid_t tid = (pid_t)syscall(SYS_gettid);
    /* One call sets the nice value and the reset-on-fork mark together: no child can ever inherit the value.
       sched_setscheduler() is not used first because systemd's RestrictRealtime= (in the packaged unit) refuses
       every policy number above SCHED_IDLE, and SCHED_OTHER | SCHED_RESET_ON_FORK is one. */
    struct npu_sched_attr attr;
    memset(&attr, 0, sizeof attr);
    attr.size = sizeof attr;
    attr.sched_policy = SCHED_OTHER;
    attr.sched_flags = SCHED_FLAG_RESET_ON_FORK;
    attr.sched_nice = nice_value;
    if (syscall(SYS_sched_setattr, tid, &attr, 0) == 0) return 0;
    int first = errno;
    /* A kernel or filter without sched_setattr: the two older calls, the mark first. Without the mark the value
       is not set at all (workers would inherit it). */
    struct sched_param param = {0};
    if (sched_setscheduler(tid, SCHED_OTHER | SCHED_RESET_ON_FORK, &param) != 0) return first;
    if (setpriority(PRIO_PROCESS, (id_t)tid, nice_value) != 0) return errno;
    return 0;
}

int npu_thread_nice(void) {
    errno = 0;
    return getpriority(PRIO_PROCESS, (id_t)syscall(SYS_gettid));
}
