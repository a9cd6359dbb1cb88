/* Per-packet byte and packet counts, kept in socket storage so that userspace
 * sees one record per flow, never one per packet. */
#include "common.h"

/* Payload bytes: the packet minus its IP and TCP/UDP headers, read directly
 * (cgroup_skb sees the packet from the IP header on). */
static __always_inline __u32 payload_len(struct __sk_buff *skb, __u8 protocol)
{
    void *data = (void *)(long)skb->data, *end = (void *)(long)skb->data_end;
    __u32 ip_len = 40;
    if (skb->family == AF_INET) {
        __u8 *vihl = data;
        if ((void *)(vihl + 1) > end)
            return 0;
        ip_len = (*vihl & 0x0f) * 4;
    }
    __u32 l4_len = 0;
    if (protocol == IPPROTO_TCP) {
        __u8 *doff = data + (ip_len & 0x3f) + 12;
        if ((void *)(doff + 1) > end)
            return 0;
        l4_len = (*doff >> 4) * 4;
    } else if (protocol == IPPROTO_UDP) {
        l4_len = 8;
    }
    __u32 headers = ip_len + l4_len;
    return skb->len > headers ? skb->len - headers : 0;
}

/* Episode of a socket made before its cgroup was registered: from the socket's cgroup. */
static __always_inline __u64 socket_episode(struct bpf_sock *sk)
{
    __u64 id = bpf_sk_cgroup_id(sk);
    if (is_episode(id))
        return id;
    for (int level = 0; level < MAX_CGROUP_LEVEL; level++) {
        __u64 anc = bpf_sk_ancestor_cgroup_id(sk, level);
        if (!anc)
            break;
        if (is_episode(anc))
            return anc;
    }
    return 0;
}

static __always_inline int count_packet(struct __sk_buff *skb, int egress)
{
    struct bpf_sock *sk = skb->sk;
    if (!sk)
        return 1;
    sk = bpf_sk_fullsock(sk);
    if (!sk)
        return 1;
    struct sock_state *st = sockets.sk_storage_get(sk, 0, 0);
    if (!st) {
        __u64 episode = socket_episode(sk);
        if (!episode)
            return 1;
        st = sockets.sk_storage_get(sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
        if (!st) {
            count_lost(LOST_NO_STORAGE);
            return 1;
        }
        st->owner.episode_cgroup_id = episode;
        st->owner.cgroup_id = bpf_sk_cgroup_id(sk);
        st->start_ns = bpf_ktime_get_ns();
    }
    if (egress && !st->ep.sport) {
        /* UDP and raw sockets: learn the local end, which no hook reports. */
        st->ep.sport = sk->src_port;
        if (sk->family == AF_INET) {
            __u32 a = sk->src_ip4;
            __builtin_memcpy(st->ep.saddr, &a, 4);
        } else {
            __u32 a[4] = {sk->src_ip6[0], sk->src_ip6[1], sk->src_ip6[2], sk->src_ip6[3]};
            __builtin_memcpy(st->ep.saddr, a, 16);
        }
    }
    __u32 bytes = payload_len(skb, sk->protocol);
    __u32 segs = skb->gso_segs > 1 ? skb->gso_segs : 1;
    if (egress) {
        __sync_fetch_and_add(&st->c.bytes_out, bytes);
        __sync_fetch_and_add(&st->c.packets_out, segs);
    } else {
        __sync_fetch_and_add(&st->c.bytes_in, bytes);
        __sync_fetch_and_add(&st->c.packets_in, segs);
    }
    return 1;
}

int on_egress(struct __sk_buff *skb) { return count_packet(skb, 1); }
int on_ingress(struct __sk_buff *skb) { return count_packet(skb, 0); }
