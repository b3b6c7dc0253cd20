"""hybrid.engine.follow: where a client's next request (or DNS message) starts, read as nginx reads
the stream, and every ambiguity a doubt, never a guess."""

from __future__ import annotations

import pytest

from hybrid.engine.follow import BODY, CHUNK, CHUNK_END, MESSAGE, Streams, walk_dns, walk_http

GET = b"GET / HTTP/1.1\r\nHost: a.example\r\n\r\n"
GET_B = b"GET / HTTP/1.1\r\nHost: b.example\r\n\r\n"


def post(body: bytes, extra: bytes = b"") -> bytes:
    return b"POST /up HTTP/1.1\r\nHost: a.example\r\n" + extra + b"Content-Length: %d\r\n\r\n" % len(body) + body


def chunked(*chunks: bytes, trailer: bytes = b"") -> bytes:
    body = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n" + trailer + b"\r\n"
    return b"POST /up HTTP/1.1\r\nHost: a.example\r\nTransfer-Encoding: chunked\r\n\r\n" + body


def hosts(w) -> list:
    return [r.host for _, _, r in w.messages]


def test_one_request_then_the_next_boundary():
    w = walk_http(GET)
    assert hosts(w) == ["a.example"] and (w.next, w.mode, w.carry, w.doubt, w.stop) == (len(GET), MESSAGE, False, None, False)


def test_pipelined_requests_each_read():
    data = GET + post(b"abc") + GET_B
    w = walk_http(data)
    assert hosts(w) == ["a.example", "a.example", "b.example"] and w.next == len(data)


def test_content_length_body_beyond_the_bytes():
    w = walk_http(post(b"x" * 5000)[:1000])
    assert hosts(w) == ["a.example"] and w.mode == MESSAGE and w.next == len(post(b"x" * 5000))


def test_body_mode_continues_with_what_is_left():
    w = walk_http(b"y" * 10 + GET_B, BODY, left=10, after=MESSAGE)
    assert hosts(w) == ["b.example"]


def test_chunked_body_then_next_request():
    data = chunked(b"a" * 100, b"b" * 7) + GET_B
    w = walk_http(data)
    assert hosts(w) == ["a.example", "b.example"] and w.next == len(data)


def test_chunked_cut_everywhere_resumes_from_the_kernel_mode():
    data = chunked(b"a" * 300, b"b" * 20, trailer=b"X-T: 1\r\n") + GET_B
    for cut in range(1, len(data)):
        w = walk_http(data[:cut])
        assert w.doubt is None and not w.stop, cut
        rest = data[w.next:]
        w2 = walk_http(rest, w.mode)
        assert w2.doubt is None and hosts(w2)[-1:] == ["b.example"], (cut, w.mode, w.next)


def test_cut_head_is_carried():
    data = GET + GET_B[:10]
    w = walk_http(data)
    assert w.carry and w.next == len(GET) and w.mode == MESSAGE


@pytest.mark.parametrize("head, why", [
    (b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n", "http:ambiguous-framing"),
    (b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", "http:ambiguous-framing"),
    (b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", "http:ambiguous-framing"),
    (b"POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\n", "http:bad-content-length"),
    (b"POST / HTTP/1.1\r\nContent-Length: +3\r\n\r\n", "http:bad-content-length"),
    (b"POST / HTTP/1.1\r\nContent-Length : 3\r\n\r\n", "http:odd-framing-header"),
    (b"POST / HTTP/1.1\r\nX: a\r\n folded\r\n\r\n", "http:folded-header"),
    (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", "http:duplicate_host"),
])
def test_framing_doubts(head, why):
    assert walk_http(head + b"abc").doubt == why


@pytest.mark.parametrize("chunk, why", [
    (b"5 \r\nhello\r\n0\r\n\r\n", "http:chunk-line"),
    (b"5\nhello\r\n0\r\n\r\n", "http:chunk-line"),
    (b"5\r\nhelloXX0\r\n\r\n", "http:chunk-end"),
    (b"zz\r\n", "http:chunk-line"),
    (b"0\r\nbad trailer\r\n\r\n", "http:trailer"),
])
def test_chunk_doubts(chunk, why):
    assert walk_http(chunk, CHUNK).doubt == why


def test_chunk_end_mode():
    assert hosts(walk_http(b"\r\n0\r\n\r\n" + GET_B, CHUNK_END)) == ["b.example"]


def test_not_http_at_a_boundary_stops():
    assert walk_http(b"\x16\x03\x01\x00\x05hello").stop                  # a TLS tunnel after CONNECT
    assert walk_http(b"get / HTTP/1.1\r\n\r\n").stop                       # nginx: 400
    w = walk_http(b"CONNECT a:443 HTTP/1.1\r\nHost: a\r\n\r\n\x16\x03\x01")
    assert w.stop and len(w.messages) == 1


def test_leading_empty_lines_are_skipped_like_nginx():
    assert hosts(walk_http(b"\r\n\r\n" + GET_B)) == ["b.example"]


def test_http09_is_a_request_and_ends_following():
    w = walk_http(b"GET /x\r\n")
    assert len(w.messages) == 1 and w.stop


def test_dns_messages_on_tcp():
    msg = b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x01a\x00\x00\x01\x00\x01"
    two = len(msg).to_bytes(2, "big") + msg
    w = walk_dns(two * 3 + two[:5])
    assert len(w.messages) == 3 and w.carry and w.next == 3 * len(two)
    assert walk_dns(b"\x00\x05hello").doubt == "dns:short-message"


def test_streams_are_bounded_and_keyed_by_boundary():
    st = Streams()
    st.MAX_ENTRIES = 2
    st.put(("a", 0), 100, b"abc")
    st.put(("b", 0), 5, b"", left=7)
    st.put(("c", 0), 9, b"zz")
    assert st.get(("a", 0), 100) is None and st.forgotten == 1       # the oldest went
    assert st.get(("b", 0), 6) is None and st.get(("b", 0), 5).left == 7
    assert st.bytes == 2
