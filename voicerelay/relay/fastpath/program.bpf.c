// SPDX-License-Identifier: (MIT OR GPL-2.0)
/*
 * voicerelay's kernel fast path: a tc ingress program that forwards the datagrams of
 * established client flows without waking a relay worker.
 *
 *   client -> public port, DTLS or RTP/RTCP (RFC 7983 first byte), flow in `flows`:
 *       prepend the 22-byte envelope (wire/envelope.py), send from the worker's internal
 *       address to the flow's transceiver;
 *   transceiver -> an internal port, IPv4 envelope whose client is a flow of that very
 *       transceiver: strip the envelope, send from the public address to the client.
 *
 * Everything else (STUN, unknown flows, a wrong transceiver, oversize, IP options or
 * fragments, GSO, a destination the FIB cannot resolve, ...) is passed on unchanged
 * (TC_ACT_UNSPEC: the next filter, then the stack) to the userspace router, which stays the
 * single source of truth: it alone writes `flows` (through the workers) and decides expiry.
 * Each pass is counted by reason in `stats`. The program is inert once `config.alive_until_ns`
 * is in the past: the launcher pushes it forward every second, so a relay killed outright
 * leaves nothing forwarding on its behalf.
 *
 * Layouts shared with voicerelay/relay/fastpath/layout.py: keep both in step.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/pkt_cls.h>
#include <linux/udp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>

#define ENVELOPE_SIZE 22
#define MAX_DATAGRAM 1500
#define IP_OFF ETH_HLEN
#define UDP_OFF (ETH_HLEN + sizeof(struct iphdr))
#define PAYLOAD_OFF (UDP_OFF + sizeof(struct udphdr))
#define CHECKSUM_PARTIAL 3

struct flow_key {          /* a client: IPv4 address and port, network byte order */
	__u32 ip;
	__u16 port;
	__u16 pad;
};

struct flow_value {        /* written by the owning worker; counters and times by us */
	__u32 transceiver_ip;  /* network byte order, as are the ports and addresses */
	__u16 transceiver_port;
	__u16 internal_port;   /* the owning worker's internal socket */
	__u32 internal_ip;
	__u32 public_ip;       /* 0: learnt from the client's packets */
	__u64 packets_in;
	__u64 bytes_in;
	__u64 packets_out;
	__u64 bytes_out;
	__u64 last_in_ns;      /* CLOCK_MONOTONIC (bpf_ktime_get_ns) */
	__u64 last_out_ns;
};

struct config {
	__u32 public_ip;       /* 0: any local address */
	__u16 public_port;
	__u16 internal_port_lo;  /* host byte order: the workers' internal ports, inclusive */
	__u16 internal_port_hi;
	__u16 pad;
	__u32 internal_ip;
	__u64 alive_until_ns;
};

enum stat {
	STAT_TO_TRANSCEIVER,
	STAT_TO_TRANSCEIVER_BYTES,
	STAT_TO_CLIENT,
	STAT_TO_CLIENT_BYTES,
	STAT_PASS_KIND,        /* STUN or another kind the router handles */
	STAT_PASS_NO_FLOW,
	STAT_PASS_WRONG_TRANSCEIVER,
	STAT_PASS_MALFORMED,   /* sizes, envelope fields, options, fragments, GSO */
	STAT_PASS_ROUTE,       /* the FIB gave no usable route */
	STAT_PASS_PARTIAL,     /* a checksum-offloaded local packet that would leave a device */
	STAT_PASS_INERT,       /* the launcher stopped renewing `alive_until_ns` */
	STAT_FAILED,           /* a helper refused a rewrite: dropped */
	STAT_COUNT,
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, struct flow_key);
	__type(value, struct flow_value);
} flows SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct config);
} config SEC(".maps");

struct {                   /* this host's IPv4 addresses (the launcher keeps it current) */
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, __u32);
	__type(value, __u8);
} local_addresses SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, STAT_COUNT);
	__type(key, __u32);
	__type(value, __u64);
} stats SEC(".maps");

