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
 *
 * The verifier's budget (1,000,000 processed instructions per program): -DHYBRID_NAMES_ONLY=k
 * (a HYBRID_NAME_* kind) compiles names_read() with that one parser, the others' payloads
 * reading as HYBRID_CNT_NAME_NONE; any other nonzero k, with none; 0 (the default), all three.
 * Measured on 6.18 (bcc 0.26, processed instructions of the tc program): no parser 487,360;
 * DNS 562,793; SNI 534,042; HTTP 597,167; all three 731,773.
 */
#ifndef HYBRID_NAMES_H
#define HYBRID_NAMES_H

#define NAME_MASK (HYBRID_NAME_SCAN - 1)
#define NAME_B(s, i) ((__u32)(s)->buf[(i) & NAME_MASK])
#define NAME_BE16(s, i) ((NAME_B(s, i) << 8) | NAME_B(s, (i) + 1))
/* Within the parsers: "not read, this reason". */
#define NAME_DONE 1
#ifndef HYBRID_NAMES_ONLY
#define HYBRID_NAMES_ONLY 0      /* see above: which parsers names_read() dispatches to */
#endif
#define NAMES_WITH(kind) (HYBRID_NAMES_ONLY == 0 || HYBRID_NAMES_ONLY == (kind))

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

/* ---- HTTP/1.x: the Host of a request head that the payload holds whole, as _read_http and
 * _http_host read it (they follow nginx), on the shape clients send:
 *
 *   METHOD SP /target SP HTTP/1.1 CRLF   (or HTTP/1.0; METHOD: 1 to 16 of [A-Z])
 *   name: value CRLF                     (header lines, up to 63; bytes 0x20-0x7e)
 *   Host: SP* name [":" port] SP* CRLF   (exactly one; up to 8 spaces on either side)
 *   CRLF                                 (the empty line: the end of the head)
 *
 * then nothing, or a body that the one Content-Length line covers to the end of the packet at
 * least (the engine reads what follows the body as another request). The name: labels of
 * [A-Za-z0-9_-] between single dots, lower-cased, one final dot and the port (1 to 5 digits)
 * dropped, as _http_host drops them. Given up (the engine reads the packet as before):
 * a head byte that is not printable ASCII or a space (NUL, tab, a bare CR or LF, non-ASCII),
 * a line that starts with a space (obs-fold), "Host" then a space, leading empty lines, a
 * method with other characters, an absolute-form, authority-form or "*" target, '%' or "/.."
 * in the target's path (not in its query), several spaces, another version, several Host or
 * Content-Length lines, a body with Transfer-Encoding or without Content-Length, bytes after
 * the body (pipelined requests), an empty Host, an IPv6 literal, empty labels, a name of more
 * than 253 characters, more than 63 header lines, a payload of 2048 bytes (no room for the NUL
 * written after it), more than 320 iterations of either byte loop.
 *
 * Shaped for the verifier (measured on 6.18: about 110,000 processed instructions, see the
 * top of this file):
 * - Two loops walk the bytes, the target's and the head's. Each iteration takes the bytes
 *   up to the end of their aligned 8 that need no look (tested 8 at a time: NAME_*8), then
 *   one byte (a CR LF in the head). 320 iterations read any 2 KB head of ordinary lines.
 * - Their bodies hold one branch: when to stop. The tests are 0/1 values (NAME_LT, NAME_EQ):
 *   every branch the verifier cannot decide is one more path per iteration, and leaves one
 *   more state per iteration on its stack of 8192 pending ones. Why a loop stopped is worked
 *   out after it, once; that it ran out is a flag in the scratch.
 * - Positions live in the scratch, never in a loop counter: a constant position compared
 *   with the payload's length makes the verifier track that length precisely, and verify
 *   everything after the loop once per value.
 * - The head's line starts go to a table in key.name (zeroed before the name is written);
 *   short loops then read the table (Host, Content-Length, Transfer-Encoding: compared at
 *   fixed offsets) and the Content-Length and Host values.
 * The NUL written after the payload stops the byte loops where it ends. */
#define NAME_HTTP_METHOD 16      /* method characters at most */
#define NAME_HTTP_LINES  64      /* line starts in the table: header lines and the empty line */
#define NAME_HTTP_OWS    8       /* spaces on either side of the Host value at most */
#define NAME_HTTP_CL     24      /* bytes of a Content-Length value at most */
#define NAME_HTTP_TARGET_ITER 320 /* iterations of the target's byte loop */
#define NAME_HTTP_HEAD_ITER   320 /* iterations of the head's */
#define NAME_HTTP_LINE(k) line[(k) & (2 * NAME_HTTP_LINES - 1)]

