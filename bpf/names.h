/* SPDX-License-Identifier: GPL-2.0 */
/* names.h: tc reads the name a flow's first payload asks for (hybrid_common.h, "Names"): the
 * DNS query name, the TLS ClientHello server_name, the HTTP/1.x Host. It reads EXACTLY what the
 * engine reads from the same bytes (hybrid/engine/packet.py: _parse_dns, _parse_sni,
 * _parse_http/_http_host, which follow dnsmasq, OpenSSL and nginx) or gives up with a reason
 * (HYBRID_CNT_NAME_*): it reads a strict subset of what the engine reads, the plain shapes that
 * clients send, and leaves everything else (pointers, several questions or Host lines, absolute
 * targets, odd whitespace, several records, non-ASCII, ...) to the engine as before.
 * tests/bpf/reference.py (kernel_name) models it, tests/bpf/test_names.py compares it with the
 * engine's parsers over random and adversarial packets. Included by hybrid.bpf.c after the map
 * accessors.
 *
 * The payload's first bytes are copied into a per-CPU scratch (struct hybrid_name_scratch) and
 * read there, byte by byte in bounded loops whose state lives in that scratch too, accessed
 * through a volatile pointer so that the compiler cannot keep it in registers: a value the
 * verifier loads back from map memory is an unknown scalar, so every iteration of a loop is one
 * verifier state (not one per path through the parser), and every index is masked into the
 * buffer before use. Nothing here writes a map the engine reads: only the scratch.
 */
#ifndef HYBRID_NAMES_H
#define HYBRID_NAMES_H

#define NAME_MASK (HYBRID_NAME_SCAN - 1)
#define NAME_B(s, i) ((__u32)(s)->buf[(i) & NAME_MASK])
#define NAME_BE16(s, i) ((NAME_B(s, i) << 8) | NAME_B(s, (i) + 1))
/* Within the parsers: "not read, this reason". */
#define NAME_DONE 1

_Static_assert((HYBRID_NAME_SCAN & NAME_MASK) == 0, "HYBRID_NAME_SCAN is a power of 2");
_Static_assert(HYBRID_NAME_LEN == 256, "key.name is indexed & 255");

/* The name alphabet, lower-cased: [a-z0-9_-], and '.' where dots separate labels (SNI, Host);
 * 0 for any other byte (NUL, space, non-ASCII, ...): tc gives up on it. */
