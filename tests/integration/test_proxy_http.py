"""The load balancer's HTTP/1.1 edge against a real agent, byte for byte: pipelined requests
answered in order, HTTP/1.0 clients (closed after the answer, or kept alive when they ask),
malformed request heads refused with a 4xx/5xx and a closed connection, chunked request bodies
with extensions and trailers, `Expect: 100-continue` relayed, a route's `readtimeout=`, the access
log, absolute-form request targets, and upstream responses that end when the upstream closes.

Requests go over raw sockets (`RawConnection`) where a client library would hide the bytes.
Backends are test_proxy.py's echo server (BACKEND; its fixtures and helpers are imported from
there), plus, for close-delimited responses, a raw socket server (CLOSE_DELIMITED_BACKEND below).
"""

import hashlib
import json
import re
import socket
import time
import uuid
from pathlib import Path
from typing import NamedTuple

import pytest

from support.flotilla import wait_until
from test_proxy import (  # noqa: F401 (backend_script is a fixture: imported to be used here)
    backend_app,
    backend_script,
    deploy,
    echo,
    header,
    health_check,
    pattern,
    proxied,
    route_entries,
)

SOCKET_TIMEOUT = 10

# An HTTP/1.0-style upstream: answers every request with a head that has neither Content-Length
# nor Transfer-Encoding, then a body that ends when it closes the connection. The body is the
# request line it received, a `|`, and BODY_SIZE deterministic bytes sent in several writes.
CLOSE_DELIMITED_BACKEND = r'''
import os
import socket
import threading
import time

PORT = int(os.environ["PORT0"])
BODY_SIZE = 300_000


def pattern(size):
    block = bytes(range(256)) * 256
    whole, rest = divmod(size, len(block))
    return block * whole + block[:rest]


def serve(connection):
    with connection:
        data = b""
        while b"\r\n\r\n" not in data:
            piece = connection.recv(65536)
            if not piece:
                return  # a TCP health check, or a client that gave up
            data += piece
        request_line = data.split(b"\r\n", 1)[0]
        connection.sendall(b"HTTP/1.0 200 OK\r\nContent-Type: application/octet-stream\r\nX-Backend: close-delimited\r\n\r\n")
        connection.sendall(request_line + b"|")
        body = pattern(BODY_SIZE)
        for offset in range(0, BODY_SIZE, 100_000):
            connection.sendall(body[offset:offset + 100_000])
            time.sleep(0.05)
        connection.shutdown(socket.SHUT_WR)


server = socket.create_server(("127.0.0.1", PORT))
server.listen(64)
while True:
    connection, _ = server.accept()
    threading.Thread(target=serve, args=(connection,), daemon=True).start()
'''
CLOSE_DELIMITED_BODY_SIZE = 300_000


# --- raw HTTP/1.1 over a socket ---------------------------------------------------------------


class RawResponse(NamedTuple):
    version: str
    status: int
    reason: str
    headers: list  # [(name, value)] as received
    body: bytes

    def values(self, name: str) -> list:
        return [value for key, value in self.headers if key.lower() == name.lower()]

    def connection_options(self) -> set:
        return {token.strip().lower() for value in self.values("Connection") for token in value.split(",") if token.strip()}