_Static_assert(4 * NAME_HTTP_LINES <= HYBRID_NAME_LEN, "the line table, twice over, fits key.name");

/* 0/1 values of comparisons, computed without a branch (BPF has no set-on-condition: clang
 * turns a comparison used as a value into a branch). The empty asm hides the arithmetic from
 * clang, which would turn it back into a comparison. Operands below 2^63 (a borrow into bit
 * 63 is the answer). */
static __always_inline __u64 name_opaque(__u64 x)
{
	asm volatile("" : "+r"(x));
	return x;
}
#define NAME_LT(a, b) (name_opaque((__u64)(a) - (__u64)(b)) >> 63)
#define NAME_EQ(a, b) ((name_opaque((__u64)(a) ^ (__u64)(b)) - 1) >> 63)

/* The same on 8 bytes at once, bytes as lanes: bit 7 of a lane set when some lane of w is
 * below n (n <= 128), above n (n < 128), equal to c (c < 128); 0 when none is. A lane above
 * a set one may be set wrongly (a borrow or a carry), never one below it. */
#define NAME_ONES  0x0101010101010101ULL
#define NAME_HIGHS 0x8080808080808080ULL
#define NAME_BELOW8(w, n) (((w) - NAME_ONES * (n)) & ~(w) & NAME_HIGHS)
#define NAME_ABOVE8(w, n) ((((w) + NAME_ONES * (127 - (n))) | (w)) & NAME_HIGHS)
#define NAME_HAS8(w, c)   NAME_BELOW8((w) ^ (NAME_ONES * (c)), 1)

/* The bytes from i to the end of its aligned 8 (buf is 8-aligned in the scratch) as lanes
 * of a u64, i's the lowest; the lanes past them 'A', a byte no loop stops at. */
static __always_inline __u64 name_word(volatile struct hybrid_name_scratch *s, __u32 i)
{
	__u64 w = *(volatile __u64 *)__builtin_assume_aligned((void *)&s->buf[i & (NAME_MASK & ~7)], 8);
	__u32 sh = (i & 7) << 3;

	return (w >> sh) | (((~0ULL << (63 - sh)) << 1) & (NAME_ONES * 'A'));
}

/* How many of those bytes come before the first one that m (NAME_*8 tests of name_word(s,
 * i)) flags: the lowest set lane is exact. All of them when none is. */
static __always_inline __u32 name_plain_run(__u64 m, __u32 i)
{
	__u64 low = m & (0 - m);                         /* the lowest set lane's bit 7 */

	/* (1 << 8j) * 0x0001020304050607 has j in its top byte */
	return (((low >> 7) * 0x0001020304050607ULL) >> 56) + ((0 - NAME_EQ(m >> 7, 0)) & (8 - (i & 7)));
}

/* Whether the n bytes at p differ from str (0: equal); fold: letters compared case-blind (a
 * byte that is not a letter never matches one: c | 0x20 is a lower-case letter only for that
 * letter's two cases). All n bytes are read, no early exit: straight code for the verifier;
 * str is a literal, each of its bytes a constant once inlined and unrolled. */
static __always_inline __u32 http_differ(volatile struct hybrid_name_scratch *s, __u32 p,
					 const char *str, int n, int fold)
{
	__u32 d = 0, c;
	int j;

	#pragma unroll
	for (j = 0; j < n; j++) {
		c = NAME_B(s, p + j);
		if (fold && str[j] >= 'a' && str[j] <= 'z')
			c |= 0x20;
		d |= c ^ (__u8)str[j];
	}
	return d;
}

