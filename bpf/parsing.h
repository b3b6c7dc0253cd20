/* SPDX-License-Identifier: GPL-2.0 */
/* parsing.h: bounds-checked header parsing with a cursor, for XDP and tc programs.
 *
 * Every helper takes the cursor, the end of the readable packet (ctx data_end) and an out
 * pointer; it checks that the whole header lies before data_end, advances the cursor past it
 * and returns the next protocol, or a negative value when the header is truncated or invalid.
 *
 * Why the checks look the way they do: the verifier only lets a program read packet memory at
 * [pointer, pointer + n) after it has seen a comparison of (pointer + n) against data_end on the
 * same path. "hdr + 1 > data_end" proves sizeof(*hdr) bytes; a header with a variable length
 * (IPv4 IHL, TCP doff, IPv6 extension headers) is re-checked with its real length after the
 * fixed part has been read, and that length is derived from a few bits so the verifier knows
 * its upper bound (pointer arithmetic with an unbounded scalar is rejected).
 *
 * Byte order is stated for every value a helper returns or writes.
 */
#ifndef HYBRID_PARSING_H
#define HYBRID_PARSING_H

#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/in6.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <linux/icmp.h>
#include <linux/icmpv6.h>

#ifndef HYBRID_MAX_VLAN_DEPTH
#error "include hybrid_common.h before parsing.h"
#endif /* HYBRID_MAX_VLAN_DEPTH */

/* Result codes of the helpers below (negative, so they never collide with a protocol). */
#define HYBRID_PARSE_TRUNCATED (-1)  /* the header does not fit before data_end */
#define HYBRID_PARSE_INVALID   (-2)  /* the header fits but a length/version field is impossible */
#define HYBRID_PARSE_TOO_DEEP  (-3)  /* more IPv6 extension headers than HYBRID_MAX_IPV6_EXT */

/* IPv4 frag_off bits, host order after bpf_ntohs(). */
#define HYBRID_IP_MF      0x2000
#define HYBRID_IP_OFFMASK 0x1fff
/* IPv6 fragment header frag_off bits, host order: offset in the top 13 bits, M in bit 0. */
#define HYBRID_IP6_MF      0x0001
#define HYBRID_IP6_OFFMASK 0xfff8

/* The cursor: where the next header starts. Kept in a struct (as xdp-tools does) so helpers
 * advance it through a pointer and the caller always holds the latest packet pointer. */
struct hdr_cursor {
	void *pos;
};

/* 802.1Q / 802.1ad tag as it follows the MAC addresses (the kernel's struct vlan_hdr lives in
 * linux/if_vlan.h, which drags in most of the networking stack; this is the same 4 bytes). */
struct hybrid_vlanhdr {
	__be16 h_vlan_TCI;                /* network order: PCP(3) DEI(1) VID(12) */
	__be16 h_vlan_encapsulated_proto; /* network order */
};

/* IPv6 extension headers other than the fragment header share these two bytes. */
struct hybrid_ipv6_opt_hdr {
	__u8 nexthdr;
	__u8 hdrlen;
};

struct hybrid_frag6hdr {
	__u8   nexthdr;
	__u8   reserved;
	__be16 frag_off;  /* network order */
	__be32 identification;
};

static __always_inline int proto_is_vlan(__u16 h_proto /* network order */)
{
	return h_proto == bpf_htons(ETH_P_8021Q) || h_proto == bpf_htons(ETH_P_8021AD);
}

/* Parse the Ethernet header and up to HYBRID_MAX_VLAN_DEPTH VLAN tags.
 * Returns: the EtherType after the tags, NETWORK byte order (as an int in 0..0xffff);
 *          HYBRID_PARSE_TRUNCATED when the header or a tag is cut short. A frame with more tags
 *          than we walk returns the next tag's TPID (0x8100/0x88a8), which callers treat as
 *          "not IP".
 * *vlan_id: the OUTER tag's VLAN id (12 bits), HOST byte order; 0 when untagged.
 * The loop is unrolled: HYBRID_MAX_VLAN_DEPTH is a small constant and the verifier then sees
 * straight-line code with one bounds check per tag. */
static __always_inline int parse_ethhdr(struct hdr_cursor *nh, void *data_end,
					struct ethhdr **ethhdr, __u16 *vlan_id)
{
	struct ethhdr *eth = nh->pos;
	struct hybrid_vlanhdr *vlh;
	__u16 h_proto;
	int i;

	*vlan_id = 0;
	if ((void *)(eth + 1) > data_end)
		return HYBRID_PARSE_TRUNCATED;
	nh->pos = eth + 1;
	*ethhdr = eth;
	h_proto = eth->h_proto;

#pragma unroll
	for (i = 0; i < HYBRID_MAX_VLAN_DEPTH; i++) {
		if (!proto_is_vlan(h_proto))
			break;
		vlh = nh->pos;
		if ((void *)(vlh + 1) > data_end)
			return HYBRID_PARSE_TRUNCATED;
		if (i == 0)
			*vlan_id = bpf_ntohs(vlh->h_vlan_TCI) & 0x0fff;
		h_proto = vlh->h_vlan_encapsulated_proto;
		nh->pos = vlh + 1;
	}
	return h_proto;
}

