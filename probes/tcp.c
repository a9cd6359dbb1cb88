/* TCP lifecycle from sock_ops. These callbacks often run in softirq context,
 * where the current task is unrelated: the owner comes from socket storage. */
#include "common.h"

#define TCP_CLOSE 7

static __always_inline void endpoints_from_ops(struct bpf_sock_ops *ops, struct endpoints *ep)
{
    ep->family = ops->family;
    ep->protocol = IPPROTO_TCP;
    ep->socktype = SOCK_STREAM;
    ep->sport = ops->local_port;
    ep->dport = bpf_ntohl(ops->remote_port);
    if (ops->family == AF_INET) {
        __u32 l = ops->local_ip4, r = ops->remote_ip4;
        __builtin_memcpy(ep->saddr, &l, 4);
        __builtin_memcpy(ep->daddr, &r, 4);
    } else {
        __u32 l[4] = {ops->local_ip6[0], ops->local_ip6[1], ops->local_ip6[2], ops->local_ip6[3]};
        __u32 r[4] = {ops->remote_ip6[0], ops->remote_ip6[1], ops->remote_ip6[2], ops->remote_ip6[3]};
        __builtin_memcpy(ep->saddr, l, 16);
        __builtin_memcpy(ep->daddr, r, 16);
    }
}

static __always_inline void emit(struct bpf_sock_ops *ops, struct sock_state *st, __u32 type)
{
    struct net_record *r = flow_record(type, bpf_get_socket_cookie(ops), st);
    if (r)
        events.ringbuf_submit(r, SUBMIT_FLAGS);
}

int on_sock_ops(struct bpf_sock_ops *ops)
{
    /* sock_ops runs about 17 times per connection: leave early for the ops
     * and state changes that are not reported. */
    __u32 op = ops->op;
    switch (op) {
    case BPF_SOCK_OPS_TCP_CONNECT_CB:
        /* Ask for state changes so that failed handshakes are seen too. Every
         * socket here is in an episode cgroup: no need to look at its owner. */
        bpf_sock_ops_cb_flags_set(ops, ops->bpf_sock_ops_cb_flags | BPF_SOCK_OPS_STATE_CB_FLAG);
        return 1;
    case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB:
    case BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB:
    case BPF_SOCK_OPS_TCP_LISTEN_CB:
        break;
    case BPF_SOCK_OPS_STATE_CB:
        if (ops->args[1] == TCP_CLOSE)
            break;
        return 1;
    default:
        return 1;
    }
    struct bpf_sock *sk = ops->sk;
    if (!sk)
        return 1;
    struct sock_state *st = sockets.sk_storage_get(sk, 0, 0);
    if (op == BPF_SOCK_OPS_TCP_LISTEN_CB && (!st || !st->owner.tgid)) {
        /* listen() runs this in the caller's context: a listener that never called
         * bind() (the kernel picked its port) gets its owner here, for what it accepts. */
        __u64 episode = current_episode();
        if (episode)
            st = owned_state(sk, episode);
    }
    if (!st || !st->owner.episode_cgroup_id)
        return 1;   /* not created under a registered episode */

    switch (op) {
    case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB:
        endpoints_from_ops(ops, &st->ep);
        st->flags |= FLOW_INITIATED | FLOW_ESTABLISHED;
        bpf_sock_ops_cb_flags_set(ops, ops->bpf_sock_ops_cb_flags | BPF_SOCK_OPS_STATE_CB_FLAG);
        emit(ops, st, REC_ESTABLISHED);
        break;
    case BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB:
        /* The storage was cloned from the listener: start this flow afresh. */
        endpoints_from_ops(ops, &st->ep);
        __builtin_memset(&st->c, 0, sizeof(st->c));
        __builtin_memset(&st->a, 0, sizeof(st->a));
        st->captured_out = st->captured_in = 0;
        st->last_update_ns = 0;
        st->start_ns = bpf_ktime_get_ns();
        st->flags = FLOW_ACCEPTED | FLOW_ESTABLISHED;
        /* Inbound: routine when this peer reached this listening port before. */
        struct destination peer = {.episode = st->owner.episode_cgroup_id, .port = st->ep.sport,
                                   .family = st->ep.family, .protocol = IPPROTO_TCP, .inbound = 1};
        __builtin_memcpy(peer.addr, st->ep.daddr, 16);
        st->routine = admit_flow(st->owner.episode_cgroup_id, known_destination(&peer), TCP_IN_RECORDS);
        bpf_sock_ops_cb_flags_set(ops, ops->bpf_sock_ops_cb_flags | BPF_SOCK_OPS_STATE_CB_FLAG);
        emit(ops, st, REC_ACCEPTED);
        break;
    case BPF_SOCK_OPS_TCP_LISTEN_CB:
        endpoints_from_ops(ops, &st->ep);
        emit(ops, st, REC_LISTENING);
        break;
    case BPF_SOCK_OPS_STATE_CB:      /* to TCP_CLOSE */
        if (!(st->flags & FLOW_ESTABLISHED))
            st->flags |= FLOW_FAILED;
        emit(ops, st, REC_FLOW_ENDED);
        break;
    }
    return 1;
}
