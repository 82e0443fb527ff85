"""Request framing as the connection guard follows it: where each head starts and ends."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from metaproxy.net.framing import RequestFraming

HEADER_NAMES = st.sampled_from(["Host", "Accept", "X-Trace", "Authorization", "Content-Type"])


@st.composite
def requests(draw: st.DrawFn) -> tuple[bytes, list[int]]:
    """A POST with a body and Content-Length anywhere among its headers, and how to cut it."""
    body = draw(st.binary(max_size=200))
    others = draw(st.lists(st.tuples(HEADER_NAMES, st.text("abcxyz019 ", max_size=20))))
    position = draw(st.integers(min_value=0, max_value=len(others)))
    headers = [f"{name}: {value}".encode() for name, value in others]
    spelling = draw(st.sampled_from(["Content-Length", "content-length", "CONTENT-LENGTH"]))
    headers.insert(position, f"{spelling}: {len(body)}".encode())
    message = b"POST /v1/credentials HTTP/1.1\r\n" + b"\r\n".join(headers) + b"\r\n\r\n" + body
    cuts = sorted(draw(st.lists(st.integers(0, len(message)), max_size=6)))
    return message, cuts


@given(requests())
def test_a_complete_request_ends_the_head_wherever_content_length_stands(
    case: tuple[bytes, list[int]],
) -> None:
    """Content-Length before other headers (CRLF after it) frames the body as well as last."""
    message, cuts = case
    framing = RequestFraming()
    for start, end in zip([0, *cuts], [*cuts, len(message)], strict=True):
        framing.feed(message[start:end])
    assert not framing.in_head  # waiting for the next request: no deadline runs
    framing.feed(b"G")
    assert framing.in_head  # the next head has begun


def test_a_request_answered_slowly_is_not_a_slow_head() -> None:
    """The head and its body in one read, Content-Length not last: the head is over."""
    framing = RequestFraming()
    framing.feed(
        b"POST /v1/credentials HTTP/1.1\r\nContent-Length: 2\r\nHost: x\r\n"
        b"Content-Type: application/json\r\n\r\n{}"
    )
    assert not framing.in_head
