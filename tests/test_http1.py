"""The sidecar data-plane HTTP/1.1 server: limits enforced per connection, over real sockets."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import pytest

from metaproxy.sidecar.wire.connections import (
    BURST_CONNECTIONS,
    SWEEP_SECONDS,
    ConnectionTracker,
)
from metaproxy.sidecar.wire.http1 import HttpProtocol, protocol_factory
from metaproxy.sidecar.wire.messages import Request, Response, ServerLimits


@dataclass
class Running:
    port: int
    tracker: ConnectionTracker
    rejects: list[str]
    seen: list[Request]


async def slow_answer(request: Request) -> Response:
    await asyncio.sleep(0.05)
    return Response(200, b"slow:" + request.path.encode())


def handler(seen: list[Request]):  # type: ignore[no-untyped-def]
    def handle(request: Request) -> Response | asyncio.Future[Response]:
        seen.append(request)
        if request.path == "/slow":
            return asyncio.ensure_future(slow_answer(request))
        if request.path == "/boom":
            raise RuntimeError("handler bug")
        return Response(200, b"ok:" + request.path.encode(), headers=(("X-Test", "1"),))

    return handle


@pytest.fixture
async def server() -> AsyncIterator[Running]:
    rejects: list[str] = []
    seen: list[Request] = []
    limits = ServerLimits(
        header_timeout=0.6,
        keepalive_timeout=0.8,
        max_headers=10,
        max_header_bytes=2048,
        max_url_bytes=512,
        max_body_bytes=16,
    )
    tracker = ConnectionTracker(limits, on_reject=rejects.append)
    tracker.start()
    factory = protocol_factory(
        handler(seen), tracker, lambda status: Response(status, f"error {status}".encode())
    )
    srv = await asyncio.get_running_loop().create_server(factory, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    yield Running(port, tracker, rejects, seen)
    srv.close()
    await tracker.aclose()


async def exchange(port: int, data: bytes, *, read_timeout: float = 3.0) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    try:
        return await asyncio.wait_for(reader.read(65536), read_timeout)
    finally:
        writer.close()


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


async def test_answers_with_server_date_and_length_headers(server: Running) -> None:
    """A plain GET gets 200, the handler's body and headers, Server and Content-Length, in the
    order EC2 writes them."""
    answer = await exchange(server.port, b"GET /a%20b HTTP/1.1\r\nHost: x\r\n\r\n")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert status_of(answer) == 200
    assert body == b"ok:/a b"
    lines = head.split(b"\r\n")[1:]
    # EC2's order: the content headers (the handler's own among them), then Date and Server.
    assert [line.split(b":")[0] for line in lines] == [
        b"Content-Type", b"X-Test", b"Content-Length", b"Date", b"Server",
    ]  # fmt: skip
    assert b"Server: EC2ws" in lines
    assert b"Content-Length: 7" in lines


async def test_pipelined_requests_are_answered_in_order(server: Running) -> None:
    """A slow request ahead of a fast one on the same connection still answers first."""
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\nGET /fast HTTP/1.1\r\nHost: x\r\n\r\n")
    data = b""
    while data.count(b"HTTP/1.1 200") < 2:
        data += await asyncio.wait_for(reader.read(4096), 3)
    writer.close()
    assert data.index(b"slow:/slow") < data.index(b"ok:/fast")


async def test_head_has_no_body(server: Running) -> None:
    """HEAD answers the headers of GET and no body."""
    answer = await exchange(server.port, b"HEAD /x HTTP/1.1\r\nHost: x\r\n\r\n")
    assert answer.endswith(b"\r\n\r\n")
    assert b"Content-Length: 5" in answer  # len(b"ok:/x")


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"GARBAGE\r\n\r\n", 400),
        (b"GET /" + b"a" * 600 + b" HTTP/1.1\r\n\r\n", 414),
        (b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(12)) + b"\r\n", 431),
        (b"GET / HTTP/1.1\r\nX-Big: " + b"v" * 3000 + b"\r\n\r\n", 431),
        (b"PUT / HTTP/1.1\r\nContent-Length: 99999\r\n\r\n", 413),
        (b"PUT / HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a\x00b\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nZZ\r\n", 400),
    ],
    ids=[
        "garbage",
        "long-url",
        "many-headers",
        "big-header",
        "big-body",
        "negative-length",
        "nul-in-header",
        "bad-chunk",
    ],
)
async def test_malformed_requests_get_4xx_and_close(
    server: Running, raw: bytes, status: int
) -> None:
    """Each malformed request is answered with its 4xx and the connection is closed."""
    answer = await exchange(server.port, raw)
    assert status_of(answer) == status
    assert b"Connection: close" in answer


async def test_handler_error_is_500_without_detail(server: Running) -> None:
    """A bug in a handler answers 500 with the generic page; the server keeps serving."""
    answer = await exchange(server.port, b"GET /boom HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status_of(answer) == 500
    assert b"handler bug" not in answer
    assert status_of(await exchange(server.port, b"GET /ok HTTP/1.1\r\n\r\n")) == 200


async def test_slow_header_senders_are_closed_at_the_deadline(server: Running) -> None:
    """A client trickling its request head is disconnected once the header deadline passes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"GET / HTTP/1.1\r\n")
    closed = False
    for _ in range(20):
        await asyncio.sleep(0.2)
        try:
            writer.write(b"X")
            await writer.drain()
        except ConnectionError:
            closed = True
            break
        if reader.at_eof() or (await _eof_soon(reader)):
            closed = True
            break
    writer.close()
    assert closed
    assert "header_timeout" in server.rejects