/* Parse an IPv4 header, options included (the cursor advances by IHL*4, not sizeof).
 * Returns: the L4 protocol (IPPROTO_*, a single byte, so byte order does not apply);
 *          HYBRID_PARSE_TRUNCATED when the header (options included) passes data_end;
 *          HYBRID_PARSE_INVALID for version != 4, IHL < 5 or tot_len < IHL*4.
 * *frag: the fragment field without the DF bit, HOST byte order: offset (in 8-byte units) in
 *        the low 13 bits, HYBRID_IP_MF when more fragments follow. 0 = not a fragment. */
static __always_inline int parse_iphdr(struct hdr_cursor *nh, void *data_end,
				       struct iphdr **iphdr, __u16 *frag)
{
	struct iphdr *iph = nh->pos;
	__u32 hdrsize;

	if ((void *)(iph + 1) > data_end)
		return HYBRID_PARSE_TRUNCATED;
	if (iph->version != 4 || iph->ihl < 5)
		return HYBRID_PARSE_INVALID;
	/* ihl is 4 bits: hdrsize is provably <= 60, which keeps the pointer arithmetic below
	 * acceptable to the verifier; the second check proves the options are readable. */
	hdrsize = iph->ihl * 4;
	if (nh->pos + hdrsize > data_end)
		return HYBRID_PARSE_TRUNCATED;
	if (bpf_ntohs(iph->tot_len) < hdrsize)
		return HYBRID_PARSE_INVALID;
	*frag = bpf_ntohs(iph->frag_off) & (HYBRID_IP_MF | HYBRID_IP_OFFMASK);
	nh->pos += hdrsize;
	*iphdr = iph;
	return iph->protocol;
}

/* Parse the fixed IPv6 header (extension headers: parse_ip6_exthdrs).
 * Returns: nexthdr (a single byte); HYBRID_PARSE_TRUNCATED; HYBRID_PARSE_INVALID when the
 *          version is not 6. */
static __always_inline int parse_ip6hdr(struct hdr_cursor *nh, void *data_end,
					struct ipv6hdr **ip6hdr)
{
	struct ipv6hdr *ip6h = nh->pos;

	if ((void *)(ip6h + 1) > data_end)
		return HYBRID_PARSE_TRUNCATED;
	if (ip6h->version != 6)
		return HYBRID_PARSE_INVALID;
	nh->pos = ip6h + 1;
	*ip6hdr = ip6h;
	return ip6h->nexthdr;
}

/* Walk IPv6 extension headers starting with nexthdr, until a header that is not one of
 * hop-by-hop, routing, destination options, AH (whose lengths we know how to skip) or until the
 * fragment header (where the walk stops: what follows a non-first fragment is not a header).
 * l3_end is where the IPv6 payload ends according to payload_len: an extension header that
 * runs past it is invalid (the stack drops such a packet), even if the frame has more bytes.
 * Returns: the protocol after the last extension header (a single byte; IPPROTO_FRAGMENT when
 *          the walk stopped at a fragment header); HYBRID_PARSE_TRUNCATED; HYBRID_PARSE_INVALID;
 *          HYBRID_PARSE_TOO_DEEP after HYBRID_MAX_IPV6_EXT headers.
 * *frag: for a fragment header, its frag_off field in HOST byte order (HYBRID_IP6_OFFMASK /
 *        HYBRID_IP6_MF bits); untouched otherwise.
 * *frag_nexthdr: for a fragment header, its nexthdr (what the fragmentable part starts with);
 *        untouched otherwise. The cursor is left just past the fragment header.
 * A bounded loop (kernel >= 5.3 accepts it; the verifier walks each iteration): each step
 * reads two bytes behind one bounds check and advances by a length computed from one byte,
 * so the cursor's variable offset stays bounded (at most 6 * 2048 bytes). */