static __always_inline int names_http(volatile struct hybrid_name_scratch *s)
{
	volatile __u16 *line = (volatile __u16 *)s->key.name;
	__u32 i, k, c, p, e, v;
	__u64 st, plain, crlf, stop, w;
	__u8 ch;

	/* The request line. The method: [A-Z]{1,16} (names_read saw the first letter), a space. */
	if (s->len >= HYBRID_NAME_SCAN)
		return HYBRID_CNT_NAME_TOO_LONG;         /* no room for the NUL after it */
	s->buf[s->len & NAME_MASK] = 0;
	s->pos = 1;
	#pragma clang loop unroll(disable)
	for (k = 0; k < NAME_HTTP_METHOD - 1; k++) {
		i = s->pos;
		c = NAME_B(s, i);
		if (i >= s->len || c < 'A' || c > 'Z')
			break;
		s->pos = i + 1;
	}
	i = s->pos;
	if (i >= s->len)
		return HYBRID_CNT_NAME_TRUNCATED;
	if (NAME_B(s, i) != ' ')
		return HYBRID_CNT_NAME_FORM;             /* not a method of [A-Z], or longer */
	if (i + 1 >= s->len)
		return HYBRID_CNT_NAME_TRUNCATED;
	if (NAME_B(s, i + 1) != '/')
		return HYBRID_CNT_NAME_FORM;             /* absolute-form, "*", authority-form, 2 spaces */
	/* The origin-form target, up to the next space: printable ASCII; in its path (before '?')
	 * no '%' (percent-decoding, or nginx's 400) and no "/.." (it may climb above the root). */
	s->pos = i + 1;
	s->st = 0;                                       /* 1: in the query */
	s->a = 0;                                        /* 1: stopped (else: ran out) */
	#pragma clang loop unroll(disable)
	for (k = 0; k < NAME_HTTP_TARGET_ITER; k++) {
		i = s->pos;
		st = s->st;
		w = name_word(s, i);
		i += name_plain_run(NAME_BELOW8(w, 0x21) | NAME_ABOVE8(w, 0x7e) |
				    ((st - 1) & (NAME_HAS8(w, '%') | NAME_HAS8(w, '.') | NAME_HAS8(w, '?'))), i);
		c = NAME_B(s, i);
		stop = (NAME_LT((__u32)(c - 0x21), 0x5e) ^ 1) |
		       ((st ^ 1) & (NAME_EQ(c, '%') | (NAME_EQ(c, '.') & NAME_EQ(NAME_B(s, i - 1), '.') &
							NAME_EQ(NAME_B(s, i - 2), '/'))));
		s->st = st | NAME_EQ(c, '?');
		s->a = stop;
		s->pos = i + (stop ^ 1);
		if (stop)
			break;
	}
	if (!s->a)
		return HYBRID_CNT_NAME_TOO_LONG;         /* ran out: a long target of odd bytes */
	i = s->pos;
	if (i >= s->len)
		return HYBRID_CNT_NAME_TRUNCATED;
	c = NAME_B(s, i);
	if (c != ' ')
		return c < 0x21 || c > 0x7e ? HYBRID_CNT_NAME_ODD : HYBRID_CNT_NAME_FORM;
	/* HTTP/1.1 or HTTP/1.0, then CR LF. */
	i++;
	if (i + 10 > s->len)
		return HYBRID_CNT_NAME_TRUNCATED;
	c = NAME_B(s, i + 7);
	if (http_differ(s, i, "HTTP/1.", 7, 0) || (c != '0' && c != '1') || NAME_B(s, i + 8) != '\r')
		return HYBRID_CNT_NAME_FORM;
	/* The head, from the request line's CR to the empty line: printable ASCII and spaces,
	 * lines ending in CR LF, each line's start into the table. It stops at any other byte, at
	 * the empty line and at a line that starts with a space. */
	s->pos = i + 8;
	s->a = 0;                                        /* lines in the table */
	s->st = 0;                                       /* 1: stopped (else: ran out) */
	#pragma clang loop unroll(disable)
	for (k = 0; k < NAME_HTTP_HEAD_ITER; k++) {
		i = s->pos;
		v = s->a;
		w = name_word(s, i);
		i += name_plain_run(NAME_BELOW8(w, 0x20) | NAME_ABOVE8(w, 0x7e), i);
		c = NAME_B(s, i);
		plain = NAME_LT((__u32)(c - 0x20), 0x5f);
		crlf = NAME_EQ(c, '\r') & NAME_EQ(NAME_B(s, i + 1), '\n');
		c = NAME_B(s, i + 2);
		stop = ((plain | crlf) ^ 1) | (crlf & (NAME_EQ(c, '\r') | NAME_EQ(c, ' ')));
		NAME_HTTP_LINE(v) = i + 2;                   /* kept if crlf */
		s->a = v + crlf;
		s->st = stop;
		s->pos = i + plain + (crlf << 1);
		if (stop)
			break;
	}
	if (!s->st)
		return HYBRID_CNT_NAME_TOO_LONG;         /* ran out: a long head of short lines */
	i = s->pos;
	v = s->a;
	if (i >= s->len)
		return HYBRID_CNT_NAME_TRUNCATED;
	if (v > NAME_HTTP_LINES)
		return HYBRID_CNT_NAME_FORM;             /* too many header lines */
	c = NAME_B(s, i);
	if (v && NAME_HTTP_LINE(v - 1) == i && (c == '\r' || c == ' ')) {
		/* Stopped at a line's start: the empty line, or obs-fold. */
		if (c == ' ')
			return HYBRID_CNT_NAME_ODD;
		if (i + 1 >= s->len)
			return HYBRID_CNT_NAME_TRUNCATED;
		if (NAME_B(s, i + 1) != '\n')
			return HYBRID_CNT_NAME_ODD;
	} else {
		/* Stopped at a byte: not printable (a tab, a bare LF, NUL, non-ASCII), a bare CR. */
		if (c == '\r' && i + 1 >= s->len)
			return HYBRID_CNT_NAME_TRUNCATED;
		return HYBRID_CNT_NAME_ODD;
	}
	/* Which lines are Host, Content-Length, Transfer-Encoding (the name, case-blind, and the
	 * colon right after it: "Host :" is no Host to nginx, nor to the engine, and given up). */
	s->b = 0;                                        /* the Host line's index + 1 */
	s->c = 0;                                        /* the Content-Length line's index + 1 */
	s->st = 0;                                       /* a Transfer-Encoding line */
	s->pos = 0;                                      /* the line */
	#pragma clang loop unroll(disable)
	for (k = 0; k < NAME_HTTP_LINES - 1; k++) {
		v = s->pos;
		if (v + 1 >= s->a)
			break;
		s->pos = v + 1;
		p = NAME_HTTP_LINE(v);
		if (!http_differ(s, p, "host", 4, 1)) {
			c = NAME_B(s, p + 4);
			if (c == ':') {
				if (s->b)
					return HYBRID_CNT_NAME_SEVERAL;
				s->b = v + 1;
			} else if (c == ' ') {
				return HYBRID_CNT_NAME_ODD;      /* "Host :" */
			}
		} else if (!http_differ(s, p, "content-length:", 15, 1)) {
			if (s->c)
				return HYBRID_CNT_NAME_SEVERAL;
			s->c = v + 1;
		} else if (!http_differ(s, p, "transfer-encoding:", 18, 1)) {
			s->st = 1;
		}
	}
	if (!s->b)
		return HYBRID_CNT_NAME_NONE;
	/* Bytes after the head: a body that Content-Length covers to the packet's end (the engine
	 * reads what follows it as another request), else given up. */
	if (NAME_HTTP_LINE(s->a - 1) + 2 < s->len) {
		if (s->st || !s->c)
			return HYBRID_CNT_NAME_SEVERAL;
		p = NAME_HTTP_LINE(s->c - 1) + 15;
		e = NAME_HTTP_LINE(s->c) - 2;
		s->pos = 0;                              /* the value */
		s->out = 0;                              /* its digits */
		s->st = 0;                               /* 1: after them */
		#pragma clang loop unroll(disable)
		for (k = 0; k < NAME_HTTP_CL; k++) {
			if (p + k >= e)
				break;
			c = NAME_B(s, p + k);
			if (c == ' ') {
				if (s->out)
					s->st = 1;
			} else if (c >= '0' && c <= '9' && !s->st && s->out < 9) {
				s->pos = s->pos * 10 + c - '0';
				s->out = s->out + 1;
			} else {
				return HYBRID_CNT_NAME_FORM;
			}
		}
		if (p + k != e || !s->out)
			return HYBRID_CNT_NAME_FORM;
		if (NAME_HTTP_LINE(s->a - 1) + 2 + s->pos < s->len)
			return HYBRID_CNT_NAME_SEVERAL;  /* another request after the body */
		s->out = 0;
	}
	/* The Host value [p, e), e its line's CR; the table is done with: key.name back to zeros. */
	p = NAME_HTTP_LINE(s->b - 1) + 5;
	e = NAME_HTTP_LINE(s->b) - 2;
	__builtin_memset((void *)s->key.name, 0, HYBRID_NAME_LEN);
	#pragma clang loop unroll(disable)
	for (k = 0; k < NAME_HTTP_OWS; k++) {
		if (NAME_B(s, p) != ' ')
			break;
		p++;
	}
	s->pos = p;
	s->a = 1;                                        /* 1: at a label's start */
	#pragma clang loop unroll(disable)
	for (k = 0; k < HYBRID_NAME_MAX + 1; k++) {
		i = s->pos;
		ch = name_char(NAME_B(s, i), 1);
		if (!ch)
			break;
		if (ch == '.') {
			if (s->a)
				return HYBRID_CNT_NAME_FORM;     /* an empty label */
			s->a = 1;
		} else {
			s->a = 0;
		}
		if (name_put(s, ch))
			return HYBRID_CNT_NAME_TOO_LONG;
		s->pos = i + 1;
	}
	p = s->pos;
	if (NAME_B(s, p) == ':') {
		p++;
		#pragma clang loop unroll(disable)
		for (k = 0; k < 6; k++) {
			c = NAME_B(s, p);
			if (c < '0' || c > '9')
				break;
			p++;
		}
		if (k == 0 || k > 5)
			return HYBRID_CNT_NAME_FORM;     /* no port, or more than 5 digits */
	}
	#pragma clang loop unroll(disable)
	for (k = 0; k < NAME_HTTP_OWS; k++) {
		if (NAME_B(s, p) != ' ')
			break;
		p++;
	}
	if (p != e)
		return HYBRID_CNT_NAME_ODD;              /* another byte, or more spaces */
	v = s->out;
	if (v && s->a) {                                 /* one final dot: dropped */
		v--;
		s->key.name[v & (HYBRID_NAME_LEN - 1)] = 0;
		s->out = v;
	}
	return v ? NAME_DONE : HYBRID_CNT_NAME_FORM;     /* an empty Host */
}

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
		if (!NAMES_WITH(HYBRID_NAME_DNS))
			return HYBRID_CNT_NAME_NONE;
		r = names_dns(s, p->proto == IPPROTO_TCP ? 2 : 0);
	} else if (s->buf[0] == 22 && which == HYBRID_NAME_PROG_DNS_TLS) {
		kind = HYBRID_NAME_SNI;
		if (!NAMES_WITH(HYBRID_NAME_SNI))
			return HYBRID_CNT_NAME_NONE;
		r = names_sni(s);
	} else if (s->buf[0] >= 'A' && s->buf[0] <= 'Z' && which == HYBRID_NAME_PROG_HTTP) {
		kind = HYBRID_NAME_HOST;
		if (!NAMES_WITH(HYBRID_NAME_HOST))
			return HYBRID_CNT_NAME_NONE;
		r = names_http(s);
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

/* Does the packet start the next message of a direction the engine follows (struct hybrid_flow,
 * follow)? TCP: it starts exactly at follow_seq, where a request head or a DNS message starts
 * (HYBRID_FOLLOW_M_MESSAGE), outside any byte budget; UDP: every datagram of the direction. */
static __always_inline int names_next_message(const struct hybrid_flow *flow, const struct hybrid_pkt *p,
					      __u32 dir)
{
	__u8 f = flow->follow;

	if (!(f & HYBRID_FOLLOW_ON(dir & 1)))
		return 0;
	if (p->proto != IPPROTO_TCP)
		return 1;
	if (((f >> HYBRID_FOLLOW_MODE_SHIFT(dir & 1)) & 3) != HYBRID_FOLLOW_M_MESSAGE ||
	    (f & HYBRID_FOLLOW_UNTIL(dir & 1)))
		return 0;
	return p->seq == flow->follow_seq[dir & 1];
}

/* A flagged packet that is the first payload of the direction that opened the flow (its
 * first-N spend took payload_packets from 0 to 1), in a flow without a verdict (flagged for
 * INSPECT: the engine reads every packet anyway): the one that carries the name a client asks
 * for. Asked at the end of tc's steps, from the flow entry, so that no flag of it travels
 * through the steps before (a value that differs between paths doubles the verifier's work
 * after it). A packet of the same flow on another CPU in between can only make it say no. */
static __always_inline int names_wanted(const struct hybrid_config *cfg, const struct hybrid_flow *flow,
					const struct hybrid_pkt *p, __u32 dir, __u32 reasons)
{
	if (!(cfg->flags & HYBRID_CFG_NAMES) || !flow || !p->payload_len || (reasons & HYBRID_REASON_INSPECT) ||
	    (dir & 1) != ((flow->flags & HYBRID_FLOW_ORIG_HI) ? 1 : 0) ||
	    (p->proto != IPPROTO_TCP && p->proto != IPPROTO_UDP))
		return 0;
	if (flow->verdict == HYBRID_VERDICT_NONE && flow->payload_packets[dir & 1] == 1)
		return 1;                                 /* the flow's first payload */
	/* The next message of a followed direction (names_followed_at(), namecache.h). */
	return (flow->verdict == HYBRID_VERDICT_NONE || flow->verdict == HYBRID_VERDICT_BYPASS) &&
	       names_next_message(flow, p, dir);
}

#endif /* HYBRID_NAMES_H */