async def _eof_soon(reader: asyncio.StreamReader) -> bool:
    try:
        data = await asyncio.wait_for(reader.read(1), 0.01)
    except TimeoutError:
        return False
    return data == b""


async def test_idle_keepalive_connections_are_reaped(server: Running) -> None:
    """After a response, an idle kept-alive connection is closed after the idle timeout."""
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"GET / HTTP/1.1\r\n\r\n")
    await reader.readuntil(b"ok:/")
    assert await asyncio.wait_for(reader.read(), 3) == b""
    writer.close()
    assert not server.tracker.connections


async def test_second_request_head_also_has_a_deadline(server: Running) -> None:
    """After one answered request, a trickled second request head is cut at the deadline too."""
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"GET / HTTP/1.1\r\n\r\n")
    await reader.readuntil(b"ok:/")
    writer.write(b"GET / HTTP/1.1\r\n")  # and never the rest
    assert status_of(await asyncio.wait_for(reader.read(), 3)) == 408
    writer.close()
    assert "header_timeout" in server.rejects


async def read_answers(reader: asyncio.StreamReader, count: int) -> bytes:
    data = b""
    while data.count(b"HTTP/1.1 ") < count:
        data += await asyncio.wait_for(reader.read(65536), 3)
    return data


async def test_a_repeated_request_is_answered_as_often_as_it_is_sent(server: Running) -> None:
    """The same request sent again, alone and then pipelined four at once, gets an answer each
    time, and the handler sees every one of them."""
    request = b"GET /same HTTP/1.1\r\nHost: x\r\nX-Aws-Ec2-Metadata-Token: t\r\n\r\n"
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    for _ in range(3):
        writer.write(request)
        await read_answers(reader, 1)
    writer.write(request * 4)
    answers = await read_answers(reader, 4)
    writer.close()
    assert answers.count(b"ok:/same") == 4
    assert [seen.path for seen in server.seen] == ["/same"] * 7
    assert all(seen.headers["x-aws-ec2-metadata-token"] == "t" for seen in server.seen)


async def repeating_server(
    repeats: Callable[[Request, int], Response | Awaitable[Response] | None],
) -> tuple[asyncio.Server, ConnectionTracker, int]:
    tracker = ConnectionTracker(ServerLimits())
    factory = protocol_factory(
        lambda request: Response(200, b"one:" + request.path.encode()),
        tracker,
        lambda status: Response(status, f"error {status}".encode()),
        repeats=repeats,
    )
    srv = await asyncio.get_running_loop().create_server(factory, "127.0.0.1", 0)
    return srv, tracker, srv.sockets[0].getsockname()[1]


@pytest.mark.parametrize("way", ["at once", "after a wait", "one by one"])
async def test_copies_of_a_request_read_together_are_answered_together(way: str) -> None:
    """A read of four copies of the connection's last request goes to the repeat handler once,
    with the count: its answer (at once, or after a wait) is written four times; when it
    declines, each copy goes to the handler, in order."""
    asked: list[tuple[str, int]] = []

    async def later() -> Response:
        await asyncio.sleep(0.01)
        return Response(200, b"later")

    def repeats(request: Request, count: int) -> Response | Awaitable[Response] | None:
        asked.append((request.path, count))
        if way == "one by one":
            return None
        return Response(200, b"all") if way == "at once" else later()

    srv, tracker, port = await repeating_server(repeats)
    request = b"GET /same HTTP/1.1\r\nHost: x\r\n\r\n"
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    assert (await read_answers(reader, 1)).endswith(b"one:/same")  # the parser's first read
    writer.write(request * 4)
    answers = await read_answers(reader, 4)
    writer.close()
    srv.close()
    await tracker.aclose()
    assert asked == [("/same", 4)]
    expected = {"at once": b"all", "after a wait": b"later", "one by one": b"one:/same"}[way]
    assert answers.count(expected) == 4
    assert answers.count(b"HTTP/1.1 200 OK") == 4


async def test_a_request_like_the_last_but_not_the_same_is_read_afresh(server: Running) -> None:
    """After a request, one of the same length with another path, the same request split over
    two reads, and a mix of the two pipelined are each answered for what they are."""
    first, other = b"GET /aaaa HTTP/1.1\r\n\r\n", b"GET /bbbb HTTP/1.1\r\n\r\n"
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(first)
    await read_answers(reader, 1)
    writer.write(other)
    assert b"ok:/bbbb" in await read_answers(reader, 1)
    writer.write(other[:9])
    await writer.drain()
    await asyncio.sleep(0.05)
    writer.write(other[9:])
    assert b"ok:/bbbb" in await read_answers(reader, 1)
    writer.write(other + first)
    mixed = await read_answers(reader, 2)
    writer.close()
    assert mixed.index(b"ok:/bbbb") < mixed.index(b"ok:/aaaa")
    assert [seen.path for seen in server.seen] == ["/aaaa", "/bbbb", "/bbbb", "/bbbb", "/aaaa"]