static __always_inline int parse_ip6_exthdrs(struct hdr_cursor *nh, void *data_end,
					     void *l3_end, int nexthdr, __u16 *frag,
					     __u8 *frag_nexthdr)
{
	struct hybrid_ipv6_opt_hdr *opt;
	struct hybrid_frag6hdr *fh;
	__u32 len;
	int i;

	for (i = 0; i < HYBRID_MAX_IPV6_EXT; i++) {
		switch (nexthdr) {
		case IPPROTO_HOPOPTS:
		case IPPROTO_ROUTING:
		case IPPROTO_DSTOPTS:
		case IPPROTO_AH:
			break;
		case IPPROTO_FRAGMENT:
			fh = nh->pos;
			if ((void *)(fh + 1) > data_end)
				return HYBRID_PARSE_TRUNCATED;
			if ((void *)(fh + 1) > l3_end)
				return HYBRID_PARSE_INVALID;
			*frag = bpf_ntohs(fh->frag_off);
			*frag_nexthdr = fh->nexthdr;
			nh->pos = fh + 1;
			return IPPROTO_FRAGMENT;
		default:
			return nexthdr;
		}
		opt = nh->pos;
		if ((void *)(opt + 1) > data_end)
			return HYBRID_PARSE_TRUNCATED;
		/* AH counts its length in 4-byte units minus 2, the others in 8-byte units
		 * minus 1 (RFC 4302, RFC 8200). Both are bounded by the u8 field. */
		if (nexthdr == IPPROTO_AH)
			len = ((__u32)opt->hdrlen + 2) << 2;
		else
			len = ((__u32)opt->hdrlen + 1) << 3;
		nexthdr = opt->nexthdr;
		if (nh->pos + len > l3_end)
			return HYBRID_PARSE_INVALID;
		if (nh->pos + len > data_end)
			return HYBRID_PARSE_TRUNCATED;
		nh->pos += len;
	}
	switch (nexthdr) {
	case IPPROTO_HOPOPTS:
	case IPPROTO_ROUTING:
	case IPPROTO_DSTOPTS:
	case IPPROTO_AH:
	case IPPROTO_FRAGMENT:
		return HYBRID_PARSE_TOO_DEEP;
	}
	return nexthdr;
}

/* Parse a TCP header, options included (the cursor advances by doff*4).
 * Returns: the header length in bytes (20..60, host order); HYBRID_PARSE_TRUNCATED;
 *          HYBRID_PARSE_INVALID for doff < 5. Ports in *tcphdr stay in network order. */
static __always_inline int parse_tcphdr(struct hdr_cursor *nh, void *data_end,
					struct tcphdr **tcphdr)
{
	struct tcphdr *h = nh->pos;
	__u32 len;

	if ((void *)(h + 1) > data_end)
		return HYBRID_PARSE_TRUNCATED;
	if (h->doff < 5)
		return HYBRID_PARSE_INVALID;
	len = h->doff * 4;  /* doff is 4 bits: len <= 60, a bound the verifier can see */
	if (nh->pos + len > data_end)
		return HYBRID_PARSE_TRUNCATED;
	nh->pos += len;
	*tcphdr = h;
	return len;
}

/* Parse a UDP header.
 * Returns: the UDP length field (header + payload), HOST byte order; HYBRID_PARSE_TRUNCATED;
 *          HYBRID_PARSE_INVALID when that length is below 8. Ports stay in network order. */
static __always_inline int parse_udphdr(struct hdr_cursor *nh, void *data_end,
					struct udphdr **udphdr)
{
	struct udphdr *h = nh->pos;
	int len;

	if ((void *)(h + 1) > data_end)
		return HYBRID_PARSE_TRUNCATED;
	len = bpf_ntohs(h->len);
	if (len < (int)sizeof(*h))
		return HYBRID_PARSE_INVALID;
	nh->pos = h + 1;
	*udphdr = h;
	return len;
}

/* Parse the 8-byte ICMP header (type, code, checksum, rest-of-header).
 * Returns: the ICMP type (a single byte); HYBRID_PARSE_TRUNCATED. */
static __always_inline int parse_icmphdr(struct hdr_cursor *nh, void *data_end,
					 struct icmphdr **icmphdr)
{
	struct icmphdr *h = nh->pos;

	if ((void *)(h + 1) > data_end)
		return HYBRID_PARSE_TRUNCATED;
	nh->pos = h + 1;
	*icmphdr = h;
	return h->type;
}

/* Parse the 8-byte ICMPv6 header.
 * Returns: the ICMPv6 type (a single byte); HYBRID_PARSE_TRUNCATED. */
static __always_inline int parse_icmp6hdr(struct hdr_cursor *nh, void *data_end,
					  struct icmp6hdr **icmp6hdr)
{
	struct icmp6hdr *h = nh->pos;

	if ((void *)(h + 1) > data_end)
		return HYBRID_PARSE_TRUNCATED;
	nh->pos = h + 1;
	*icmp6hdr = h;
	return h->icmp6_type;
}

/* Read the ports at the start of a TCP or UDP header in a first fragment, whose transport
 * header may be cut anywhere: only the 4 bytes of the ports must lie before data_end and before
 * l3_end (the end of the fragment's IP payload).
 * Returns: 0 and *sport, *dport in NETWORK byte order; HYBRID_PARSE_TRUNCATED when the ports do
 *          not fit; HYBRID_PARSE_INVALID for another protocol. */
static __always_inline int parse_l4_ports(struct hdr_cursor *nh, void *data_end, void *l3_end, int proto,
					  __be16 *sport, __be16 *dport)
{
	__be16 *ports = nh->pos;

	if (proto != IPPROTO_TCP && proto != IPPROTO_UDP)
		return HYBRID_PARSE_INVALID;
	if ((void *)(ports + 2) > data_end || (void *)(ports + 2) > l3_end)
		return HYBRID_PARSE_TRUNCATED;
	*sport = ports[0];
	*dport = ports[1];
	return 0;
}

#endif /* HYBRID_PARSING_H */
