#define _GNU_SOURCE
#include "CFlotillaSpawn.h"

#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#ifndef SYS_pidfd_open
#define SYS_pidfd_open 434
#endif
#ifndef SYS_pidfd_send_signal
#define SYS_pidfd_send_signal 424
#endif
#ifndef SYS_close_range
#define SYS_close_range 436
#endif
#ifndef P_PIDFD
#define P_PIDFD 3
#endif

static void report_and_exit(int pipe_fd, int stage) {
    int message[2] = {stage, errno};
    ssize_t ignored = write(pipe_fd, message, sizeof(message));
    (void)ignored;
    _exit(127);
}

static void close_all_except(int keep) {
    if (keep > 3) syscall(SYS_close_range, 3U, (unsigned)(keep - 1), 0U);
    if (syscall(SYS_close_range, (unsigned)(keep + 1), ~0U, 0U) != 0) {
        for (int fd = keep + 1; fd < 4096; fd++) close(fd);
    }
}

/* The open-file limit the agent started with, given back to what it starts (as Go's os/exec
 * does): a program that closes every descriptor up to its limit must not loop a million times. */
static struct rlimit original_open_files;
static int open_files_raised = 0;

long flotilla_raise_open_file_limit(void) {
    struct rlimit limit;
    if (getrlimit(RLIMIT_NOFILE, &limit) != 0) return -1;
    if (!open_files_raised) original_open_files = limit;
    if (limit.rlim_cur < limit.rlim_max) {
        struct rlimit raised = {limit.rlim_max, limit.rlim_max};
        if (setrlimit(RLIMIT_NOFILE, &raised) == 0) {
            open_files_raised = 1;
            limit = raised;
        }
    }
    return limit.rlim_cur == RLIM_INFINITY ? -1 : (long)limit.rlim_cur;
}

typedef struct {
    const flotilla_spawn_request *request;
    int pipe_fd;
    int unused_pipe_fd;
} child_arguments;

/* Runs in the child, which shares the parent's memory until it execs (CLONE_VM | CLONE_VFORK):
 * it only makes system calls, never glibc calls that take locks or touch other threads (setuid
 * and friends in glibc signal every thread of a multithreaded process, so they go through
 * syscall(2) here). Signals arrive blocked; handlers are reset before they are unblocked, so no
 * handler of the agent ever runs on this stack. */
static int child_main(void *argument) {
    const child_arguments *arguments = argument;
    const flotilla_spawn_request *request = arguments->request;
    int pipe_fd = arguments->pipe_fd;
    close(arguments->unused_pipe_fd);
    struct sigaction default_action;
    memset(&default_action, 0, sizeof(default_action));
    default_action.sa_handler = SIG_DFL;
    for (int signal_number = 1; signal_number < NSIG; signal_number++) {
        if (signal_number == SIGKILL || signal_number == SIGSTOP) continue;
        sigaction(signal_number, &default_action, NULL);
    }
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    if (open_files_raised) syscall(SYS_prlimit64, 0, RLIMIT_NOFILE, &original_open_files, NULL);
    if (setsid() < 0) report_and_exit(pipe_fd, 2);
    for (int index = 0; index < request->cgroup_count; index++) {
        int fd = open(request->cgroup_procs_files[index], O_WRONLY | O_CLOEXEC);
        if (fd < 0) report_and_exit(pipe_fd, 3);
        if (write(fd, "0", 1) != 1) report_and_exit(pipe_fd, 3);
        close(fd);
    }
    int null_fd = open("/dev/null", O_RDONLY);
    if (null_fd < 0) report_and_exit(pipe_fd, 4);
    if (dup2(null_fd, 0) < 0) report_and_exit(pipe_fd, 4);
    if (dup2(request->stdout_fd, 1) < 0) report_and_exit(pipe_fd, 4);
    if (dup2(request->stderr_fd, 2) < 0) report_and_exit(pipe_fd, 4);
    /* Keep the status pipe above the standard descriptors while closing the rest. */
    if (pipe_fd <= 2) {
        int moved = fcntl(pipe_fd, F_DUPFD_CLOEXEC, 3);
        if (moved < 0) _exit(127);
        pipe_fd = moved;
    }
    close_all_except(pipe_fd);
    if (request->set_user) {
        if (syscall(SYS_setgroups, (size_t)request->group_count, request->groups) != 0) report_and_exit(pipe_fd, 7);
        if (syscall(SYS_setresgid, request->gid, request->gid, request->gid) != 0) report_and_exit(pipe_fd, 7);
        if (syscall(SYS_setresuid, request->uid, request->uid, request->uid) != 0) report_and_exit(pipe_fd, 7);
    }
    if (request->working_directory && chdir(request->working_directory) != 0) report_and_exit(pipe_fd, 5);
    execve(request->path, request->argv, request->envp);
    report_and_exit(pipe_fd, 6);
    return 127;
}

