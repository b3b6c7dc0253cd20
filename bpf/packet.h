/* SPDX-License-Identifier: GPL-2.0 */
/* packet.h: the summary of one packet that both programs classify (struct hybrid_pkt), built
 * from the cursor parsers of parsing.h. parse_packet() reads [data, data_end) as XDP and tc both
 * see it; parse_skb() is tc's way in, which may first make the headers linear.
 * hybrid/engine/packet.py follows the same rules in user space (which ICMP over which IP,
 * which ports key a flow); tests/bpf/reference.py models them: change all three.
 */
#ifndef HYBRID_PACKET_H
#define HYBRID_PACKET_H

#include "parsing.h"

enum hybrid_pkt_status {
	PKT_OK = 0,        /* IP header and transport header parsed */
	PKT_NOT_IP,        /* not IPv4/IPv6 (or an L2 header we cannot walk) */
	PKT_BAD_L3,        /* truncated or invalid IP header: the stack will drop it */
	PKT_FRAGMENT,      /* IP fragment: addresses known, transport not parsed (a first
	                    * fragment's ports may be: frag_keyed) */
	PKT_BAD_L4,        /* valid IP header, transport header truncated/invalid/unreachable */
};

struct hybrid_pkt {
	__u32 saddr[4];     /* network order; IPv4 as IPv4-mapped IPv6 */
	__u32 daddr[4];     /* network order */
	__u32 l3_len;       /* host order; IP header + payload, from the IP length field(s) */
	__u32 payload_len;  /* host order; transport payload bytes (see parse_packet) */
	__u32 seq;          /* host order; TCP sequence number, 0 for other protocols */
	__u16 sport;        /* network order; ICMP echo: identifier; other ICMP and protocols: 0 */
	__u16 dport;        /* network order */
	__u16 vlan;         /* host order; outer VLAN id, 0 when untagged */
	__u8  proto;        /* IPPROTO_* after IPv6 extension headers */
	__u8  tcp_flags;    /* the 8 flag bits of byte 13 of the TCP header; 0 for non-TCP */
	__u8  beyond_linear;/* a bounds check failed although the packet has more bytes */
	__u8  ttl;          /* IPv4 TTL / IPv6 hop limit as received */
	__u8  frag_keyed;   /* PKT_FRAGMENT at offset 0 whose TCP/UDP ports were read: sport, dport
	                    * and proto (the transport's, after an IPv6 fragment header) key its flow */
	__u8  udp_short;    /* UDP: the UDP length ends before the IP payload does (the engine reads
	                    * the IP payload, tc payload_len the UDP length: names.h gives up) */
	__u16 payload_off;  /* host order; TCP/UDP: offset of the payload from the frame's start */
	__u16 l4_off;       /* host order; TCP/UDP: offset of the transport header */
	__u8  ipv6;         /* an IPv6 packet (addresses of IPv4 ones are IPv4-mapped) */
	__u8  l3_plain;     /* no IPv4 options, no IPv6 extension headers */
};

/* The flag bits of byte 13 of the TCP header: the kernel's TCPHDR_* of net/tcp.h, which drags
 * in most of the TCP stack (as parsing.h's VLAN header, the same bits are cheaper written out). */
#define TCPF_FIN 0x01
#define TCPF_SYN 0x02
#define TCPF_RST 0x04
#define TCPF_PSH 0x08
#define TCPF_ACK 0x10
#define TCPF_URG 0x20

/* Bytes made linear when the headers are not: Ethernet + 2 tags + IPv4 with options + TCP with
 * options is 142 bytes; 512 also covers common IPv6 extension header chains. Deeper chains
 * end as PKT_BAD_L4 (flagged MALFORMED), never as an unflagged packet. */
#define HYBRID_PULL_LEN 512

/* A TCP SYN without ACK: the first packet of a new connection. It restarts a flow entry, is
 * what XDP may drop for an over-budget source, and is a flag reason of its own. */
static __always_inline int pkt_is_bare_syn(const struct hybrid_pkt *p)
{
	return p->proto == IPPROTO_TCP && (p->tcp_flags & (TCPF_SYN | TCPF_ACK)) == TCPF_SYN;
}