/* The kernel's own sk_buff, for ip_summed (CO-RE: the offset comes from the kernel's BTF). */
struct sk_buff___vr {
	__u8 ip_summed:2;
} __attribute__((preserve_access_index));
extern void *bpf_cast_to_kern_ctx(void *obj) __ksym;

struct headers {
	struct iphdr ip;
	struct udphdr udp;
} __attribute__((packed));

static __always_inline void count(__u32 what, __u64 by)
{
	__u64 *slot = bpf_map_lookup_elem(&stats, &what);
	if (slot)
		*slot += by;  /* per CPU: no atomics needed */
}

static __always_inline int pass(__u32 why)
{
	count(why, 1);
	return TC_ACT_UNSPEC;
}

static __always_inline __u16 fold(__u64 sum)
{
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return (__u16)sum;
}

/* The IPv4 header checksum of `ip` (its check field ignored). */
static __always_inline __u16 ip_checksum(struct iphdr *ip)
{
	__u16 *words = (__u16 *)ip;
	__u64 sum = 0;
	ip->check = 0;
#pragma unroll
	for (int i = 0; i < (int)sizeof(*ip) / 2; i++)
		sum += words[i];
	return ~fold(sum);
}

/* The 12-byte IPv4 pseudo header of a UDP datagram, as checksummed. */
struct pseudo {
	__u32 saddr;
	__u32 daddr;
	__u8 zero;
	__u8 proto;
	__u16 len;
};

/*
 * A UDP checksum after a rewrite: the old one, minus what left (`from`), plus what came
 * (`to`): both are pseudo header + UDP header with check 0 (+ envelope, padded to 24).
 * 0 (no checksum, IPv4) stays 0; a computed 0 is sent as 0xffff (RFC 768).
 *
 * A packet sent on this host with checksum offload (CHECKSUM_PARTIAL: its field holds only
 * the pseudo header's sum) is sent on without a checksum instead (0, which IPv4 allows): the
 * kernel would otherwise look for the checksum at the transport offset the rewrite moved.
 * Such a packet is only ever delivered locally (`route` leaves the others to the router).
 */
static __always_inline __u16 udp_checksum(__u16 old, void *from, __u32 from_size, void *to,
					  __u32 to_size)
{
	if (!old)
		return 0;
	__s64 diff = bpf_csum_diff(from, from_size, to, to_size, 0);
	if (diff < 0)
		return 0;
	__u16 folded = ~fold((__u64)(__u16)~old + (__u64)(__u32)diff);
	return folded ? folded : 0xffff;
}

static __always_inline int ip_summed_partial(struct __sk_buff *skb)
{
	struct sk_buff___vr *kskb = bpf_cast_to_kern_ctx(skb);
	return BPF_CORE_READ_BITFIELD(kskb, ip_summed) == CHECKSUM_PARTIAL;
}

/*
 * Where a rewritten packet goes: TC_ACT_OK for a local destination (the stack delivers it),
 * 1 or 2 for a redirect out of the FIB's device (with or without a known neighbour), -1 when
 * the FIB gives no route the program may use (the kernel's FIB helper also requires
 * forwarding on the receiving interface), -2 for a checksum-offloaded packet that would
 * leave a device (leave both to the router).
 */
static __always_inline int route(struct __sk_buff *skb, __u32 saddr, __u32 daddr, __u16 sport,
				 __u16 dport, __u16 tot_len, int partial,
				 struct bpf_fib_lookup *fib)
{
	if ((daddr & bpf_htonl(0xff000000)) == bpf_htonl(0x7f000000) ||
	    bpf_map_lookup_elem(&local_addresses, &daddr))
		return TC_ACT_OK;       /* a local address: the stack delivers it */
	__builtin_memset(fib, 0, sizeof(*fib));
	fib->family = 2; /* AF_INET */
	fib->l4_protocol = IPPROTO_UDP;
	fib->sport = sport;
	fib->dport = dport;
	fib->tot_len = tot_len;
	fib->ipv4_src = saddr;
	fib->ipv4_dst = daddr;
	fib->ifindex = skb->ingress_ifindex;
	long rc = bpf_fib_lookup(skb, fib, sizeof(*fib), BPF_FIB_LOOKUP_OUTPUT);
	if (rc != BPF_FIB_LKUP_RET_SUCCESS && rc != BPF_FIB_LKUP_RET_NO_NEIGH)
		return -1;
	if (partial)
		return -2;  /* its checksum would be completed at the old transport offset */
	return rc == BPF_FIB_LKUP_RET_SUCCESS ? 1 : 2;
}