/* The child's stack: generous for the few calls above, and freed once the child has exec'd or
 * exited (CLONE_VFORK suspends this thread until then). */
#define CHILD_STACK_BYTES (256 * 1024)

pid_t flotilla_spawn(const flotilla_spawn_request *request, int *error_stage, int *error_number) {
    int status_pipe[2];
    if (pipe2(status_pipe, O_CLOEXEC) != 0) {
        *error_stage = 1;
        *error_number = errno;
        return -1;
    }
    void *stack = mmap(NULL, CHILD_STACK_BYTES, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_STACK, -1, 0);
    if (stack == MAP_FAILED) {
        *error_stage = 1;
        *error_number = errno;
        close(status_pipe[0]);
        close(status_pipe[1]);
        return -1;
    }
    child_arguments arguments = {request, status_pipe[1], status_pipe[0]};
    /* No fork: copying the agent's page tables and then faulting every page it writes afterwards
     * cost more than the start itself once the agent held thousands of instances. */
    sigset_t all, previous;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &previous);
    pid_t pid = clone(child_main, (char *)stack + CHILD_STACK_BYTES, CLONE_VM | CLONE_VFORK | SIGCHLD, &arguments);
    int clone_errno = errno;
    pthread_sigmask(SIG_SETMASK, &previous, NULL);
    munmap(stack, CHILD_STACK_BYTES);
    if (pid < 0) {
        *error_stage = 1;
        *error_number = clone_errno;
        close(status_pipe[0]);
        close(status_pipe[1]);
        return -1;
    }
    close(status_pipe[1]);
    int message[2];
    ssize_t count;
    do {
        count = read(status_pipe[0], message, sizeof(message));
    } while (count < 0 && errno == EINTR);
    close(status_pipe[0]);
    if (count == (ssize_t)sizeof(message)) {
        int ignored_status;
        while (waitpid(pid, &ignored_status, 0) < 0 && errno == EINTR) {}
        *error_stage = message[0];
        *error_number = message[1];
        return -1;
    }
    return pid;
}

int flotilla_pidfd_open(pid_t pid) {
    return (int)syscall(SYS_pidfd_open, pid, 0);
}

int flotilla_pidfd_reap(int pidfd, int *exit_code, int *signal) {
    siginfo_t info;
    memset(&info, 0, sizeof(info));
    if (waitid(P_PIDFD, (id_t)pidfd, &info, WEXITED | WNOHANG) != 0) return -1;
    if (info.si_pid == 0) return 0;
    if (info.si_code == CLD_EXITED) {
        *exit_code = info.si_status;
        *signal = 0;
    } else {
        *exit_code = -1;
        *signal = info.si_status;
    }
    return 1;
}

int flotilla_pidfd_signal(int pidfd, int signal) {
    return (int)syscall(SYS_pidfd_send_signal, pidfd, signal, NULL, 0);
}

int flotilla_eventfd(void) {
    return eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
}

int flotilla_epoll_create(void) {
    return epoll_create1(EPOLL_CLOEXEC);
}

int flotilla_epoll_add(int epoll_fd, int fd) {
    struct epoll_event event;
    memset(&event, 0, sizeof(event));
    event.events = EPOLLIN;
    event.data.fd = fd;
    return epoll_ctl(epoll_fd, EPOLL_CTL_ADD, fd, &event);
}

int flotilla_epoll_remove(int epoll_fd, int fd) {
    return epoll_ctl(epoll_fd, EPOLL_CTL_DEL, fd, NULL);
}

int flotilla_epoll_wait(int epoll_fd, int *ready_fds, int capacity) {
    struct epoll_event events[256];
    if (capacity > 256) capacity = 256;
    int count = epoll_wait(epoll_fd, events, capacity, -1);
    for (int index = 0; index < count; index++) ready_fds[index] = events[index].data.fd;
    return count;
}