/* Parse the packet at [data, data_end). pkt_len is the packet's real length from the L2 header
 * on (skb->len at tc, where data_end may stop at the end of the linear area; data_end - data at
 * XDP). Lengths claimed by IP headers are checked against pkt_len: a packet shorter than its IP
 * header says is dropped by the stack (ip_rcv_core, ipv6_rcv), so it is PKT_BAD_L3 here.
 * payload_len, which drives the first-N budget, comes from the IP length fields, not from the
 * frame size: Ethernet pads short frames to 60 bytes and a padded pure ACK must still count as
 * carrying no payload. Returns a PKT_* status. */
static __always_inline int parse_packet(void *data, void *data_end, __u32 pkt_len,
					struct hybrid_pkt *p)
{
	struct hdr_cursor nh = { .pos = data };
	struct ethhdr *eth;
	struct iphdr *iph;
	struct ipv6hdr *ip6h;
	struct tcphdr *tcph;
	struct udphdr *udph;
	struct icmphdr *icmph;
	struct icmp6hdr *icmp6h;
	void *l3, *l3_end;
	__u32 l3_off, l4_len;
	__u16 frag = 0;
	__u8 frag_next = 0;
	int eth_type, proto, len;

	p->beyond_linear = (__u32)(data_end - data) < pkt_len;

	eth_type = parse_ethhdr(&nh, data_end, &eth, &p->vlan);
	if (eth_type < 0)
		return PKT_NOT_IP;
	l3 = nh.pos;
	l3_off = l3 - data;

	if (eth_type == bpf_htons(ETH_P_IP)) {
		proto = parse_iphdr(&nh, data_end, &iph, &frag);
		if (proto < 0)
			return PKT_BAD_L3;
		p->l3_len = bpf_ntohs(iph->tot_len);
		if (l3_off + p->l3_len > pkt_len)
			return PKT_BAD_L3;
		p->saddr[0] = 0;
		p->saddr[1] = 0;
		p->saddr[2] = bpf_htonl(0xffff);
		p->saddr[3] = iph->saddr;
		p->daddr[0] = 0;
		p->daddr[1] = 0;
		p->daddr[2] = bpf_htonl(0xffff);
		p->daddr[3] = iph->daddr;
		p->proto = proto;
		p->ttl = iph->ttl;
		if (frag) {
			/* frag != 0 with offset 0: the first fragment (MF is set). */
			if (!(frag & HYBRID_IP_OFFMASK) &&
			    parse_l4_ports(&nh, data_end, l3 + p->l3_len, proto, &p->sport, &p->dport) == 0)
				p->frag_keyed = 1;
			return PKT_FRAGMENT;
		}
	} else if (eth_type == bpf_htons(ETH_P_IPV6)) {
		proto = parse_ip6hdr(&nh, data_end, &ip6h);
		if (proto < 0)
			return PKT_BAD_L3;
		p->l3_len = sizeof(*ip6h) + bpf_ntohs(ip6h->payload_len);
		if (l3_off + p->l3_len > pkt_len)
			return PKT_BAD_L3;
		__builtin_memcpy(p->saddr, &ip6h->saddr, 16);
		__builtin_memcpy(p->daddr, &ip6h->daddr, 16);
		p->ttl = ip6h->hop_limit;
		l3_end = l3 + p->l3_len;
		proto = parse_ip6_exthdrs(&nh, data_end, l3_end, proto, &frag, &frag_next);
		if (proto == HYBRID_PARSE_TOO_DEEP) {
			/* A valid packet we cannot see through: flag it (MALFORMED) rather than
			 * let a chain of options hide a flow from the engine. */
			p->proto = 0;
			return PKT_BAD_L4;
		}
		if (proto < 0)
			return PKT_BAD_L3;
		p->proto = proto;
		if (proto == IPPROTO_FRAGMENT) {
			/* Offset 0: the first fragment, or an atomic one (M clear, RFC 6946: a whole
			 * datagram). Only a TCP/UDP header right after the fragment header is keyed. */
			if (!(frag & HYBRID_IP6_OFFMASK) &&
			    parse_l4_ports(&nh, data_end, l3_end, frag_next, &p->sport, &p->dport) == 0) {
				p->proto = frag_next;
				p->frag_keyed = 1;
			}
			return PKT_FRAGMENT;
		}
	} else {
		return PKT_NOT_IP;
	}