class RawConnection:
    """A client connection to the proxy that sends bytes as given and parses responses itself:
    status line, headers, then a body framed by Content-Length, chunked coding, or the close."""

    def __init__(self, port: int, timeout=SOCKET_TIMEOUT):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffer = b""

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> bool:
        """Reads more bytes into the buffer; False when the peer closed the connection."""
        try:
            piece = self.sock.recv(65536)
        except ConnectionResetError:
            raise AssertionError(f"the proxy reset the connection; received so far: {self.buffer[:500]!r}") from None
        except socket.timeout:
            raise AssertionError(f"no answer within {self.sock.gettimeout()}s; received so far: {self.buffer[:500]!r}") from None
        self.buffer += piece
        return bool(piece)

    def _take_line(self) -> bytes:
        while b"\n" not in self.buffer:
            assert self._fill(), f"connection closed in the middle of a line: {self.buffer[:500]!r}"
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line.rstrip(b"\r")

    def _take(self, size: int) -> bytes:
        while len(self.buffer) < size:
            assert self._fill(), f"connection closed after {len(self.buffer)} of {size} body bytes"
        data, self.buffer = self.buffer[:size], self.buffer[size:]
        return data

    def read_response(self, head_request=False) -> RawResponse:
        """The next response on the connection, interim (1xx) ones included."""
        status_line = self._take_line()
        match = re.fullmatch(rb"(HTTP/\d\.\d) (\d{3})(?: (.*))?", status_line)
        assert match, f"not a status line: {status_line!r} (then {self.buffer[:300]!r})"
        version, status, reason = match.group(1).decode(), int(match.group(2)), (match.group(3) or b"").decode("latin-1")
        headers = []
        while True:
            line = self._take_line()
            if not line:
                break
            name, colon, value = line.partition(b":")
            assert colon and name and name == name.strip(), f"malformed response header line: {line!r}"
            headers.append((name.decode("latin-1"), value.strip().decode("latin-1")))
        response = RawResponse(version, status, reason, headers, b"")
        if head_request or status < 200 or status in (204, 304):
            return response
        if any("chunked" in value.lower() for value in response.values("Transfer-Encoding")):
            return response._replace(body=self._read_chunked())
        lengths = response.values("Content-Length")
        if lengths:
            assert len(set(lengths)) == 1, f"response with conflicting Content-Length: {headers}"
            return response._replace(body=self._take(int(lengths[0])))
        # Neither: the body ends when the connection does.
        while self._fill():
            pass
        body, self.buffer = self.buffer, b""
        return response._replace(body=body)

    def _read_chunked(self) -> bytes:
        parts = []
        while True:
            size = int(self._take_line().split(b";")[0].strip(), 16)
            if size == 0:
                while self._take_line():
                    pass  # trailers
                return b"".join(parts)
            parts.append(self._take(size))
            assert self._take_line() == b"", "chunk data longer than its size"

    def closed_by_peer(self, timeout=5) -> bool:
        """Whether the proxy closes the connection (an orderly close or a reset) within `timeout`
        seconds, with nothing more sent first. False if it stays open."""
        assert not self.buffer, f"bytes after the last response: {self.buffer[:300]!r}"
        self.sock.settimeout(timeout)
        try:
            piece = self.sock.recv(65536)
        except socket.timeout:
            return False
        except ConnectionResetError:
            # The proxy closed while request bytes it never read were still queued (the 431 case):
            # the kernel resets instead of closing in order. Closed all the same.
            return True
        finally:
            self.sock.settimeout(SOCKET_TIMEOUT)
        assert not piece, f"bytes after the last response: {piece[:300]!r}"
        return True


def get_request(path: str, host="proxy-http.test", version="HTTP/1.1", extra="") -> bytes:
    return f"GET {path} {version}\r\nHost: {host}\r\n{extra}\r\n".encode()


def echoed(response: RawResponse) -> dict:
    """The echo backend's JSON answer in a raw response that must be a 200."""
    assert response.status == 200, f"{response.status} {response.reason}: {response.body[:500]!r}"
    return json.loads(response.body)


def assert_serving(agent, src: str) -> None:
    """The agent is running and its proxy still answers a normal request on `src`."""
    assert agent.is_running(), f"the agent exited:\n{agent.log_tail()}"
    answer = echo(proxied(agent, f"{src}/still-serving"))
    assert answer["path"] == f"{src}/still-serving", answer


# --- fixtures ---------------------------------------------------------------------------------


def new_app_id(name: str) -> str:
    return f"/it/proxy-http-{name}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def echo_route(shared_agent, backend_script):
    """One echo backend on the module's shared agent, routed at a unique path prefix."""
    app_id = new_app_id("echo")
    src = f"/h1-{app_id.rsplit('-', 1)[1]}"
    deploy(shared_agent, backend_app(app_id, backend_script, f"urlprefix-{src}"), src)
    yield src
    shared_agent.delete(f"/v2/apps{app_id}")


# --- pipelining -------------------------------------------------------------------------------


