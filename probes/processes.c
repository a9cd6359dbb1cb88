/* Process and syscall tracepoints. They fire host-wide, so each first checks
 * that the current task is inside an episode; host processes cost one lookup. */
#include "common.h"

/* tid -> socket() arguments of a non-inet socket in flight (packet sockets, ...). */
struct socket_args {
    __u32 family;
    __u32 type;
    __u32 protocol;
};
BPF_F_TABLE(PINNED("hash", sockets_in_flight), __u64, struct socket_args, sockets_in_flight, 16384, 0);
/* tgid -> exit_group() status, read when the process's last thread exits. */
BPF_F_TABLE(PINNED("hash", exit_codes), __u32, __s32, exit_codes, 16384, 0);

static __always_inline struct process_record *process_record(__u32 type, __u64 episode)
{
    struct process_record *r = reserve_process();
    if (!r)
        return 0;
    struct owner o = {};
    fill_current_owner(&o, episode);
    fill_header(&r->h, type, sizeof(*r), 0, &o);
    r->parent_tgid = 0;
    r->child_pid = 0;
    r->exit_code = 0;
    r->data_len = 0;
    return r;
}

TRACEPOINT_PROBE(sched, sched_process_fork)
{
    __u64 episode = current_episode();
    if (!episode)
        return 0;
    struct process_record *r = process_record(REC_PROCESS_FORKED, episode);
    if (!r)
        return 0;
    r->parent_tgid = r->h.owner.tgid;
    r->child_pid = args->child_pid;
    events.ringbuf_submit(r, SUBMIT_FLAGS);
    return 0;
}

static __always_inline int record_argv(const char *const *argv)
{
    __u64 episode = current_episode();
    if (!episode)
        return 0;
    struct process_record *r = process_record(REC_PROCESS_ARGS, episode);
    if (!r)
        return 0;
    __u64 off = 0;
    for (int i = 0; i < MAX_ARGS; i++) {
        const char *arg = 0;
        if (bpf_probe_read_user(&arg, sizeof(arg), &argv[i]) || !arg)
            break;
        /* The mask keeps the verifier sure of the bound; data has ARG_CHUNK slack. */
        asm volatile("%[off] &= %[mask]" : [off] "+r"(off) : [mask] "i"(ARGS_LEN - 1));
        long n = bpf_probe_read_user_str(&r->data[off], ARG_CHUNK, arg);
        if (n <= 0)
            break;
        off += n;
        if (off >= ARGS_LEN)
            break;
    }
    r->data_len = off < ARGS_LEN ? off : ARGS_LEN;
    events.ringbuf_submit(r, SUBMIT_FLAGS);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_execve) { return record_argv(args->argv); }
TRACEPOINT_PROBE(syscalls, sys_enter_execveat) { return record_argv(args->argv); }

TRACEPOINT_PROBE(sched, sched_process_exec)
{
    __u64 episode = current_episode();
    if (!episode)
        return 0;
    struct process_record *r = process_record(REC_PROCESS_EXEC, episode);
    if (!r)
        return 0;
    r->parent_tgid = args->old_pid;
    __u16 loc = args->data_loc_filename & 0xFFFF;
    long n = bpf_probe_read_str(r->data, PATH_LEN, (char *)args + loc);
    r->data_len = n > 0 ? n : 0;
    events.ringbuf_submit(r, SUBMIT_FLAGS);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_exit_group)
{
    if (!current_episode())
        return 0;
    __u32 tgid = bpf_get_current_pid_tgid() >> 32;
    __s32 code = args->error_code;
    exit_codes.update(&tgid, &code);
    return 0;
}

TRACEPOINT_PROBE(sched, sched_process_exit)
{
    if (!args->group_dead)
        return 0;
    __u64 episode = current_episode();
    if (!episode)
        return 0;
    __u32 tgid = bpf_get_current_pid_tgid() >> 32;
    struct process_record *r = process_record(REC_PROCESS_EXITED, episode);
    if (!r) {
        exit_codes.delete(&tgid);
        return 0;
    }
    __s32 *code = exit_codes.lookup(&tgid);
    r->exit_code = code ? *code : -1;
    exit_codes.delete(&tgid);
    events.ringbuf_submit(r, SUBMIT_FLAGS);
    return 0;
}

