/* Cgroup socket hooks, attached to each episode cgroup. They run in the
 * calling task's context (for io_uring too), so the owner is true here. */
#include "common.h"

/* (cookie, destination) pairs already reported by udp_sent. */
struct udp_dest {
    __u64 cookie;
    __u8 daddr[16];
    __u16 dport;
    __u16 family;
    __u32 pad;
};
BPF_F_TABLE(PINNED("lru_hash", udp_dests_seen), struct udp_dest, __u8, udp_dests_seen, 65536, 0);

static __always_inline int ordinary_inet(__u32 type, __u32 protocol)
{
    return (type == SOCK_STREAM && (protocol == 0 || protocol == IPPROTO_TCP)) ||
           (type == SOCK_DGRAM && (protocol == 0 || protocol == IPPROTO_UDP));
}

/* Unusual sockets (raw, ICMP, SCTP...) are reported at creation. Ordinary TCP
 * and UDP sockets get their owner recorded when they connect, bind or send:
 * doing it here too would cost every socket an allocation (make bench). */
int on_sock_create(struct bpf_sock *sk)
{
    if (ordinary_inet(sk->type, sk->protocol))
        return 1;
    __u64 episode = current_episode();
    if (!episode)
        return 1;
    /* A policy with raw_sockets = false refuses raw sockets here (socket() fails with EPERM), and so
     * does fail-closed while no tracer is alive (a raw socket's packets would need no connect). */
    struct episode_policy *p = episode_policy(episode);
    int verdict = !(p && !p->raw_sockets && sk->type == SOCK_RAW);
    if (!verdict)
        denied.increment(episode);
    else if (sk->type == SOCK_RAW && refuse_without_tracer(episode))
        verdict = 0;
    else
        owned_state(sk, episode);
    struct socket_record *r = reserve_socket(episode);
    if (!r)
        return verdict;
    struct owner o = {};
    fill_current_owner(&o, episode);
    fill_header(&r->h, REC_SOCKET_CREATED, sizeof(*r), bpf_get_socket_cookie(sk), &o);
    r->family = sk->family;
    r->type = sk->type;
    r->protocol = sk->protocol;
    r->ret = verdict ? 0 : -1;      /* -EPERM */
    events.ringbuf_submit(r, SUBMIT_FLAGS);
    return verdict;
}

/* A UDP socket that saw traffic ends here; TCP ends in sock_ops. */
int on_sock_release(struct bpf_sock *sk)
{
    if (sk->protocol == IPPROTO_TCP)
        return 1;
    struct sock_state *st = sockets.sk_storage_get(sk, 0, 0);
    if (!st || !st->owner.episode_cgroup_id ||
        !(st->flags & FLOW_INITIATED) && st->c.packets_out + st->c.packets_in == 0)
        return 1;
    struct net_record *r = flow_record(REC_FLOW_ENDED, bpf_get_socket_cookie(sk), st);
    if (!r)
        return 1;
    r->ep.family = sk->family;      /* an unconnected socket has no endpoints recorded */
    r->ep.protocol = sk->protocol;
    r->ep.socktype = sk->type;
    events.ringbuf_submit(r, SUBMIT_FLAGS);
    return 1;
}

static __always_inline void addr_from_ctx(struct bpf_sock_addr *ctx, __u8 *addr, __u16 family)
{
    if (family == AF_INET) {
        __u32 a = ctx->user_ip4;
        __builtin_memcpy(addr, &a, 4);
    } else {
        __u32 a[4] = {ctx->user_ip6[0], ctx->user_ip6[1], ctx->user_ip6[2], ctx->user_ip6[3]};
        __builtin_memcpy(addr, a, 16);
    }
}

static __always_inline int on_connect(struct bpf_sock_addr *ctx, __u16 family)
{
    __u64 episode = current_episode();
    if (!episode)
        return 1;
    /* A refused connect is still recorded: its failure (EPERM) is evidence. */
    __u8 daddr[16] = {};
    addr_from_ctx(ctx, daddr, family);
    __s32 entry = 0;
    int refused = policy_refuses(episode, family, daddr, bpf_ntohs(ctx->user_port), ctx->protocol, &entry);
    if (refused)
        denied.increment(episode);
    int verdict = refused || refuse_without_tracer(episode) ? 0 : 1;
    struct bpf_sock *sk = ctx->sk;
    if (!sk)
        return verdict;
    struct sock_state *st = owned_state(sk, episode);
    __u64 cookie = bpf_get_socket_cookie(ctx);
    struct destination dest = {.episode = episode, .port = bpf_ntohs(ctx->user_port), .family = family,
                               .protocol = ctx->protocol};
    addr_from_ctx(ctx, dest.addr, family);
    __u8 routine = admit_flow(episode, known_destination(&dest), TCP_OUT_RECORDS);
    if (st)
        st->routine = routine;
    struct net_record *r = flow_admitted(episode, routine) ? reserve_net(episode) : 0;
    if (r) {
        __builtin_memset(&r->ep, 0, sizeof(r->ep));
        __builtin_memset(&r->c, 0, sizeof(r->c));
        __builtin_memset(&r->a, 0, sizeof(r->a));
        struct owner o = {};
        if (st)
            o = st->owner;
        else
            fill_current_owner(&o, episode);
        fill_header(&r->h, REC_CONNECT, sizeof(*r), cookie, &o);
        addr_from_ctx(ctx, r->ep.daddr, family);
        r->ep.dport = bpf_ntohs(ctx->user_port);
        r->ep.family = family;
        r->ep.protocol = ctx->protocol;
        r->ep.socktype = ctx->type;
        r->start_ns = r->h.ts_ns;
        r->flags = FLOW_INITIATED | (refused ? FLOW_DENIED : 0);
        r->ret = refused ? entry : 0;
        if (st) {
            st->ep = r->ep;
            st->flags |= FLOW_INITIATED;
            st->start_ns = r->h.ts_ns;
        }
        events.ringbuf_submit(r, SUBMIT_FLAGS);
    }
    struct connect_in_flight *pending = connect_pending(1);
    if (pending) {
        pending->cookie = cookie;
        pending->protocol = ctx->protocol;
        pending->routine = routine;
    } else {
        count_lost(episode, LOST_CONNECTS_MAP_FULL);
    }
    return verdict;
}

