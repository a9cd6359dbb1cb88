/* Process and syscall tracepoints. They fire host-wide, so each first checks
 * that the current task is inside an episode; host processes cost one lookup. */
#include "common.h"

/* tid -> socket() arguments of a non-inet socket in flight (packet sockets, ...); entered only, for any
 * socket() of an episode whose policy refuses packet sockets (see sys_exit_socket). */
struct socket_args {
    __u32 family;
    __u32 type;
    __u32 protocol;
    __u32 entered_only;
};
BPF_F_TABLE(PINNED("hash", sockets_in_flight), __u64, struct socket_args, sockets_in_flight, 16384, 0);
/* tgid -> exit_group() status, read when the process's last thread exits. */
BPF_F_TABLE(PINNED("hash", exit_codes), __u32, __s32, exit_codes, 16384, 0);
/* tid -> ARGV_FAILED: an exec whose argv the kernel could not read (or whose ARGS record was lost);
 * sched_process_exec then holds the new program until userspace has read its argv. ARGV_CUT: one
 * too long to read whole, which userspace reads from /proc without a hold. */
BPF_F_TABLE(PINNED("hash", argv_unread), __u32, __u8, argv_unread, 16384, 0);

#ifndef SIGSTOP
#define SIGSTOP 19
#endif

static __always_inline struct process_record *process_record(__u32 type, __u64 episode)
{
    struct process_record *r = reserve_process(episode);
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

/* Forks and exits are routine (a fork flood must not crowd out the others' records):
 * they come out of the episode's budget. Execs, argv and stdio duplication do not. */
TRACEPOINT_PROBE(sched, sched_process_fork)
{
    __u64 episode = current_episode();
    if (!episode || !within_budget(episode))
        return 0;
    struct process_record *r = process_record(REC_PROCESS_FORKED, episode);
    if (!r)
        return 0;
    r->parent_tgid = r->h.owner.tgid;
    r->child_pid = args->child_pid;
    events.ringbuf_submit(r, SUBMIT_FLAGS);
    return 0;
}

/* Remember (how: ARGV_FAILED or ARGV_CUT) or forget (0) that this thread's exec has argv the kernel could
 * not read whole. */
static __always_inline void note_argv_unread(__u64 episode, __u32 tid, __u8 how)
{
    if (!how) {
        if (argv_unread.lookup(&tid))
            argv_unread.delete(&tid);   /* left by an earlier exec of this thread that failed */
        return;
    }
    if (argv_unread.update(&tid, &how))
        count_lost(episode, LOST_ARGV_MAP_FULL);
}

static __always_inline int record_argv(const char *const *argv)
{
    __u64 episode = current_episode();
    if (!episode)
        return 0;
    __u32 tid = (__u32)bpf_get_current_pid_tgid();
    struct process_record *r = process_record(REC_PROCESS_ARGS, episode);
    if (!r) {
        note_argv_unread(episode, tid, ARGV_FAILED);
        return 0;
    }
    __u64 off = 0;
    __u32 how = ARGV_CUT;          /* unless the terminating NULL is reached below */
    for (int i = 0; i < MAX_ARGS; i++) {
        const char *arg = 0;
        if (bpf_probe_read_user(&arg, sizeof(arg), &argv[i])) {
            how = ARGV_FAILED;
            break;
        }
        if (!arg) {
            how = 0;
            break;
        }
        /* The mask keeps the verifier sure of the bound; data has ARG_CHUNK slack. */
        asm volatile("%[off] &= %[mask]" : [off] "+r"(off) : [mask] "i"(ARGS_LEN - 1));
        long n = bpf_probe_read_user_str(&r->data[off], ARG_CHUNK, arg);
        if (n <= 0) {
            how = ARGV_FAILED;
            break;
        }
        off += n;
        if (n >= ARG_CHUNK || off >= ARGS_LEN)
            break;                 /* cut: an argument or argv too long */
    }
    r->data_len = off < ARGS_LEN ? off : ARGS_LEN;
    r->child_pid = how;
    if (how)
        count_lost(episode, LOST_ARGV_UNREAD);
    note_argv_unread(episode, tid, how);
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
    __u32 old_tid = args->old_pid;
    __u8 *unread = argv_unread.lookup(&old_tid);
    __u64 flags = SUBMIT_FLAGS;
    if (unread) {
        /* A failed read is what hiding argv looks like: the program stops before its first instruction,
         * userspace reads its argv, then sends SIGCONT. The signal goes first, so that the record never
         * announces a hold that is not there. A cut one is a long command line (compilers): not held.
         * Either way userspace reads /proc now, while the process is there. */
        if (*unread == ARGV_FAILED && bpf_send_signal(SIGSTOP) == 0)
            r->child_pid = EXEC_HELD;
        argv_unread.delete(&old_tid);
        flags = SUBMIT_NOW;
    }
    __u16 loc = args->data_loc_filename & 0xFFFF;
    long n = bpf_probe_read_str(r->data, PATH_LEN, (char *)args + loc);
    r->data_len = n > 0 ? n : 0;
    events.ringbuf_submit(r, flags);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_exit_group)
{
    __u64 episode = current_episode();
    if (!episode)
        return 0;
    __u32 tgid = bpf_get_current_pid_tgid() >> 32;
    __s32 code = args->error_code;
    if (exit_codes.update(&tgid, &code))
        count_lost(episode, LOST_EXIT_CODES_MAP_FULL);
    return 0;
}

TRACEPOINT_PROBE(sched, sched_process_exit)
{
    if (!args->group_dead)
        return 0;
    note_tracer_exit();
    __u64 episode = current_episode();
    if (!episode)
        return 0;
    __u32 tgid = bpf_get_current_pid_tgid() >> 32;
    struct process_record *r = within_budget(episode) ? process_record(REC_PROCESS_EXITED, episode) : 0;
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

#define AF_PACKET_FAMILY 17

static __always_inline int packet_sockets_refused(__u64 episode)
{
    struct episode_policy *p = episode_policy(episode);
    return p && !p->raw_sockets;
}

/* Inet sockets are seen by cgroup/sock_create; other families only here. */
TRACEPOINT_PROBE(syscalls, sys_enter_socket)
{
    int family = args->family;
    __u64 tid = bpf_get_current_pid_tgid();
    if (family == AF_INET || family == AF_INET6 || family == AF_UNIX || family == AF_NETLINK) {
        /* Only where packet sockets are refused: remember that this call was entered, so that its exit
         * is not taken for one that seccomp refused before any tracepoint ran. */
        __u64 episode = current_episode();
        if (episode && packet_sockets_refused(episode)) {
            struct socket_args seen = {.family = family, .entered_only = 1};
            sockets_in_flight.update(&tid, &seen);
        }
        return 0;
    }
    __u64 episode = current_episode();
    if (!episode)
        return 0;
    /* No cgroup hook sees packet sockets: a policy with raw_sockets = false kills the process
     * before socket() returns to it (a tracepoint cannot make the call fail). */
    if (family == AF_PACKET_FAMILY && packet_sockets_refused(episode)) {
        denied.increment(episode);
        bpf_send_signal(9);         /* SIGKILL */
    }
    struct socket_args a = {.family = family, .type = args->type, .protocol = args->protocol};
    if (sockets_in_flight.update(&tid, &a))
        count_lost(episode, LOST_SOCKETS_MAP_FULL);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_exit_socket)
{
    __u64 tid = bpf_get_current_pid_tgid();
    struct socket_args *a = sockets_in_flight.lookup(&tid);
    struct socket_args saved = {};
    __u64 episode;
    int entered = a != 0;
    if (a) {
        saved = *a;
        sockets_in_flight.delete(&tid);
        if (saved.entered_only)
            return 0;
        episode = current_episode();
    } else {
        /* A socket() refused with EPERM that no sys_enter_socket saw, in an episode whose policy refuses
         * packet sockets: seccomp refused it before the tracepoints ran. eptrace run's filter refuses only
         * AF_PACKET (tracer/kernel/seccomp.py), so it is reported as one. */
        if (args->ret != -1)
            return 0;
        episode = current_episode();
        if (!episode || !packet_sockets_refused(episode))
            return 0;
        denied.increment(episode);
        saved.family = AF_PACKET_FAMILY;
        saved.type = SOCK_RAW;
    }
    struct socket_record *r = reserve_socket(episode);
    if (!r)
        return 0;
    struct owner o = {};
    fill_current_owner(&o, episode);
    fill_header(&r->h, REC_SOCKET_CREATED, sizeof(*r), 0, &o);
    r->family = saved.family;
    r->type = saved.type & 0xf;   /* drop SOCK_NONBLOCK / SOCK_CLOEXEC */
    r->protocol = saved.protocol;
    r->ret = entered && saved.family == AF_PACKET_FAMILY && packet_sockets_refused(episode) ? -1 : args->ret;  /* -EPERM */
    events.ringbuf_submit(r, SUBMIT_FLAGS);
    return 0;
}

/* A socket asked for through io_uring (IORING_OP_SOCKET) passes no socket tracepoint, and the tracepoint
 * of its submission shows only the opcode, not the family (reading the request would mean a kernel struct).
 * An inet one still meets cgroup/sock_create; a packet one meets nothing. So every such request is
 * reported (family unknown), and an episode that refuses packet sockets has the process killed: fail
 * closed, since it may be one. */
#define IORING_OP_SOCKET_OPCODE 45      /* enum io_uring_op in linux/io_uring.h */
TRACEPOINT_PROBE(io_uring, io_uring_submit_req)
{
    if (args->opcode != IORING_OP_SOCKET_OPCODE)
        return 0;
    __u64 episode = current_episode();
    if (!episode)
        return 0;
    int refused = packet_sockets_refused(episode);
    if (refused) {
        denied.increment(episode);
        bpf_send_signal(9);         /* SIGKILL */
    }
    struct socket_record *r = reserve_socket(episode);
    if (!r)
        return 0;
    struct owner o = {};
    fill_current_owner(&o, episode);
    fill_header(&r->h, REC_SOCKET_CREATED, sizeof(*r), 0, &o);
    r->family = SOCKET_FAMILY_IO_URING;
    r->type = 0;
    r->protocol = 0;
    r->ret = refused ? -1 : 0;      /* -EPERM */
    events.ringbuf_submit(r, SUBMIT_FLAGS);
    return 0;
}

/* A connect made through the syscall reports its result here; io_uring's does not. */
#ifndef EINPROGRESS
#define EINPROGRESS 115
#endif
/* Drop a result left pending by an io_uring connect, which has no syscall exit. Every connect on the
 * host passes here: a thread that never connected in an episode has no storage, one lookup. */
TRACEPOINT_PROBE(syscalls, sys_enter_connect)
{
    struct connect_in_flight *pending = connect_pending(0);
    if (pending)
        pending->cookie = 0;
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_exit_connect)
{
    struct connect_in_flight *pending = connect_pending(0);
    if (!pending || !pending->cookie)
        return 0;
    __u64 c = pending->cookie;
    __u32 protocol = pending->protocol, routine = pending->routine;
    pending->cookie = 0;
    /* A TCP connect that succeeds, or is in progress, reports itself when established. */
    if (protocol == IPPROTO_TCP && (args->ret == 0 || args->ret == -EINPROGRESS))
        return 0;
    __u64 episode = current_episode();
    if (!flow_admitted(episode, routine))
        return 0;                 /* paid for with the connect, or refused with it */
    struct net_record *r = reserve_net(episode);
    if (!r)
        return 0;
    __builtin_memset(&r->ep, 0, sizeof(r->ep));
    __builtin_memset(&r->c, 0, sizeof(r->c));
    __builtin_memset(&r->a, 0, sizeof(r->a));
    struct owner o = {};
    fill_current_owner(&o, episode);
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