/* Inet sockets are seen by cgroup/sock_create; other families only here. */
TRACEPOINT_PROBE(syscalls, sys_enter_socket)
{
    int family = args->family;
    if (family == AF_INET || family == AF_INET6 || family == AF_UNIX || family == AF_NETLINK)
        return 0;
    if (!current_episode())
        return 0;
    __u64 tid = bpf_get_current_pid_tgid();
    struct socket_args a = {.family = family, .type = args->type, .protocol = args->protocol};
    sockets_in_flight.update(&tid, &a);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_exit_socket)
{
    __u64 tid = bpf_get_current_pid_tgid();
    struct socket_args *a = sockets_in_flight.lookup(&tid);
    if (!a)
        return 0;
    struct socket_args saved = *a;
    sockets_in_flight.delete(&tid);
    __u64 episode = current_episode();
    struct socket_record *r = reserve_socket();
    if (!r)
        return 0;
    struct owner o = {};
    fill_current_owner(&o, episode);
    fill_header(&r->h, REC_SOCKET_CREATED, sizeof(*r), 0, &o);
    r->family = saved.family;
    r->type = saved.type & 0xf;   /* drop SOCK_NONBLOCK / SOCK_CLOEXEC */
    r->protocol = saved.protocol;
    r->ret = args->ret;
    events.ringbuf_submit(r, SUBMIT_FLAGS);
    return 0;
}

/* A connect made through the syscall reports its result here; io_uring's does not. */
#ifndef EINPROGRESS
#define EINPROGRESS 115
#endif
/* Drop a result left pending by an io_uring connect, which has no syscall exit.
 * Every connect on the host passes here: a lookup is lock-free, a delete is not. */
TRACEPOINT_PROBE(syscalls, sys_enter_connect)
{
    __u64 tid = bpf_get_current_pid_tgid();
    if (connects_in_flight.lookup(&tid))
        connects_in_flight.delete(&tid);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_exit_connect)
{
    __u64 tid = bpf_get_current_pid_tgid();
    struct connect_in_flight *pending = connects_in_flight.lookup(&tid);
    if (!pending)
        return 0;
    __u64 c = pending->cookie;
    __u32 protocol = pending->protocol;
    connects_in_flight.delete(&tid);
    /* A TCP connect that succeeds, or is in progress, reports itself when established. */
    if (protocol == IPPROTO_TCP && (args->ret == 0 || args->ret == -EINPROGRESS))
        return 0;
    struct net_record *r = reserve_net();
    if (!r)
        return 0;
    __builtin_memset(&r->ep, 0, sizeof(r->ep));
    __builtin_memset(&r->c, 0, sizeof(r->c));
    __builtin_memset(&r->a, 0, sizeof(r->a));
    struct owner o = {};
    fill_current_owner(&o, current_episode());
    fill_header(&r->h, REC_CONNECT_RESULT, sizeof(*r), c, &o);
    r->start_ns = 0;
    r->flags = 0;
    r->ret = args->ret;
    events.ringbuf_submit(r, SUBMIT_FLAGS);
    return 0;
}

/* A descriptor duplicated onto stdin, stdout or stderr: userspace checks whether
 * it is a socket (a reverse shell's tell) while the process still holds it. */
static __always_inline int record_stdio_dup(unsigned int oldfd, unsigned int newfd)
{
    if (newfd > 2 || oldfd == newfd)
        return 0;
    __u64 episode = current_episode();
    if (!episode)
        return 0;
    struct process_record *r = process_record(REC_STDIO_DUP, episode);
    if (!r)
        return 0;
    r->parent_tgid = oldfd;
    r->child_pid = newfd;
    events.ringbuf_submit(r, SUBMIT_FLAGS);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_dup2) { return record_stdio_dup(args->oldfd, args->newfd); }
TRACEPOINT_PROBE(syscalls, sys_enter_dup3) { return record_stdio_dup(args->oldfd, args->newfd); }