static __always_inline int send(struct __sk_buff *skb, int how, struct bpf_fib_lookup *fib)
{
	if (how == TC_ACT_OK)
		return TC_ACT_OK;
	if (how == 1) {
		if (bpf_skb_store_bytes(skb, 0, fib->dmac, ETH_ALEN, 0) ||
		    bpf_skb_store_bytes(skb, ETH_ALEN, fib->smac, ETH_ALEN, 0))
			return TC_ACT_SHOT;
		return bpf_redirect(fib->ifindex, 0);
	}
	return bpf_redirect_neigh(fib->ifindex, 0, 0, 0);
}

/* Client -> transceiver. `h` holds the packet's IP and UDP headers. */
static __always_inline int to_transceiver(struct __sk_buff *skb, struct headers *h)
{
	__u32 len = bpf_ntohs(h->udp.len);
	if (len <= sizeof(struct udphdr) || len - sizeof(struct udphdr) > MAX_DATAGRAM)
		return pass(STAT_PASS_MALFORMED);
	__u8 first;
	if (bpf_skb_load_bytes(skb, PAYLOAD_OFF, &first, 1))
		return pass(STAT_PASS_MALFORMED);
	if (!((first >= 20 && first <= 63) || (first >= 128 && first <= 191)))
		return pass(STAT_PASS_KIND);  /* STUN and the rest: the router's */
	struct flow_key key = {.ip = h->ip.saddr, .port = h->udp.source};
	struct flow_value *flow = bpf_map_lookup_elem(&flows, &key);
	if (!flow)
		return pass(STAT_PASS_NO_FLOW);
	if (!flow->public_ip)
		flow->public_ip = h->ip.daddr;

	int partial = ip_summed_partial(skb);
	__u16 tot_len = bpf_htons(bpf_ntohs(h->ip.tot_len) + ENVELOPE_SIZE);
	struct bpf_fib_lookup fib;
	int how = route(skb, flow->internal_ip, flow->transceiver_ip, flow->internal_port,
			flow->transceiver_port, bpf_ntohs(tot_len), partial, &fib);
	if (how == -1)
		return pass(STAT_PASS_ROUTE);
	if (how == -2)
		return pass(STAT_PASS_PARTIAL);

	struct {
		struct pseudo ph;
		struct udphdr udp;
	} __attribute__((packed)) before = {
		.ph = {h->ip.saddr, h->ip.daddr, 0, IPPROTO_UDP, h->udp.len},
		.udp = h->udp,
	};
	struct {
		struct iphdr ip;
		struct udphdr udp;
		__u8 envelope[ENVELOPE_SIZE];
		__u8 pad[2];
	} __attribute__((packed)) out = {
		.ip = h->ip,
		.udp = {flow->internal_port, flow->transceiver_port,
			bpf_htons(len + ENVELOPE_SIZE), 0},
		.envelope = {'V', 'R', 1, 4},
	};
	before.udp.check = 0;
	struct iphdr ip = h->ip;
	ip.saddr = flow->internal_ip;
	ip.daddr = flow->transceiver_ip;
	ip.tot_len = tot_len;
	ip.check = ip_checksum(&ip);
	out.ip = ip;
	__builtin_memcpy(&out.envelope[4], &h->udp.source, 2);
	out.envelope[16] = 0xff;  /* IPv4-mapped: 10 zero bytes, ff ff, the address */
	out.envelope[17] = 0xff;
	__builtin_memcpy(&out.envelope[18], &h->ip.saddr, 4);
	struct {
		struct pseudo ph;
		struct udphdr udp;
		__u8 envelope[ENVELOPE_SIZE];
		__u8 pad[2];
	} __attribute__((packed)) after = {
		.ph = {out.ip.saddr, out.ip.daddr, 0, IPPROTO_UDP, out.udp.len},
		.udp = out.udp,
	};
	__builtin_memcpy(after.envelope, out.envelope, ENVELOPE_SIZE);
	out.udp.check = partial ? 0 : udp_checksum(h->udp.check, &before, sizeof(before), &after,
						   sizeof(after));

	/* [eth][ip][22 new][udp][payload] -> [eth][ip'][udp'][envelope][payload] */
	if (bpf_skb_adjust_room(skb, ENVELOPE_SIZE, BPF_ADJ_ROOM_NET, 0) ||
	    bpf_skb_store_bytes(skb, IP_OFF, &out, sizeof(out) - sizeof(out.pad),
				BPF_F_RECOMPUTE_CSUM)) {
		count(STAT_FAILED, 1);
		return TC_ACT_SHOT;
	}
	__sync_fetch_and_add(&flow->packets_in, 1);
	__sync_fetch_and_add(&flow->bytes_in, len - sizeof(struct udphdr));
	flow->last_in_ns = bpf_ktime_get_ns();
	count(STAT_TO_TRANSCEIVER, 1);
	count(STAT_TO_TRANSCEIVER_BYTES, len - sizeof(struct udphdr));
	return send(skb, how, &fib);
}