def test_pipelined_requests_are_answered_in_order(shared_agent, echo_route):
    agent, src = shared_agent, echo_route
    # The first request takes 0.3 s at the backend: the later ones must still wait their turn.
    # The third has no route and is answered by the proxy itself, between two proxied ones.
    paths = [f"{src}/p/1/slow", f"{src}/p/2", "/no-such-route-for-pipelining", f"{src}/p/4"]
    queries = ["?seconds=0.3", "", "", "?x=4"]
    with RawConnection(agent.proxy_port) as connection:
        connection.send(b"".join(get_request(path + query) for path, query in zip(paths, queries)))
        responses = [connection.read_response() for _ in paths]
        assert [response.status for response in responses] == [200, 200, 404, 200], [
            (response.status, response.body[:200]) for response in responses
        ]
        for index in (0, 1, 3):
            answer = echoed(responses[index])
            assert (answer["path"], answer["query"]) == (paths[index], queries[index].lstrip("?")), (
                f"response {index + 1} of 4 is for another request: {answer}"
            )
        assert b"no route" in responses[2].body.lower(), responses[2]
        assert not connection.closed_by_peer(timeout=0.3), "the proxy closed the connection after pipelined requests"

        # The connection is still in step: one more request, then three more pipelined.
        connection.send(get_request(f"{src}/p/5"))
        assert echoed(connection.read_response())["path"] == f"{src}/p/5"
        connection.send(b"".join(get_request(f"{src}/q/{number}") for number in range(3)))
        assert [echoed(connection.read_response())["path"] for _ in range(3)] == [f"{src}/q/{number}" for number in range(3)]


# --- HTTP/1.0 clients -------------------------------------------------------------------------


def test_http10_client_without_host_is_answered_then_closed(shared_agent, echo_route):
    agent, src = shared_agent, echo_route
    with RawConnection(agent.proxy_port) as connection:
        connection.send(f"GET {src}/old HTTP/1.0\r\nUser-Agent: old-client\r\n\r\n".encode())
        response = connection.read_response()
        answer = echoed(response)
        assert answer["path"] == f"{src}/old", answer
        assert response.connection_options() == {"close"}, f"an HTTP/1.0 client without keep-alive: {response.headers}"
        assert response.values("Content-Length") == [str(len(response.body))], response.headers
        assert connection.closed_by_peer(), "the proxy kept an HTTP/1.0 connection open that did not ask for keep-alive"


def test_http10_client_with_keep_alive_keeps_its_connection(shared_agent, echo_route):
    agent, src = shared_agent, echo_route
    with RawConnection(agent.proxy_port) as connection:
        peer_ports = []
        for number in range(3):
            connection.send(f"GET {src}/ka10/{number} HTTP/1.0\r\nConnection: keep-alive\r\n\r\n".encode())
            response = connection.read_response()
            answer = echoed(response)
            assert answer["path"] == f"{src}/ka10/{number}", answer
            assert response.connection_options() == {"keep-alive"}, f"HTTP/1.0 keep-alive request {number}: {response.headers}"
            assert response.values("Content-Length") == [str(len(response.body))], response.headers
            peer_ports.append(answer["peer_port"])
        assert not connection.closed_by_peer(timeout=0.3), "the proxy closed an HTTP/1.0 keep-alive connection"
    assert len(set(peer_ports)) == 1, f"3 sequential requests reached the backend over several connections: {peer_ports}"


# --- malformed requests -----------------------------------------------------------------------


def oversized_head(src: str) -> bytes:
    """A request head of about 70 KiB, past the proxy's 64 KiB limit."""
    filler = "".join(f"X-Filler-{number:03d}: {'a' * 1000}\r\n" for number in range(70))
    return f"GET {src}/big HTTP/1.1\r\nHost: proxy-http.test\r\n{filler}\r\n".encode()