async def test_a_repeated_request_asking_to_close_closes(server: Running) -> None:
    """A request with `Connection: close`, however often it came before, gets its answer and
    then the connection closes."""
    closing = b"GET /c HTTP/1.1\r\nConnection: close\r\n\r\n"
    for _ in range(2):
        answer = await exchange(server.port, closing)
        assert b"Connection: close" in answer
        assert answer.endswith(b"ok:/c")


async def test_after_repeated_requests_a_trickled_head_still_has_its_deadline(
    server: Running,
) -> None:
    """A connection that repeated one request still has to send its next head in time."""
    request = b"GET / HTTP/1.1\r\n\r\n"
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    for _ in range(3):
        writer.write(request * 2)
        await read_answers(reader, 2)
    writer.write(request[:8])  # and never the rest
    answer = await asyncio.wait_for(reader.read(), 3)
    writer.close()
    assert status_of(answer) == 408
    assert "header_timeout" in server.rejects


async def test_closed_connection_is_freed_without_the_collector(server: Running) -> None:
    """A closed connection's protocol and parser go with its last reference, not at the
    collector's next full pass (which a pod may not see for hours)."""
    gc.collect()
    gc.disable()
    try:
        answer = await exchange(server.port, b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status_of(answer) == 200
        for _ in range(50):
            if not server.tracker.connections:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)  # the loop drops the transport after connection_lost
        alive = [o for o in gc.get_objects() if isinstance(o, HttpProtocol)]
    finally:
        gc.enable()
    assert alive == []


async def test_the_end_of_a_burst_of_connections_is_told_once() -> None:
    """A burst's worth of connections open at once, then closed: `after_burst` is called once,
    within a sweep; a few connections coming and going after that do not call it again."""
    bursts: list[int] = []
    tracker = ConnectionTracker(ServerLimits(), after_burst=lambda: bursts.append(1))
    tracker.start()
    factory = protocol_factory(lambda request: Response(200, b"ok"), tracker, Response)
    srv = await asyncio.get_running_loop().create_server(factory, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    opened = [await asyncio.open_connection("127.0.0.1", port) for _ in range(BURST_CONNECTIONS)]
    await asyncio.sleep(SWEEP_SECONDS * 2)
    assert bursts == []
    for _, writer in opened:
        writer.close()
    await asyncio.sleep(SWEEP_SECONDS * 3)
    assert bursts == [1]
    for _ in range(3):
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        await asyncio.sleep(SWEEP_SECONDS * 1.5)
        writer.close()
    await asyncio.sleep(SWEEP_SECONDS * 2)
    srv.close()
    await tracker.aclose()
    assert bursts == [1]


async def test_draining_closes_connections_after_their_answer(server: Running) -> None:
    """While draining, an in-flight request is answered, then its connection closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"GET /slow HTTP/1.1\r\n\r\n")
    await asyncio.sleep(0.01)
    server.tracker.draining = True
    answer = await asyncio.wait_for(reader.read(), 3)
    writer.close()
    assert b"slow:/slow" in answer


@pytest.mark.parametrize(
    "head",
    [
        b"PUT /latest/api/token HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc",
        b"PUT /latest/api/token HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab",
    ],
    ids=["content-length", "chunked"],
)
async def test_announced_body_that_never_arrives_is_cut_at_the_deadline(
    server: Running, head: bytes
) -> None:
    """A request whose body stops short gets 408 and a closed socket, not a socket held forever."""
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(head)
    answer = await asyncio.wait_for(reader.read(), 3)
    writer.close()
    assert status_of(answer) == 408
    assert "body_timeout" in server.rejects
    assert not server.tracker.connections


async def test_pipelined_head_behind_a_slow_answer_has_the_deadline(server: Running) -> None:
    """A second head that starts while the first request is answered is cut at the head deadline,
    not kept for the idle timeout."""
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\nGET / HTTP/1.1\r\nX-Part")
    answer = await asyncio.wait_for(reader.read(), 3)
    writer.close()
    assert b"slow:/slow" in answer
    assert answer.count(b"HTTP/1.1 ") == 2
    assert b"HTTP/1.1 408 " in answer
    assert "header_timeout" in server.rejects


@pytest.mark.parametrize("moment", [0.0, 784_111_777.0, 1_700_000_000.5, 4_102_444_799.0])
def test_date_header_is_the_imf_fixdate(moment: float) -> None:
    """The Date header is exactly what email.utils writes (RFC 9110's IMF-fixdate)."""
    import email.utils

    from metaproxy.sidecar.wire.messages import http_date

    assert http_date(moment) == email.utils.formatdate(moment, usegmt=True)