/* Transceiver -> client. `h` holds the packet's IP and UDP headers. */
static __always_inline int to_client(struct __sk_buff *skb, struct headers *h,
				     const struct config *cfg)
{
	__u32 len = bpf_ntohs(h->udp.len);
	if (len <= sizeof(struct udphdr) + ENVELOPE_SIZE ||
	    len - sizeof(struct udphdr) - ENVELOPE_SIZE > MAX_DATAGRAM)
		return pass(STAT_PASS_MALFORMED);
	__u8 envelope[ENVELOPE_SIZE + 2] = {};
	if (bpf_skb_load_bytes(skb, PAYLOAD_OFF, envelope, ENVELOPE_SIZE))
		return pass(STAT_PASS_MALFORMED);
	if (envelope[0] != 'V' || envelope[1] != 'R' || envelope[2] != 1 || envelope[3] != 4 ||
	    envelope[16] != 0xff || envelope[17] != 0xff)
		return pass(STAT_PASS_MALFORMED);
#pragma unroll
	for (int i = 6; i < 16; i++)
		if (envelope[i])
			return pass(STAT_PASS_MALFORMED);
	struct flow_key key = {};
	__builtin_memcpy(&key.port, &envelope[4], 2);
	__builtin_memcpy(&key.ip, &envelope[18], 4);
	struct flow_value *flow = bpf_map_lookup_elem(&flows, &key);
	if (!flow)
		return pass(STAT_PASS_NO_FLOW);
	if (flow->transceiver_ip != h->ip.saddr || flow->transceiver_port != h->udp.source)
		return pass(STAT_PASS_WRONG_TRANSCEIVER);
	__u32 public_ip = flow->public_ip;
	if (!public_ip)
		return pass(STAT_PASS_ROUTE);  /* no client packet told us where it was sent */

	int partial = ip_summed_partial(skb);
	__u16 tot_len = bpf_htons(bpf_ntohs(h->ip.tot_len) - ENVELOPE_SIZE);
	struct bpf_fib_lookup fib;
	int how = route(skb, public_ip, key.ip, cfg->public_port, key.port, bpf_ntohs(tot_len),
			partial, &fib);
	if (how == -1)
		return pass(STAT_PASS_ROUTE);
	if (how == -2)
		return pass(STAT_PASS_PARTIAL);

	struct {
		struct pseudo ph;
		struct udphdr udp;
		__u8 envelope[ENVELOPE_SIZE + 2];
	} __attribute__((packed)) before = {
		.ph = {h->ip.saddr, h->ip.daddr, 0, IPPROTO_UDP, h->udp.len},
		.udp = h->udp,
	};
	before.udp.check = 0;
	__builtin_memcpy(before.envelope, envelope, ENVELOPE_SIZE + 2);
	struct iphdr ip = h->ip;
	ip.saddr = public_ip;
	ip.daddr = key.ip;
	ip.tot_len = tot_len;
	ip.check = ip_checksum(&ip);
	struct udphdr udp = {cfg->public_port, key.port, bpf_htons(len - ENVELOPE_SIZE), 0};
	struct {
		struct pseudo ph;
		struct udphdr udp;
	} __attribute__((packed)) after = {
		.ph = {ip.saddr, ip.daddr, 0, IPPROTO_UDP, udp.len},
		.udp = udp,
	};
	udp.check = partial ? 0 : udp_checksum(h->udp.check, &before, sizeof(before), &after,
					       sizeof(after));

	/* [eth][ip][udp][envelope][payload]: udp' over the envelope's tail, then the 22 bytes
	 * after the IP header go: [eth][ip'][udp'][payload] */
	if (bpf_skb_store_bytes(skb, PAYLOAD_OFF + ENVELOPE_SIZE - sizeof(udp), &udp, sizeof(udp),
				BPF_F_RECOMPUTE_CSUM) ||
	    bpf_skb_adjust_room(skb, -ENVELOPE_SIZE, BPF_ADJ_ROOM_NET, 0) ||
	    bpf_skb_store_bytes(skb, IP_OFF, &ip, sizeof(ip), BPF_F_RECOMPUTE_CSUM)) {
		count(STAT_FAILED, 1);
		return TC_ACT_SHOT;
	}
	__u32 payload = len - sizeof(struct udphdr) - ENVELOPE_SIZE;
	__sync_fetch_and_add(&flow->packets_out, 1);
	__sync_fetch_and_add(&flow->bytes_out, payload);
	flow->last_out_ns = bpf_ktime_get_ns();
	count(STAT_TO_CLIENT, 1);
	count(STAT_TO_CLIENT_BYTES, payload);
	return send(skb, how, &fib);
}