MALFORMED = [
    # (id, request bytes built from the route's prefix, expected status, a word the body says)
    ("space-before-colon", lambda src: f"GET {src}/x HTTP/1.1\r\nHost : proxy-http.test\r\n\r\n".encode(), 400, "header"),
    ("folded-header", lambda src: f"GET {src}/x HTTP/1.1\r\nHost: proxy-http.test\r\nX-Long: one\r\n two\r\n\r\n".encode(), 400, "fold"),
    (
        "content-length-and-chunked",
        lambda src: f"POST {src}/echo-body HTTP/1.1\r\nHost: proxy-http.test\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n".encode(),
        400,
        "content-length",
    ),
    (
        "conflicting-content-lengths",
        lambda src: f"POST {src}/echo-body HTTP/1.1\r\nHost: proxy-http.test\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n".encode(),
        400,
        "content-length",
    ),
    ("http11-without-host", lambda src: f"GET {src}/x HTTP/1.1\r\nAccept: */*\r\n\r\n".encode(), 400, "host"),
    ("http2-version", lambda src: f"GET {src}/x HTTP/2.0\r\nHost: proxy-http.test\r\n\r\n".encode(), 505, "http/1"),
    ("head-of-70-kib", oversized_head, 431, "kib"),
]


@pytest.mark.parametrize("build, status, word", [case[1:] for case in MALFORMED], ids=[case[0] for case in MALFORMED])
def test_malformed_request_is_refused_and_the_connection_closed(shared_agent, echo_route, build, status, word):
    agent, src = shared_agent, echo_route
    request = build(src)
    with RawConnection(agent.proxy_port) as connection:
        connection.send(request)
        response = connection.read_response()
        assert response.status == status, (
            f"sent {request[:200]!r}…: expected {status}, got {response.status} {response.reason}: {response.body[:300]!r}"
        )
        text = response.body.decode("utf-8", errors="replace")
        assert text.strip() and word in text.lower(), f"the {status} body should say what is wrong ({word!r}): {text!r}"
        assert response.values("Content-Type") and response.values("Content-Type")[0].startswith("text/plain"), response.headers
        assert "close" in response.connection_options(), f"a {status} that closes should say Connection: close: {response.headers}"
        assert connection.closed_by_peer(), f"the proxy left the connection open after a {status}"
    assert_serving(agent, src)


# --- chunked request bodies -------------------------------------------------------------------


def test_chunked_request_body_with_extensions_and_trailers(shared_agent, echo_route):
    agent, src = shared_agent, echo_route
    head = f"POST {src}/echo-body HTTP/1.1\r\nHost: proxy-http.test\r\nTransfer-Encoding: chunked\r\nTrailer: X-Trailer\r\n\r\n".encode()
    big = pattern(70_000)
    body = (
        b"5;ext=1\r\nhello\r\n"
        b'7 ; name="quoted value";flag\r\n, world\r\n'
        + b"%X\r\n" % len(big) + big + b"\r\n"
        + b"0\r\nX-Trailer: 1\r\nX-Other-Trailer: two\r\n\r\n"
    )
    expected = b"hello, world" + big
    with RawConnection(agent.proxy_port) as connection:
        # In pieces that split a chunk-size line, a chunk's data and the trailer section, so the
        # proxy's framing has to carry over from one read to the next.
        cuts = [len(head) + 2, len(head) + 12, len(head) + 30, len(head) + 5000, len(head) + len(body) - 20, len(head) + len(body) - 3]
        message = head + body
        start = 0
        for cut in cuts + [len(message)]:
            connection.send(message[start:cut])
            start = cut
            time.sleep(0.05)
        response = connection.read_response()
        assert response.status == 200, f"{response.status}: {response.body[:300]!r}"
        assert response.values("X-Request-Chunked") == ["yes"], f"the backend did not see a chunked body: {response.headers}"
        assert response.values("X-Body-Sha256") == [hashlib.sha256(expected).hexdigest()], (
            f"the backend decoded another body ({len(response.body)} bytes, {response.body[:40]!r}…)"
        )
        assert response.body == expected
        assert "close" not in response.connection_options(), response.headers

        # The trailers were consumed as part of that request: the next one on the connection works.
        connection.send(get_request(f"{src}/after-chunked"))
        assert echoed(connection.read_response())["path"] == f"{src}/after-chunked"


# --- Expect: 100-continue ---------------------------------------------------------------------


