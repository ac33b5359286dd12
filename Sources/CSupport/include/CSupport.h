#ifndef NPU_CSUPPORT_H
#define NPU_CSUPPORT_H

#include <sys/types.h>
// Swift's Glibc module leaves epoll out; npu-bench's plain-epoll forwarder (`forward --raw`) uses it from here.
#include <sys/epoll.h>

/// Everything a worker spawn needs, in one call, so that Swift never forks (the daemon is multi-threaded).
/// The child gets: `channel_fd` as fd 3, /dev/null as stdin, `output_fd` as stdout and stderr, every other fd
/// closed, its own process group, an empty signal mask and default signal dispositions.
/// `working_directory` (may be NULL) is entered before exec. `channel_fd` < 0: no fd 3 (probe commands).
/// When `cgroup_procs_fd` >= 0 the child is spawned through `trampoline` (argv[0] of the trampoline), which
/// writes its own pid to that fd (passed as fd 4) before it execs the worker, so the worker runs none of its
/// own code outside its cgroup. Returns 0 and sets *pid, or an errno value.
int npu_spawn(const char *path, char *const argv[], char *const envp[], const char *working_directory,
              int channel_fd, int output_fd, int cgroup_procs_fd, pid_t *pid);

/// `npu_spawn` for a standby worker (the trampoline started with `--standby`): `go_fd` is passed as fd 5; the
/// trampoline joins its cgroup at once, then waits for one byte on fd 5 before it execs the worker (EOF: it
/// exits without running the worker).
int npu_spawn_standby(const char *path, char *const argv[], char *const envp[], const char *working_directory,
                      int channel_fd, int output_fd, int cgroup_procs_fd, int go_fd, pid_t *pid);

/// The process environment (`environ`), which Swift 6 does not import safely.
char **npu_environ(void);

/// pidfd_open(2); -1 and errno on failure.
int npu_pidfd_open(pid_t pid);

/// Decoders for a waitpid status (the W* macros are not imported into Swift).
int npu_wifexited(int status);
int npu_wexitstatus(int status);
int npu_wifsignaled(int status);
int npu_wtermsig(int status);
int npu_wcoredump(int status);

/// Kills this process with SIGSEGV without running any handler (the reference worker's "crash" fault).
void npu_crash_segv(void);

/// pipe2(fds, O_CLOEXEC).
int npu_pipe_cloexec(int fds[2]);

/// Blocks until any child of this process has exited and returns its pid without reaping it (waitid with
/// WNOWAIT), or -errno (-ECHILD: no child at all). Retries on EINTR.
pid_t npu_wait_any_exited(void);

/// prctl(PR_SET_CHILD_SUBREAPER, 1): orphaned descendants are re-parented to this process. 0 or -1 with errno.
int npu_set_child_subreaper(void);

/// SO_PEERCRED of a connected Unix socket. Returns 0 or -1 with errno.
int npu_peer_credentials(int fd, pid_t *pid, uid_t *uid, gid_t *gid);

/// Gives the calling thread (only) the nice value `nice_value`, and marks it SCHED_RESET_ON_FORK so that
/// processes and threads it creates start at nice 0 instead of inheriting a negative value. Returns 0 or an
/// errno (EPERM or EACCES without CAP_SYS_NICE; the thread is then unchanged but for the reset-on-fork mark).
int npu_set_thread_nice(int nice_value);

/// The calling thread's nice value (getpriority of its thread id).
int npu_thread_nice(void);

#endif
