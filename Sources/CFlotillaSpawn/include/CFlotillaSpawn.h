#ifndef CFLOTILLA_SPAWN_H
#define CFLOTILLA_SPAWN_H

#include <sys/types.h>

/// What the child does between clone and exec. Everything is prepared by the caller, so the child
/// only makes async-signal-safe calls.
typedef struct {
    const char *path;               /* absolute path of the program */
    char *const *argv;              /* NULL-terminated */
    char *const *envp;              /* NULL-terminated */
    const char *working_directory;  /* may be NULL */
    const char *const *cgroup_procs_files; /* "cgroup.procs" files to join before exec; may be NULL */
    int cgroup_count;
    int stdout_fd;
    int stderr_fd;
    int set_user;                   /* nonzero: switch to uid/gid/groups before exec */
    uid_t uid;
    gid_t gid;
    const gid_t *groups;            /* supplementary groups; may be NULL */
    int group_count;
} flotilla_spawn_request;

/// Starts a child (clone with CLONE_VM | CLONE_VFORK: no copy of the agent's memory) that starts a new session (so it leads its own process group), joins the given
/// cgroups (writing "0" moves the writer itself, so there is no window in which it runs outside
/// them), resets signal dispositions, wires stdin to /dev/null and stdout/stderr to the given
/// descriptors, closes every other descriptor, and execs.
/// With `set_user`, it drops to that user (supplementary groups, then gid, then uid) before the chdir.
/// Returns the pid, or -1 with `*error_stage` (1 clone, 2 setsid, 3 cgroup, 4 stdio, 5 chdir, 6 exec, 7 user)
/// and `*error_number` set. A failure after clone is reported by the child through a close-on-exec pipe.
pid_t flotilla_spawn(const flotilla_spawn_request *request, int *error_stage, int *error_number);

/// pidfd_open(2): a descriptor that becomes readable when the process exits. Works for non-children.
int flotilla_pidfd_open(pid_t pid);

/// Collects a child's exit through its pidfd without blocking.
/// Returns 1 with code/signal set when it had exited, 0 if it is still running, -1 with errno on
/// error (ECHILD: not our child, e.g. adopted after an agent restart).
int flotilla_pidfd_reap(int pidfd, int *exit_code, int *signal);

/// Sends a signal through a pidfd (never hits a process that reused the pid).
int flotilla_pidfd_signal(int pidfd, int signal);

/// A non-blocking, close-on-exec eventfd for waking a poll loop.
int flotilla_eventfd(void);

/// Raises the agent's soft open-file limit to its hard limit (an instance holds a descriptor of
/// the agent's); children started afterwards get the original limit back. Returns the limit now
/// (-1: unlimited or unknown).
long flotilla_raise_open_file_limit(void);

/// An epoll instance (close-on-exec), and descriptors added to it for reading, or removed.
int flotilla_epoll_create(void);
int flotilla_epoll_add(int epoll_fd, int fd);
int flotilla_epoll_remove(int epoll_fd, int fd);

/// Blocks until descriptors are ready; fills `ready_fds` with up to `capacity` (at most 256) of
/// them and returns how many, or -1 with errno.
int flotilla_epoll_wait(int epoll_fd, int *ready_fds, int capacity);

#endif