def test_expect_100_continue_is_relayed(shared_agent, echo_route):
    agent, src = shared_agent, echo_route
    body = b"the body, sent only after 100 Continue"
    with RawConnection(agent.proxy_port) as connection:
        connection.send(
            f"POST {src}/echo-body HTTP/1.1\r\nHost: proxy-http.test\r\nExpect: 100-continue\r\n"
            f"Content-Type: text/plain\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        )
        connection.sock.settimeout(5)
        interim = connection.read_response()
        connection.sock.settimeout(SOCKET_TIMEOUT)
        assert (interim.version, interim.status) == ("HTTP/1.1", 100), f"expected an interim 100 Continue first: {interim}"
        assert not interim.body and not connection.buffer, f"bytes after the 100 Continue: {connection.buffer[:200]!r}"
        connection.send(body)
        response = connection.read_response()
        assert response.status == 200, f"{response.status}: {response.body[:300]!r}"
        assert response.body == body and response.values("X-Request-Chunked") == ["no"], response
        assert "close" not in response.connection_options(), response.headers

        connection.send(get_request(f"{src}/after-continue"))
        assert echoed(connection.read_response())["path"] == f"{src}/after-continue"


def test_expect_100_continue_answered_without_a_route_closes(shared_agent, echo_route):
    """A request waiting for 100 Continue that the proxy answers itself (no route): the client may
    never send its body, so the proxy says so and closes instead of waiting to discard it."""
    with RawConnection(shared_agent.proxy_port) as connection:
        connection.send(
            b"POST /no-such-route-for-expect HTTP/1.1\r\nHost: proxy-http.test\r\nExpect: 100-continue\r\n"
            b"Content-Length: 10\r\n\r\n"
        )
        response = connection.read_response()
        assert response.status == 404, response
        assert "close" in response.connection_options(), response.headers
        assert connection.closed_by_peer(), "the proxy kept a connection whose framing it cannot know"


def test_pipelined_request_with_a_body_reaches_the_upstream(shared_agent, echo_route):
    """A POST pipelined behind a GET is sent upstream from the proxy's own buffer, with no read of
    its own to trigger a flush: its body must still go out at once."""
    agent, src = shared_agent, echo_route
    body = b"hello"
    with RawConnection(agent.proxy_port) as connection:
        connection.send(
            get_request(f"{src}/first")
            + f"POST {src}/echo-body HTTP/1.1\r\nHost: proxy-http.test\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        assert echoed(connection.read_response())["path"] == f"{src}/first"
        connection.sock.settimeout(5)
        response = connection.read_response()
        assert response.status == 200 and response.body == body, response


def test_connect_is_refused(shared_agent, echo_route):
    with RawConnection(shared_agent.proxy_port) as connection:
        connection.send(b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n")
        response = connection.read_response()
        assert response.status == 405 and b"CONNECT" in response.body, response
        assert connection.closed_by_peer()


# --- per-route read timeout -------------------------------------------------------------------


def test_route_read_timeout_answers_504(shared_agent, backend_script):
    agent = shared_agent
    app_id = new_app_id("timeout")
    # Not "/slow-…": the echo backend sleeps for every path containing "/slow".
    src = f"/rt-{app_id.rsplit('-', 1)[1]}"
    deploy(agent, backend_app(app_id, backend_script, f"urlprefix-{src} readtimeout=500ms"), src)
    try:
        (entry,) = route_entries(agent, src)
        assert "readtimeout=500ms" in entry["opts"].split(), f"/api/routes entry of {src}: {entry}"

        # The backend waits 3 s before answering; the route allows 0.5 s (the default is 60 s).
        started = time.monotonic()
        response = proxied(agent, f"{src}/slow?seconds=3")
        elapsed = time.monotonic() - started
        assert response.status_code == 504, f"{response.status_code} after {elapsed:.2f}s: {response.text[:300]}"
        assert 0.4 <= elapsed < 2.5, f"the 504 came after {elapsed:.2f}s with readtimeout=500ms"
        assert "500 ms" in response.text, f"the 504 body should name the timeout: {response.text!r}"

        # A prompt answer on the same route is not affected.
        assert echo(proxied(agent, f"{src}/quick"))["path"] == f"{src}/quick"
    finally:
        agent.delete(f"/v2/apps{app_id}")


# --- access log -------------------------------------------------------------------------------


ACCESS_LINE = re.compile(
    r'^(?P<client>\S+) - - \[(?P<time>\d{2}/[A-Z][a-z]{2}/\d{4}:\d{2}:\d{2}:\d{2} \+0000)\] '
    r'"(?P<method>\S+) (?P<target>\S+) (?P<version>HTTP/1\.[01])" (?P<status>\d{3}) (?P<bytes>\d+) '
    r'"(?P<referer>[^"]*)" "(?P<agent>[^"]*)" route="(?P<route>[^"]*)" upstream="(?P<upstream>[^"]*)" '
    r"upstream_ms=(?P<upstream_ms>\d+\.\d{3}|-) total_ms=(?P<total_ms>\d+\.\d{3})$"
)


def access_log_line(path: Path, needle: str, timeout=5) -> re.Match:
    """The first access log line containing `needle`, parsed (the log is flushed every 100 ms)."""

    def find():
        if not path.exists():
            return None
        for line in path.read_text().splitlines():
            if needle in line:
                match = ACCESS_LINE.match(line)
                assert match, f"access log line not in the expected format: {line!r}"
                return match
        return None

    try:
        return wait_until(find, timeout=timeout, interval=0.1, what=f"an access log line with {needle!r}")
    except AssertionError as timed_out:
        text = path.read_text() if path.exists() else "(no file)"
        raise AssertionError(f"{timed_out}\naccess log now:\n{text}") from None


def test_access_log(make_agent, tmp_path, backend_script):
    log_path = tmp_path / "access.log"
    agent = make_agent(extra_args=["--proxy-access-log", str(log_path)])
    app_id = new_app_id("logged")
    deploy(agent, backend_app(app_id, backend_script, "urlprefix-/logged"), "/logged")
    port = agent.tasks(app_id)[0]["ports"][0]

    response = proxied(agent, "/logged/items?x=1", headers={"User-Agent": "flotilla-test", "Referer": "http://r/"})
    assert response.status_code == 200, response.text[:300]
    line = access_log_line(log_path, '"GET /logged/items?x=1 HTTP/1.1"')
    assert line.group(0).count(" 200 ") == 1, line.group(0)
    assert (line["client"], line["method"], line["target"], line["status"]) == ("127.0.0.1", "GET", "/logged/items?x=1", "200"), line.group(0)
    assert int(line["bytes"]) == len(response.content), f"{len(response.content)} body bytes were sent: {line.group(0)}"
    assert (line["referer"], line["agent"]) == ("http://r/", "flotilla-test"), line.group(0)
    assert (line["route"], line["upstream"]) == ("/logged", f"127.0.0.1:{port}"), line.group(0)
    assert line["upstream_ms"] != "-" and float(line["upstream_ms"]) <= float(line["total_ms"]) < 5000, line.group(0)

    response = proxied(agent, "/not-routed/anywhere", headers={"User-Agent": "flotilla-test"})
    assert response.status_code == 404
    line = access_log_line(log_path, '"GET /not-routed/anywhere HTTP/1.1"')
    assert line["status"] == "404" and " 404 " in line.group(0), line.group(0)
    assert (line["referer"], line["agent"], line["route"], line["upstream"]) == ("-", "flotilla-test", "", "-"), line.group(0)
    assert line["upstream_ms"] == "-", f"no upstream answered a 404 of the proxy's own: {line.group(0)}"


# --- absolute-form targets --------------------------------------------------------------------


def test_absolute_form_target_is_routed_and_sent_in_origin_form(shared_agent, echo_route):
    agent, src = shared_agent, echo_route
    with RawConnection(agent.proxy_port) as connection:
        connection.send(f"GET http://anyhost{src}/abs/x?q=1 HTTP/1.1\r\nHost: anyhost\r\n\r\n".encode())
        answer = echoed(connection.read_response())
        assert answer["raw_path"] == f"{src}/abs/x?q=1", f"the backend must get the origin form, not the absolute URL: {answer}"
        assert (answer["path"], answer["query"]) == (f"{src}/abs/x", "q=1"), answer
        assert header(answer, "Host") == ["anyhost"], answer["headers"]

        # With a port in the authority and only a query after it.
        connection.send(f"GET http://anyhost:8080{src}?only=query HTTP/1.1\r\nHost: anyhost:8080\r\n\r\n".encode())
        answer = echoed(connection.read_response())
        assert answer["raw_path"] == f"{src}?only=query", answer


# --- close-delimited upstream responses -------------------------------------------------------


@pytest.fixture(scope="module")
def close_delimited_script(tmp_path_factory):
    path = tmp_path_factory.mktemp("proxy-http-backend") / "close_delimited.py"
    path.write_text(CLOSE_DELIMITED_BACKEND)
    return path


def test_close_delimited_upstream_response_reaches_the_client_whole(shared_agent, close_delimited_script):
    agent = shared_agent
    app_id = new_app_id("close")
    src = f"/close-{app_id.rsplit('-', 1)[1]}"
    tcp_check = {key: value for key, value in health_check(protocol="TCP").items() if key != "path"}
    deploy(agent, backend_app(app_id, close_delimited_script, f"urlprefix-{src}", healthChecks=[tcp_check]), src)
    expected = f"GET {src}/old-style HTTP/1.1|".encode() + pattern(CLOSE_DELIMITED_BODY_SIZE)
    try:
        with RawConnection(agent.proxy_port) as connection:
            connection.send(get_request(f"{src}/old-style"))
            response = connection.read_response()
            assert response.status == 200, f"{response.status}: {response.body[:300]!r}"
            assert response.version == "HTTP/1.1" and response.values("X-Backend") == ["close-delimited"], response.headers
            assert not response.values("Content-Length") and not response.values("Transfer-Encoding"), response.headers
            assert response.connection_options() == {"close"}, (
                f"a response that ends with the connection must tell the client Connection: close: {response.headers}"
            )
            # read_response read until the proxy closed: the body is whole and nothing follows.
            assert len(response.body) == len(expected) and response.body == expected, (
                f"{len(response.body)} of {len(expected)} body bytes; starts {response.body[:60]!r}"
            )

        # Another client request on a new connection works too (the upstream connection is not reused).
        with RawConnection(agent.proxy_port) as connection:
            connection.send(get_request(f"{src}/again"))
            response = connection.read_response()
            assert response.status == 200 and response.body == f"GET {src}/again HTTP/1.1|".encode() + pattern(CLOSE_DELIMITED_BODY_SIZE)
    finally:
        agent.delete(f"/v2/apps{app_id}")


# --- idle client connections ----------------------------------------------------------------


def test_idle_and_slow_clients_are_let_go(make_agent, backend_script):
    """`--proxy-idle-timeout`: a keep-alive connection that goes quiet between requests is closed,
    and one that sends only part of a head for that long (slow loris) gets a 408 first. One that
    keeps talking, and a request waiting on its upstream, are left alone."""
    agent = make_agent(extra_args=["--proxy-idle-timeout", "1s"])
    app_id = new_app_id("idle")
    deploy(agent, backend_app(app_id, backend_script, "urlprefix-/idle"), "/idle")

    with RawConnection(agent.proxy_port) as quiet, RawConnection(agent.proxy_port) as loris, RawConnection(agent.proxy_port) as busy:
        quiet.send(get_request("/idle/once"))
        assert quiet.read_response().status == 200
        loris.send(b"GET /idle/slow HTTP/1.1\r\nHost: proxy-http.test\r\n")
        started = time.monotonic()
        # The busy client sends a request every 0.3 s for 3.5 s, longer than three idle periods;
        # the loris sends one more header byte each time, so it is never quiet, only late.
        while time.monotonic() - started < 3.5:
            busy.send(get_request("/idle/busy"))
            assert busy.read_response().status == 200
            try:
                loris.send(b"X")
            except OSError:
                pass  # already answered and closed
            time.sleep(0.3)
        assert quiet.closed_by_peer(timeout=1), "an idle keep-alive connection outlived two idle periods"
        answer = loris.read_response()
        assert answer.status == 408 and b"in time" in answer.body, answer
        assert loris.closed_by_peer(timeout=1)
        busy.send(get_request("/idle/still-busy"))
        assert busy.read_response().status == 200

    # A slow upstream (the backend sleeps on /slow paths) is not an idle client.
    with RawConnection(agent.proxy_port) as waiting:
        waiting.send(get_request("/idle/slow?seconds=2.5"))
        response = waiting.read_response()
        assert response.status == 200, response


def test_a_stalled_response_is_cut_and_a_moving_one_is_not(make_agent, backend_script):
    """With `--proxy-idle-timeout 1s`, a server-sent-event stream that goes quiet for 3 s (the
    backend's `gap`) is ended by the proxy, while one with an event every 0.4 s arrives whole."""
    agent = make_agent(extra_args=["--proxy-idle-timeout", "1s"])
    app_id = new_app_id("stall")
    deploy(agent, backend_app(app_id, backend_script, "urlprefix-/stall"), "/stall")

    with RawConnection(agent.proxy_port) as moving:
        moving.send(get_request("/stall/sse?gap=0.4"))
        response = moving.read_response()
        assert response.status == 200 and response.body.count(b"data: event") == 3, response

    with RawConnection(agent.proxy_port) as stalled:
        started = time.monotonic()
        stalled.send(get_request("/stall/sse?gap=3"))
        received = b""
        while True:
            try:
                piece = stalled.sock.recv(65536)
            except (ConnectionResetError, socket.timeout):
                break
            if not piece:
                break
            received += piece
        elapsed = time.monotonic() - started
        assert b"data: event 0" in received and b"data: event 1" not in received, received
        assert elapsed < 2.9, f"the quiet stream was cut after {elapsed:.1f} s, not within two idle periods"


def test_an_answer_given_mid_upload_is_read_not_reset(shared_agent, echo_route):
    """A 16 MiB upload to a path with no route: the proxy answers 404 at once and then closes only
    its sending side (a lingering close), reading and dropping the rest, so the client reads the
    404 instead of losing it to the reset a full close causes when more data arrives."""
    size = 16 << 20
    with RawConnection(shared_agent.proxy_port) as connection:
        connection.send(f"POST /no-route-for-this-upload HTTP/1.1\r\nHost: proxy-http.test\r\nContent-Length: {size}\r\n\r\n".encode())
        chunk = b"x" * 65536
        for _ in range(size // len(chunk)):
            connection.send(chunk)  # raises if the proxy reset the connection
        response = connection.read_response()
        assert response.status == 404 and b"no route" in response.body, response
        assert "close" in response.connection_options(), response.headers
        assert connection.closed_by_peer()


def test_uploads_slow_and_stalled(make_agent, backend_script):
    """The read timeout (here the route's 500 ms) counts from the end of the request, so a slow
    upload is not cut by it; an upload that stops altogether gets a 408 within two idle periods."""
    agent = make_agent(extra_args=["--proxy-idle-timeout", "1s"])
    app_id = new_app_id("upload")
    deploy(agent, backend_app(app_id, backend_script, "urlprefix-/upload readtimeout=500ms"), "/upload")
    body = b"0123456789" * 6

    with RawConnection(agent.proxy_port) as slow:
        slow.send(f"POST /upload/echo-body HTTP/1.1\r\nHost: proxy-http.test\r\nContent-Length: {len(body)}\r\n\r\n".encode())
        for offset in range(0, len(body), 10):  # 1.5 s in all, three times the read timeout
            time.sleep(0.25)
            slow.send(body[offset:offset + 10])
        response = slow.read_response()
        assert response.status == 200 and response.body == body, response

    with RawConnection(agent.proxy_port) as stalled:
        started = time.monotonic()
        stalled.send(f"POST /upload/echo-body HTTP/1.1\r\nHost: proxy-http.test\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body[:10])
        response = stalled.read_response()
        assert response.status == 408 and b"stopped arriving" in response.body, response
        assert time.monotonic() - started < 3.5
        assert stalled.closed_by_peer()