static __always_inline __u8 name_char(__u32 c, int dot_ok)
{
	if (c >= 'A' && c <= 'Z')
		return c | 0x20;
	if ((c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '-' || c == '_')
		return c;
	if (c == '.' && dot_ok)
		return c;
	return 0;
}

/* Append one character to key.name; 0, or HYBRID_CNT_NAME_TOO_LONG. */
static __always_inline int name_put(volatile struct hybrid_name_scratch *s, __u8 ch)
{
	__u32 out = s->out;

	if (out >= HYBRID_NAME_MAX)
		return HYBRID_CNT_NAME_TOO_LONG;
	s->key.name[out & (HYBRID_NAME_LEN - 1)] = ch;
	s->out = out + 1;
	return 0;
}

/* ---- DNS: the question name of one query (RFC 1035 4.1.2), as _parse_dns/_dns_name read it,
 * without compression pointers (a query's only name has nothing to point back to: a pointer
 * is an evader's, or a stranger's, and the engine follows it). base: 0 for UDP, 2 for TCP
 * (the length prefix, which must cover exactly the rest of the segment). */
static __always_inline int names_dns(volatile struct hybrid_name_scratch *s, __u32 base)
{
	__u32 n = s->len, k, i, c, qd;
	__u8 ch;

	if (base) {
		if (n < 2)
			return HYBRID_CNT_NAME_TRUNCATED;
		c = NAME_BE16(s, 0);
		if (c + 2 > n)
			return HYBRID_CNT_NAME_TRUNCATED;
		if (c + 2 < n)
			return HYBRID_CNT_NAME_SEVERAL;      /* pipelined messages */
	}
	if (n < base + 12)
		return HYBRID_CNT_NAME_TRUNCATED;
	if (NAME_B(s, base + 2) & 0x80)
		return HYBRID_CNT_NAME_FORM;             /* a response */
	qd = NAME_BE16(s, base + 4);
	if (qd == 0)
		return HYBRID_CNT_NAME_NONE;
	if (qd != 1)
		return HYBRID_CNT_NAME_SEVERAL;
	s->a = 0;                                        /* bytes left in the current label */
	#pragma clang loop unroll(disable)
	for (k = 0; k < HYBRID_NAME_MAX + 2; k++) {
		i = base + 12 + k;
		if (i >= s->len)
			return HYBRID_CNT_NAME_TRUNCATED;
		c = NAME_B(s, i);
		if (s->a == 0) {
			if (c == 0)
				return s->out ? NAME_DONE : HYBRID_CNT_NAME_NONE;   /* the root: no name */
			if (c >= 0xC0)
				return HYBRID_CNT_NAME_POINTER;
			if (c & 0xC0)
				return HYBRID_CNT_NAME_FORM;     /* extended/reserved label types */
			if (s->out && name_put(s, '.'))
				return HYBRID_CNT_NAME_TOO_LONG;
			s->a = c;
			continue;
		}
		ch = name_char(c, 0);
		if (!ch)
			return HYBRID_CNT_NAME_ODD;
		if (name_put(s, ch))
			return HYBRID_CNT_NAME_TOO_LONG;
		s->a = s->a - 1;
	}
	return HYBRID_CNT_NAME_TOO_LONG;
}

/* ---- TLS: the server_name of a ClientHello that is the one handshake message of the one
 * record the payload holds (tls_client_hello/_sni_in_hello): every extension walked, as the
 * engine walks them (a duplicate server_name, lengths that do not add up: given up). */
#define NAME_TLS_MAX_EXTENSIONS 64

static __always_inline int names_sni(volatile struct hybrid_name_scratch *s)
{
	__u32 n = s->len, rlen, hlen, pos, end, ext, etype, elen, k;
	__u8 ch;

	if (n < 9)
		return HYBRID_CNT_NAME_TRUNCATED;
	if (NAME_B(s, 1) != 3)
		return HYBRID_CNT_NAME_FORM;
	rlen = NAME_BE16(s, 3);
	if (rlen > 16384)
		return HYBRID_CNT_NAME_FORM;
	if (rlen + 5 > n)
		return HYBRID_CNT_NAME_TRUNCATED;
	if (rlen + 5 < n)
		return HYBRID_CNT_NAME_SEVERAL;          /* more records */
	if (NAME_B(s, 5) != 1)
		return HYBRID_CNT_NAME_NONE;             /* not a ClientHello */
	hlen = (NAME_B(s, 6) << 16) | NAME_BE16(s, 7);
	if (hlen + 4 > rlen)
		return HYBRID_CNT_NAME_TRUNCATED;        /* continues in another record */
	if (hlen + 4 < rlen)
		return HYBRID_CNT_NAME_SEVERAL;          /* another handshake message after it */
	end = n;
	pos = 9 + 2 + 32;                                /* client_version, random */
	if (pos + 1 > end)
		return HYBRID_CNT_NAME_FORM;
	pos += 1 + NAME_B(s, pos);                       /* session_id */
	if (pos + 2 > end)
		return HYBRID_CNT_NAME_FORM;
	pos += 2 + NAME_BE16(s, pos);                    /* cipher_suites */
	if (pos + 1 > end)
		return HYBRID_CNT_NAME_FORM;
	pos += 1 + NAME_B(s, pos);                       /* compression_methods */
	if (pos == end)
		return HYBRID_CNT_NAME_NONE;             /* no extensions */
	if (pos + 2 > end)
		return HYBRID_CNT_NAME_FORM;
	ext = NAME_BE16(s, pos);
	if (pos + 2 + ext != end)
		return HYBRID_CNT_NAME_FORM;
	s->pos = pos + 2;
	s->a = 0;                                        /* the name's offset in buf */
	s->b = 0;                                        /* its length; 0: no server_name yet */
	#pragma clang loop unroll(disable)
	for (k = 0; k < NAME_TLS_MAX_EXTENSIONS; k++) {
		pos = s->pos;
		if (pos + 4 > end)
			break;
		etype = NAME_BE16(s, pos);
		elen = NAME_BE16(s, pos + 2);
		pos += 4;
		if (pos + elen > end)
			return HYBRID_CNT_NAME_FORM;
		if (etype == 0) {
			if (s->b)
				return HYBRID_CNT_NAME_SEVERAL;  /* two server_name extensions */
			if (elen < 5 || NAME_BE16(s, pos) != elen - 2 || NAME_B(s, pos + 2) != 0)
				return HYBRID_CNT_NAME_FORM;
			if (NAME_BE16(s, pos + 3) != elen - 5)
				return HYBRID_CNT_NAME_SEVERAL;  /* a list of several names */
			if (elen == 5)
				return HYBRID_CNT_NAME_FORM;     /* an empty name */
			if (elen - 5 > HYBRID_NAME_MAX)
				return HYBRID_CNT_NAME_TOO_LONG;
			s->a = pos + 5;
			s->b = elen - 5;
		}
		s->pos = pos + elen;
	}
	if (s->pos != end)
		return HYBRID_CNT_NAME_FORM;             /* too many extensions, or a short tail */
	if (!s->b)
		return HYBRID_CNT_NAME_NONE;
	#pragma clang loop unroll(disable)
	for (k = 0; k < HYBRID_NAME_MAX; k++) {
		if (k >= s->b)
			break;
		ch = name_char(NAME_B(s, s->a + k), 1);
		if (!ch)
			return HYBRID_CNT_NAME_ODD;
		name_put(s, ch);
	}
	return NAME_DONE;
}

#ifdef HYBRID_NAMES_HTTP
/* Not compiled by default: with it the tc program exceeds the verifier's budget of 1,000,000
 * processed instructions (the DNS and SNI parsers take ~300,000 of it, this one more than
 * 700,000 as written); until it is cheaper, the Host is the engine's (HYBRID_CNT_NAME_NONE). */
/* ---- HTTP/1.x: the Host of a request head that is the whole payload, read as _read_http and
 * _http_host read it, on the shape clients send: METHOD SP /origin-target SP HTTP/1.x CRLF,
 * lines ending in CRLF, one "Host:" line, the empty line last. Anything else (leading empty
 * lines, a bare LF, several spaces, absolute or "*" targets, '%' or "/.." in the target, a body
 * or another request after the head, several Host lines) is the engine's.
 *
 * Shaped for the verifier, which walks a bounded loop iteration by iteration and keeps the
 * branches it has not taken yet on a stack of at most 8192: one flat pass over the head whose
 * common byte (not a separator) costs three comparisons, the rare ones (CR, LF, space, '%',
 * control bytes, '.') handled off that path; then the request line's parts and the Host value
 * in short loops. HTTP heads longer than NAME_HTTP_SCAN are the engine's. */
#define NAME_HTTP_SCAN   1024
#define H_VERSION_PREFIX 0x2e312f50545448ULL     /* "HTTP/1." little-endian */

/* A byte at or below '%' (CR, LF, space, tab, NUL, '%', ...) at i; s->b: 0 on the request
 * line, 1 after it; s->st: spaces on the request line; s->a: the request line's LF;
 * s->c: Host lines; s->pos: where the Host value starts. 0 to go on, NAME_DONE at the end of
 * the head, else a reason. */
static __always_inline int http_rare(volatile struct hybrid_name_scratch *s, __u32 i, __u32 c)
{
	__u32 n = s->len, line = s->b;

	if (c == '\n') {
		if (i == 0 || NAME_B(s, i - 1) != '\r')
			return HYBRID_CNT_NAME_ODD;          /* a bare LF */
		if (!line) {
			s->a = i;
			s->b = 1;
		}
		if (i + 2 < n && NAME_B(s, i + 1) == '\r' && NAME_B(s, i + 2) == '\n')
			return i + 3 == n ? NAME_DONE : HYBRID_CNT_NAME_SEVERAL;  /* body, pipelining */
		if (i + 5 < n && (NAME_B(s, i + 1) | 0x20) == 'h' && (NAME_B(s, i + 2) | 0x20) == 'o' &&
		    (NAME_B(s, i + 3) | 0x20) == 's' && (NAME_B(s, i + 4) | 0x20) == 't' &&
		    NAME_B(s, i + 5) == ':') {
			if (s->c)
				return HYBRID_CNT_NAME_SEVERAL;  /* duplicate Host */
			s->c = 1;
			s->pos = i + 6;
		}
		return 0;
	}
	if (line)
		return 0;                                /* header bytes: the engine does not mind */
	if (c == '\r')
		return i + 1 < n && NAME_B(s, i + 1) == '\n' ? 0 : HYBRID_CNT_NAME_ODD;
	if (c == ' ') {
		s->st = s->st + 1;
		return s->st > 2 ? HYBRID_CNT_NAME_FORM : 0;
	}
	if (c == '%')
		return HYBRID_CNT_NAME_FORM;             /* percent-decoding: the engine's */
	return c < 0x20 ? HYBRID_CNT_NAME_ODD : 0;
}

static __always_inline int names_http(volatile struct hybrid_name_scratch *s)
{
	__u32 i, k, c, pos, eol;
	int r = HYBRID_CNT_NAME_TRUNCATED;
	__u8 ch;

	if (s->len > NAME_HTTP_SCAN)
		return HYBRID_CNT_NAME_TOO_LONG;
	#pragma clang loop unroll(disable)
	for (i = 0; i < NAME_HTTP_SCAN; i++) {
		if (i >= s->len)
			return HYBRID_CNT_NAME_TRUNCATED;
		c = NAME_B(s, i);
		if (c <= '%') {
			r = http_rare(s, i, c);
			if (r)
				break;
		} else if (c == '.' && !s->b && NAME_B(s, i - 1) == '.' && NAME_B(s, i - 2) == '/') {
			return HYBRID_CNT_NAME_FORM;         /* "/..": may climb above the root */
		}
	}
	if (r != NAME_DONE)
		return r;
	/* The request line [0, eol): METHOD SP target SP HTTP/1.x CR, two spaces exactly. */
	eol = s->a;
	if (s->st != 2 || eol < 13)
		return HYBRID_CNT_NAME_FORM;
	#pragma clang loop unroll(disable)
	for (k = 0; k < 17; k++) {
		c = NAME_B(s, k);
		if (c == ' ')
			break;
		if (c < 'A' || c > 'Z' || k == 16)
			return HYBRID_CNT_NAME_FORM;
	}
	if (k == 0 || NAME_B(s, k + 1) != '/' || k + 1 >= eol - 10)
		return HYBRID_CNT_NAME_FORM;             /* absolute-form, "*", authority-form */
	if (NAME_B(s, eol - 10) != ' ')
		return HYBRID_CNT_NAME_FORM;
	#pragma clang loop unroll(disable)
	for (k = 0; k < 7; k++)
		if (NAME_B(s, eol - 9 + k) != ((H_VERSION_PREFIX >> (k * 8)) & 0xff))
			return HYBRID_CNT_NAME_FORM;
	c = NAME_B(s, eol - 2);
	if (c != '0' && c != '1')
		return HYBRID_CNT_NAME_FORM;
	if (!s->c)
		return HYBRID_CNT_NAME_NONE;
	/* The Host value: [SP/HT]* name [":" digits] [SP/HT]* CR LF, as _http_host reads it (the
	 * port and one final dot dropped). */
	pos = s->pos;
	#pragma clang loop unroll(disable)
	for (k = 0; k < 64; k++) {
		c = NAME_B(s, pos);
		if (c != ' ' && c != '\t')
			break;
		pos++;
	}
	#pragma clang loop unroll(disable)
	for (k = 0; k < HYBRID_NAME_MAX + 1; k++) {
		ch = name_char(NAME_B(s, pos), 1);
		if (!ch)
			break;
		if (name_put(s, ch))
			return HYBRID_CNT_NAME_TOO_LONG;
		pos++;
	}
	if (NAME_B(s, pos) == ':') {
		pos++;
		#pragma clang loop unroll(disable)
		for (k = 0; k < 6; k++) {
			c = NAME_B(s, pos);
			if (c < '0' || c > '9')
				break;
			pos++;
		}
	}
	#pragma clang loop unroll(disable)
	for (k = 0; k < 64; k++) {
		c = NAME_B(s, pos);
		if (c != ' ' && c != '\t')
			break;
		pos++;
	}
	if (NAME_B(s, pos) != '\r' || NAME_B(s, pos + 1) != '\n' || pos + 1 >= s->len)
		return HYBRID_CNT_NAME_ODD;
	pos = s->out;
	if (pos && s->key.name[(pos - 1) & (HYBRID_NAME_LEN - 1)] == '.') {  /* one final dot */
		pos--;
		s->key.name[pos & (HYBRID_NAME_LEN - 1)] = 0;
		s->out = pos;
	}
	return pos ? NAME_DONE : HYBRID_CNT_NAME_FORM;
}

#endif /* HYBRID_NAMES_HTTP */

/* Read the name of a first payload packet into s->key (len 0 when none). Returns the
 * HYBRID_CNT_NAME_* counter of what happened. */
static __always_inline int names_read(struct __sk_buff *skb, const struct hybrid_pkt *p,
				      struct hybrid_name_scratch *s, const int which)
{
	__u32 len = p->payload_len;
	__u16 dport = bpf_ntohs(p->dport);
	__u8 kind;
	int r;

	__builtin_memset(&s->key, 0, sizeof(s->key));
	s->attempts++;
	s->st = 0;
	s->out = 0;
	s->pos = 0;
	s->a = 0;
	s->b = 0;
	s->c = 0;
	s->len = 0;
	if (p->proto == IPPROTO_UDP) {
		if (dport != 53)
			return HYBRID_CNT_NAME_NONE;
		if (p->udp_short)
			return HYBRID_CNT_NAME_FORM;
	} else if (p->proto != IPPROTO_TCP) {
		return HYBRID_CNT_NAME_NONE;
	}
	if (len == 0)
		return HYBRID_CNT_NAME_NONE;
	if (len > HYBRID_NAME_SCAN)
		return HYBRID_CNT_NAME_TOO_LONG;
	if (bpf_skb_load_bytes(skb, p->payload_off, s->buf, len) < 0)
		return HYBRID_CNT_NAME_TRUNCATED;
	s->len = len;
	if (dport == 53 && which == HYBRID_NAME_PROG_DNS_TLS) {
		kind = HYBRID_NAME_DNS;
		r = names_dns(s, p->proto == IPPROTO_TCP ? 2 : 0);
	} else if (s->buf[0] == 22 && which == HYBRID_NAME_PROG_DNS_TLS) {
		kind = HYBRID_NAME_SNI;
		r = names_sni(s);
#ifdef HYBRID_NAMES_HTTP
	} else if (s->buf[0] >= 'A' && s->buf[0] <= 'Z' && which == HYBRID_NAME_PROG_HTTP) {
		kind = HYBRID_NAME_HOST;
		r = names_http(s);
#endif /* HYBRID_NAMES_HTTP */
	} else {
		return HYBRID_CNT_NAME_NONE;
	}
	if (r != NAME_DONE) {
		__builtin_memset(&s->key, 0, sizeof(s->key));
		return r;
	}
	s->key.port = dport;
	s->key.proto = p->proto;
	s->key.kind = kind;
	s->key.len = s->out;
	return kind == HYBRID_NAME_DNS ? HYBRID_CNT_NAME_DNS :
	       kind == HYBRID_NAME_SNI ? HYBRID_CNT_NAME_SNI : HYBRID_CNT_NAME_HOST;
}

/* The first payload packet of the direction that opened the flow: the one that carries the
 * name a client asks for. */
static __always_inline int names_wanted(const struct hybrid_config *cfg, const struct hybrid_flow *flow,
					const struct hybrid_pkt *p, __u32 dir, __u32 prev)
{
	return (cfg->flags & HYBRID_CFG_NAMES) && flow && prev == 0 &&
	       dir == ((flow->flags & HYBRID_FLOW_ORIG_HI) ? 1 : 0) &&
	       (p->proto == IPPROTO_TCP || p->proto == IPPROTO_UDP);
}

#endif /* HYBRID_NAMES_H */