int on_connect4(struct bpf_sock_addr *ctx) { return on_connect(ctx, AF_INET); }
int on_connect6(struct bpf_sock_addr *ctx) { return on_connect(ctx, AF_INET6); }

static __always_inline int on_sendmsg(struct bpf_sock_addr *ctx, __u16 family)
{
    __u64 episode = current_episode();
    if (!episode)
        return 1;
    if (refuse_without_tracer(episode))
        return 0;
    struct udp_dest key = {};
    key.cookie = bpf_get_socket_cookie(ctx);
    addr_from_ctx(ctx, key.daddr, family);
    key.dport = bpf_ntohs(ctx->user_port);
    key.family = family;
    __s32 entry = 0;
    int refused = policy_refuses(episode, family, key.daddr, key.dport, ctx->protocol, &entry);
    if (refused)
        denied.increment(episode);
    int verdict = !refused;
    __u8 one = 1;
    if (udp_dests_seen.lookup(&key))
        return verdict;
    udp_dests_seen.update(&key, &one);
    struct destination dest = {.episode = episode, .port = key.dport, .family = family, .protocol = ctx->protocol};
    __builtin_memcpy(dest.addr, key.daddr, 16);
    int known = known_destination(&dest);
    int sent = 0;                   /* was this record paid for (or refused) with the flow? */
    struct bpf_sock *sk = ctx->sk;
    if (sk) {
        struct sock_state *st = sockets.sk_storage_get(sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
        if (!st) {
            count_lost(episode, LOST_NO_STORAGE);
        } else if (!st->owner.episode_cgroup_id) {
            /* Its first destination decides for the socket's flow. */
            fill_current_owner(&st->owner, episode);
            st->start_ns = bpf_ktime_get_ns();
            st->routine = admit_flow(episode, known, UDP_RECORDS);
            if (!flow_admitted(episode, st->routine))
                return verdict;
            sent = 1;
        }
    }
    if (known && !sent && !within_budget(episode))
        return verdict;                   /* a later send to a known destination: one token */
    struct net_record *r = reserve_net(episode);
    if (!r)
        return verdict;
    __builtin_memset(&r->ep, 0, sizeof(r->ep));
    __builtin_memset(&r->c, 0, sizeof(r->c));
    __builtin_memset(&r->a, 0, sizeof(r->a));
    struct owner o = {};
    fill_current_owner(&o, episode);
    fill_header(&r->h, REC_UDP_SENT, sizeof(*r), key.cookie, &o);
    __builtin_memcpy(r->ep.daddr, key.daddr, 16);
    r->ep.dport = key.dport;
    r->ep.family = family;
    r->ep.protocol = ctx->protocol;
    r->ep.socktype = ctx->type;
    r->start_ns = r->h.ts_ns;
    r->flags = FLOW_INITIATED | (refused ? FLOW_DENIED : 0);
    r->ret = refused ? entry : 0;
    events.ringbuf_submit(r, SUBMIT_FLAGS);
    return verdict;
}

int on_sendmsg4(struct bpf_sock_addr *ctx) { return on_sendmsg(ctx, AF_INET); }
int on_sendmsg6(struct bpf_sock_addr *ctx) { return on_sendmsg(ctx, AF_INET6); }

/* bind() records the owner, which a TCP listener's accepted sockets inherit.
 * UDP servers are reported here; TCP listeners at listen(), in sock_ops. */
static __always_inline int on_bind(struct bpf_sock_addr *ctx, __u16 family)
{
    __u64 episode = current_episode();
    if (!episode)
        return 1;
    struct bpf_sock *sk = ctx->sk;
    if (sk)
        owned_state(sk, episode);
    if (ctx->type != SOCK_DGRAM || ctx->user_port == 0)
        return 1;
    struct net_record *r = reserve_net(episode);
    if (!r)
        return 1;
    __builtin_memset(&r->ep, 0, sizeof(r->ep));
    __builtin_memset(&r->c, 0, sizeof(r->c));
    __builtin_memset(&r->a, 0, sizeof(r->a));
    struct owner o = {};
    fill_current_owner(&o, episode);
    fill_header(&r->h, REC_LISTENING, sizeof(*r), bpf_get_socket_cookie(ctx), &o);
    addr_from_ctx(ctx, r->ep.saddr, family);
    r->ep.sport = bpf_ntohs(ctx->user_port);
    r->ep.family = family;
    r->ep.protocol = ctx->protocol;
    r->ep.socktype = ctx->type;
    r->start_ns = r->h.ts_ns;
    r->flags = 0;
    r->ret = 0;
    events.ringbuf_submit(r, SUBMIT_FLAGS);
    return 1;
}

int on_bind4(struct bpf_sock_addr *ctx) { return on_bind(ctx, AF_INET); }
int on_bind6(struct bpf_sock_addr *ctx) { return on_bind(ctx, AF_INET6); }