SEC("tc")
int voicerelay_fastpath(struct __sk_buff *skb)
{
	if (skb->protocol != bpf_htons(ETH_P_IP))
		return TC_ACT_UNSPEC;
	__u32 zero = 0;
	const struct config *cfg = bpf_map_lookup_elem(&config, &zero);
	if (!cfg || !cfg->public_port)
		return TC_ACT_UNSPEC;
	struct headers h;
	if (bpf_skb_load_bytes(skb, IP_OFF, &h, sizeof(h)))
		return TC_ACT_UNSPEC;
	if (h.ip.protocol != IPPROTO_UDP)
		return TC_ACT_UNSPEC;
	__u16 dport = bpf_ntohs(h.udp.dest);
	int inbound = h.udp.dest == cfg->public_port &&
		      (!cfg->public_ip || h.ip.daddr == cfg->public_ip);
	int outbound = dport >= cfg->internal_port_lo && dport <= cfg->internal_port_hi &&
		       (!cfg->internal_ip || h.ip.daddr == cfg->internal_ip);
	if (!inbound && !outbound)
		return TC_ACT_UNSPEC;
	if (bpf_ktime_get_ns() > cfg->alive_until_ns)
		return pass(STAT_PASS_INERT);
	if (h.ip.ihl != 5 || (h.ip.frag_off & bpf_htons(0x3fff)) || skb->gso_size ||
	    bpf_ntohs(h.ip.tot_len) != bpf_ntohs(h.udp.len) + sizeof(struct iphdr))
		return pass(STAT_PASS_MALFORMED);
	return inbound ? to_transceiver(skb, &h) : to_client(skb, &h, cfg);
}

char LICENSE[] SEC("license") = "Dual MIT/GPL";