	/* l4_len cannot underflow: IPv4 checked tot_len >= IHL*4, IPv6 checked every extension
	 * header against l3_end. */
	l4_len = p->l3_len - (__u32)(nh.pos - l3);
	p->l4_off = nh.pos - data;
	p->ipv6 = eth_type == bpf_htons(ETH_P_IPV6);
	p->l3_plain = (__u32)(nh.pos - l3) == (p->ipv6 ? 40 : 20);
	switch (p->proto) {
	case IPPROTO_TCP:
		len = parse_tcphdr(&nh, data_end, &tcph);
		if (len < 0 || (__u32)len > l4_len)
			return PKT_BAD_L4;
		p->sport = tcph->source;
		p->dport = tcph->dest;
		p->tcp_flags = ((__u8 *)tcph)[13];
		p->seq = bpf_ntohl(tcph->seq);
		p->payload_len = l4_len - len;
		p->payload_off = nh.pos - data;
		break;
	case IPPROTO_UDP:
		len = parse_udphdr(&nh, data_end, &udph);
		if (len < 0 || (__u32)len > l4_len)
			return PKT_BAD_L4;
		p->sport = udph->source;
		p->dport = udph->dest;
		p->payload_len = len - sizeof(*udph);
		p->payload_off = nh.pos - data;
		p->udp_short = (__u32)len != l4_len;
		break;
	case IPPROTO_ICMP:
		if (eth_type != bpf_htons(ETH_P_IP) || parse_icmphdr(&nh, data_end, &icmph) < 0 ||
		    l4_len < sizeof(*icmph))
			return PKT_BAD_L4;
		if (icmph->type == ICMP_ECHO || icmph->type == ICMP_ECHOREPLY) {
			p->sport = icmph->un.echo.id;
			p->dport = icmph->un.echo.id;
		}
		p->payload_len = l4_len - sizeof(*icmph);
		break;
	case IPPROTO_ICMPV6:
		if (eth_type != bpf_htons(ETH_P_IPV6) || parse_icmp6hdr(&nh, data_end, &icmp6h) < 0 ||
		    l4_len < sizeof(*icmp6h))
			return PKT_BAD_L4;
		if (icmp6h->icmp6_type == ICMPV6_ECHO_REQUEST ||
		    icmp6h->icmp6_type == ICMPV6_ECHO_REPLY) {
			p->sport = icmp6h->icmp6_identifier;
			p->dport = icmp6h->icmp6_identifier;
		}
		p->payload_len = l4_len - sizeof(*icmp6h);
		break;
	default:
		/* Protocols without ports (GRE, ESP, SCTP is not parsed, ...): the whole L4 part
		 * counts as payload; the flow is keyed by addresses and protocol alone. */
		p->payload_len = l4_len;
		break;
	}
	return PKT_OK;
}

/* parse_packet() at tc ingress. There the driver has normally made the headers linear
 * already; GRO'd or paged skbs may not have. Pull once (a bounded amount, not the whole skb)
 * and re-read data/data_end: the helper may move the packet, so the verifier invalidates every
 * packet pointer taken before it. Returns a PKT_* status. */
static __always_inline int parse_skb(struct __sk_buff *skb, struct hybrid_pkt *p)
{
	__u32 pktsize = skb->len, pull;
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	int status;

	status = parse_packet(data, data_end, pktsize, p);
	if (status != PKT_OK && status != PKT_FRAGMENT && p->beyond_linear) {
		pull = pktsize < HYBRID_PULL_LEN ? pktsize : HYBRID_PULL_LEN;
		if (bpf_skb_pull_data(skb, pull) == 0) {
			data = (void *)(long)skb->data;
			data_end = (void *)(long)skb->data_end;
			__builtin_memset(p, 0, sizeof(*p));
			status = parse_packet(data, data_end, pktsize, p);
		}
		/* Still cut short: the IP header is valid as far as we can see, but we cannot
		 * reach the transport. Flag it rather than pass it unseen. */
		if (status == PKT_BAD_L3 && p->beyond_linear)
			status = PKT_BAD_L4;
	}
	/* The outer 802.1Q tag is usually taken out of the packet (hardware offload, or
	 * skb_vlan_untag() before tc ingress) into skb->vlan_tci; XDP sees it in the packet.
	 * Both must key the flow by the same outer id. */
	if (skb->vlan_present)
		p->vlan = skb->vlan_tci & 0x0fff;
	return status;
}

#endif /* HYBRID_PACKET_H */
