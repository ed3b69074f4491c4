"""The built-in load balancer against a real agent: routes from `urlprefix-` tags (strip, prepend,
host routes, longest prefix), 404 and 503 answers, balancing (round-robin, random, weights),
forwarded and hop-by-hop headers, large and streamed bodies, keep-alive both ways, retries and
passive health, TCP routes, metrics, and no failed request while an app restarts or scales down.

Backends are a small Python HTTP server (BACKEND below) that answers every request with what it
saw: method, path, query, headers, its instance id and the client port of the connection.
"""

import hashlib
import http.client
import json
import re
import socket
import threading
import time
from collections import Counter

import pytest
import requests

from support.flotilla import app_definition, free_tcp_port, wait_until

BACKEND = r'''
import hashlib
import json
import os
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

INSTANCE = os.environ.get("FLOTILLA_INSTANCE_ID", "?")
PORT = int(os.environ["PORT0"])


def pattern(size):
    """`size` deterministic bytes (the test computes the same)."""
    block = bytes(range(256)) * 256
    whole, rest = divmod(size, len(block))
    return block * whole + block[:rest]


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    # Seconds an idle keep-alive connection stays open (IDLE_TIMEOUT; none by default).
    timeout = float(os.environ.get("IDLE_TIMEOUT", "0")) or None

    def log_message(self, *args):
        pass

    def read_body(self):
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            parts = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(parts), True
                parts.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length), False

    def send_bytes(self, status, body, content_type="application/json"):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Instance", INSTANCE)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def start_chunked(self, content_type):
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("X-Instance", INSTANCE)
        self.end_headers()

    def chunk(self, data):
        self.wfile.write(b"%x\r\n" % len(data) + data + b"\r\n")
        self.wfile.flush()

    def handle_any(self):
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        if self.headers.get("Upgrade", "").lower() == "websocket":
            # Enough of a WebSocket server for a proxy test: switch, greet at once (so the greeting
            # travels with the 101), then echo raw bytes until the client closes.
            self.send_response(101)
            self.send_header("Upgrade", "websocket")
            self.send_header("Connection", "Upgrade")
            self.end_headers()
            self.wfile.write(b"welcome from " + INSTANCE.encode() + b"|")
            self.wfile.flush()
            if url.path.endswith("/sink"):
                # Takes everything until the client's end, slowly (so the proxy holds bytes for
                # it when the client's end arrives), and says on stdout what arrived.
                digest, size = hashlib.sha256(), 0
                while data := self.connection.recv(65536):
                    digest.update(data)
                    size += len(data)
                    time.sleep(0.002)
                print(f"sink received {size} {digest.hexdigest()}", flush=True)
                self.close_connection = True
                return
            while True:
                data = self.connection.recv(65536)
                if not data:
                    break
                self.connection.sendall(data)
            self.close_connection = True
            return
        body, chunked = self.read_body()
        if url.path.endswith("/echo-body"):
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("X-Request-Chunked", "yes" if chunked else "no")
            self.send_header("X-Body-Sha256", hashlib.sha256(body).hexdigest())
            self.end_headers()
            self.wfile.write(body)
            return
        if url.path.endswith("/sse"):
            self.start_chunked("text/event-stream")
            for number in range(3):
                if number:
                    time.sleep(float(query.get("gap", ["0.7"])[0]))
                self.chunk(b"id: %d\ndata: event %d from %s\n\n" % (number, number, INSTANCE.encode()))
            self.chunk(b"")
            return
        if url.path.endswith("/stream"):
            size = int(query.get("bytes", ["0"])[0])
            data = pattern(size)
            self.start_chunked("application/octet-stream")
            for offset in range(0, size, 65536):
                self.chunk(data[offset:offset + 65536])
            self.chunk(b"")
            return
        if "/slow" in url.path:
            time.sleep(float(query.get("seconds", ["1"])[0]))
        status = 200
        if "/status/" in url.path:
            status = int(url.path.rsplit("/status/", 1)[1].split("/")[0])
        answer = {
            "instance": INSTANCE,
            "method": self.command,
            "path": url.path,
            "query": url.query,
            "raw_path": self.path,
            "headers": [[name, value] for name, value in self.headers.items()],
            "peer_port": self.client_address[1],
            "body_length": len(body),
        }
        self.send_bytes(status, json.dumps(answer).encode())

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = handle_any


def tcp_echo():
    server = socket.create_server(("127.0.0.1", PORT), reuse_port=False)
    server.listen(64)

    def serve(connection):
        with connection:
            connection.sendall(b"hello from " + INSTANCE.encode() + b"\n")
            first = True
            while True:
                data = connection.recv(65536)
                if not data:
                    return
                if first and data.startswith(b"dump "):
                    # Sends that many bytes and closes at once: the relay must deliver them all.
                    connection.sendall(pattern(int(data[5:].strip())))
                    return
                first = False
                connection.sendall(data)

    while True:
        connection, _ = server.accept()
        threading.Thread(target=serve, args=(connection,), daemon=True).start()


if __name__ == "__main__":
    if sys.argv[1:] == ["tcp"]:
        tcp_echo()
    else:
        ThreadingHTTPServer.daemon_threads = True
        ThreadingHTTPServer.request_queue_size = 128
        ThreadingHTTPServer(("127.0.0.1", PORT), Handler).serve_forever()
'''

PROXY_TIMEOUT = 10


def pattern(size: int) -> bytes:
    block = bytes(range(256)) * 256
    whole, rest = divmod(size, len(block))
    return block * whole + block[:rest]


@pytest.fixture(scope="module")
def backend_script(tmp_path_factory):
    path = tmp_path_factory.mktemp("proxy-backend") / "backend.py"
    path.write_text(BACKEND)
    return path


def health_check(**fields) -> dict:
    check = {
        "protocol": "HTTP",
        "path": "/health",
        "portIndex": 0,
        "gracePeriodSeconds": 10,
        "intervalSeconds": 1,
        "timeoutSeconds": 0.5,
        "maxConsecutiveFailures": 3,
    }
    return {**check, **fields}


def backend_app(app_id, script, tags="", instances=1, mode="", **fields) -> dict:
    """The echo backend, with `tags` as its SERVICE_TAGS and an HTTP health check (so it is in a
    route only once it answers)."""
    labels = {"SERVICE_TAGS": tags} if tags else {}
    check = {**health_check(protocol="TCP"), "path": None} if mode == "tcp" else health_check()
    check = {key: value for key, value in check.items() if value is not None}
    definition = app_definition(
        app_id,
        f"exec python3 {script} {mode}".strip(),
        instances=instances,
        portDefinitions=[{"port": 0}],
        labels=labels,
        healthChecks=[check],
        backoffSeconds=0.2,
        backoffFactor=1,
    )
    definition.update(fields)
    return definition


def routes(agent) -> list:
    response = agent.get("/api/routes")
    assert response.status_code == 200, f"GET /api/routes: {response.status_code} {response.text}"
    return response.json()


def route_entries(agent, src: str) -> list:
    return [entry for entry in routes(agent) if entry["src"] == src]


def wait_for_targets(agent, src: str, count: int, timeout=20) -> list:
    """The entries of route `src` once it has exactly `count` destinations."""

    def ready():
        entries = [entry for entry in route_entries(agent, src) if entry["dst"]]
        return entries if len(entries) == count else None

    try:
        return wait_until(ready, timeout=timeout, what=f"route {src} with {count} targets")
    except AssertionError as timed_out:
        raise AssertionError(f"{timed_out}\nroutes now: {json.dumps(routes(agent), indent=1)}") from None


def deploy(agent, definition, src=None, timeout=20) -> list:
    """Creates the app and waits for its instances to run and pass their health check, and (with
    `src`) to be routed to; returns the route's entries then."""
    app_id, count = definition["id"], definition["instances"]
    agent.create_app(definition)

    def healthy():
        app = agent.app(app_id)
        return app["tasksRunning"] == count and app["tasksHealthy"] == count and len(agent.tasks(app_id)) == count

    wait_until(healthy, timeout=timeout, what=f"{count} healthy instances of {app_id}")
    if src is not None:
        return wait_for_targets(agent, src, count, timeout=timeout)
    return []


def task_ids(agent, app_id) -> set:
    return {task["id"] for task in agent.tasks(app_id)}


def proxied(agent, path, method="GET", **kwargs) -> requests.Response:
    kwargs.setdefault("timeout", PROXY_TIMEOUT)
    return requests.request(method, agent.proxy_url + path, **kwargs)


def echo(response) -> dict:
    assert response.status_code == 200, f"{response.request.method} {response.request.url}: {response.status_code} {response.text[:500]}"
    return response.json()


def header(answer: dict, name: str):
    """The values the backend saw for header `name`."""
    return [value for key, value in answer["headers"] if key.lower() == name.lower()]


METRIC_LINE = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>[^}]*)\})?\s+(?P<value>\S+)")


def metrics(agent) -> list:
    """[(name, {label: value}, float value)] from GET /metrics."""
    response = agent.get("/metrics")
    assert response.status_code == 200, f"GET /metrics: {response.status_code} {response.text[:300]}"
    samples = []
    for line in response.text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = METRIC_LINE.match(line)
        assert match, f"unparsable metrics line: {line!r}"
        labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', match.group("labels") or ""))
        samples.append((match.group("name"), labels, float(match.group("value"))))
    return samples


def metric(agent, name, **labels) -> float:
    """The sum of the samples of `name` whose labels include `labels` (0 when there is none)."""
    return sum(value for sample, found, value in metrics(agent) if sample == name and labels.items() <= found.items())


def unique_suffix(app_id: str) -> str:
    return app_id.rsplit("-", 1)[1]


# --- routing ----------------------------------------------------------------------------------


def test_routing_strip_longest_prefix_host_and_prepend(make_agent, app_ids, backend_script):
    agent = make_agent()
    api, v2, shop, pre = (app_ids.new(name) for name in ("api", "api-v2", "shop", "pre"))
    deploy(agent, backend_app(api, backend_script, "urlprefix-/api strip=/api"), "/api")
    deploy(agent, backend_app(v2, backend_script, "urlprefix-/api/v2"), "/api/v2")
    deploy(agent, backend_app(shop, backend_script, "urlprefix-shop.test/"), "shop.test/")
    deploy(agent, backend_app(pre, backend_script, "urlprefix-/pre strip=/pre prepend=/inner"), "/pre")
    api_tasks, v2_tasks, shop_tasks, pre_tasks = (task_ids(agent, app) for app in (api, v2, shop, pre))

    answer = echo(proxied(agent, "/api/users/7?full=1&x=%20y"))
    assert answer["instance"] in api_tasks, answer
    assert (answer["path"], answer["query"]) == ("/users/7", "full=1&x=%20y"), answer
    answer = echo(proxied(agent, "/api?only=query"))
    assert answer["instance"] in api_tasks and answer["path"] == "/" and answer["query"] == "only=query", answer
    answer = echo(proxied(agent, "/api/v2/orders"))
    assert answer["instance"] in v2_tasks, f"/api/v2 is the longest prefix of /api/v2/orders: {answer}"
    assert answer["path"] == "/api/v2/orders", f"/api/v2 has no strip: {answer}"
    answer = echo(proxied(agent, "/api/v1/orders"))
    assert answer["instance"] in api_tasks and answer["path"] == "/v1/orders", answer

    for host in ("shop.test", "SHOP.test", f"shop.test:{agent.proxy_port}"):
        answer = echo(proxied(agent, "/api/cart", headers={"Host": host}))
        assert answer["instance"] in shop_tasks, f"Host {host}: host routes come before path routes: {answer}"
        assert answer["path"] == "/api/cart" and header(answer, "Host") == [host], answer

    answer = echo(proxied(agent, "/pre/x/y?q=1"))
    assert answer["instance"] in pre_tasks, answer
    assert (answer["path"], answer["query"]) == ("/inner/x/y", "q=1"), answer
    answer = echo(proxied(agent, "/pre"))
    assert answer["path"] == "/inner", answer

    # No route: 404 saying so, for another host too (the host route matches shop.test only).
    for path, host in (("/nothing/here", None), ("/", "other.test")):
        response = proxied(agent, path, headers={"Host": host} if host else None)
        assert response.status_code == 404, f"GET {path} (Host {host}): {response.status_code} {response.text[:300]}"
        assert "no route" in response.text.lower() and len(response.text) < 300, response.text

    # Routes, with destinations and weights, as Fabio's /api/routes shows them.
    table = routes(agent)
    by_src = {}
    for entry in table:
        by_src.setdefault(entry["src"], []).append(entry)
    assert {"/api", "/api/v2", "shop.test/", "/pre"} <= by_src.keys(), table
    for src, app in (("/api", api), ("/api/v2", v2), ("shop.test/", shop), ("/pre", pre)):
        (entry,) = by_src[src]
        port = agent.tasks(app)[0]["ports"][0]
        assert entry["dst"] == f"http://127.0.0.1:{port}/", entry
        assert entry["weight"] == pytest.approx(1.0), entry
        assert entry["service"] == app.strip("/").replace("/", "-"), entry
    assert by_src["/api"][0]["opts"] == "strip=/api", by_src["/api"]
    assert by_src["/pre"][0]["opts"] == "strip=/pre prepend=/inner", by_src["/pre"]
    assert by_src["shop.test/"][0]["host"] == "shop.test", by_src["shop.test/"]

    # Scaled to 0: the route is still known, so 503 (not 404).
    response = agent.put(f"/v2/apps{v2}", json={"instances": 0})
    assert response.status_code == 200, response.text
    wait_until(lambda: agent.tasks(v2) == [], timeout=15, what=f"{v2} scaled to 0")
    wait_until(
        lambda: [entry for entry in route_entries(agent, "/api/v2") if entry["dst"]] == [],
        timeout=10,
        what="/api/v2 to have no target",
    )
    assert route_entries(agent, "/api/v2"), "a route whose app is scaled to 0 should stay in /api/routes (no dst)"
    response = proxied(agent, "/api/v2/orders")
    assert response.status_code == 503, f"GET /api/v2/orders with {v2} at 0 instances: {response.status_code} {response.text[:300]}"
    assert len(response.text) < 500 and response.text.strip(), response.text
    # The shorter prefix does not take over the requests of a route with no instance.
    assert echo(proxied(agent, "/api/v3"))["instance"] in api_tasks


# --- balancing --------------------------------------------------------------------------------


def test_round_robin_spreads_evenly_over_three_instances(shared_agent, app_ids, backend_script):
    agent = shared_agent
    app_id = app_ids.new()
    src = f"/rr-{unique_suffix(app_id)}"
    deploy(agent, backend_app(app_id, backend_script, f"urlprefix-{src}", instances=3), src)
    seen = Counter(echo(proxied(agent, f"{src}/x"))["instance"] for _ in range(30))
    assert set(seen) == task_ids(agent, app_id), seen
    assert all(8 <= count <= 12 for count in seen.values()), f"round-robin over 3 instances, 30 requests: {seen}"
    agent.delete(f"/v2/apps{app_id}")


def test_random_strategy_spreads(make_agent, app_ids, backend_script):
    agent = make_agent(extra_args=["--proxy-strategy", "random"])
    app_id = app_ids.new()
    deploy(agent, backend_app(app_id, backend_script, "urlprefix-/rand", instances=3), "/rand")
    sequence = [echo(proxied(agent, "/rand"))["instance"] for _ in range(60)]
    seen = Counter(sequence)
    assert set(seen) == task_ids(agent, app_id), seen
    assert min(seen.values()) >= 5, f"random over 3 instances, 60 requests: {seen}"
    cyclic = all(sequence[i] == sequence[i % 3] for i in range(len(sequence)))
    assert not cyclic, "--proxy-strategy random picked in a strict rotation"


def test_least_connections_avoids_the_busy_instance(make_agent, app_ids, backend_script):
    agent = make_agent(extra_args=["--proxy-strategy", "leastconn"])
    app_id = app_ids.new()
    deploy(agent, backend_app(app_id, backend_script, "urlprefix-/lc", instances=2), "/lc")
    slow = {}

    def hold():
        slow["answer"] = proxied(agent, "/lc/slow?seconds=3")

    thread = threading.Thread(target=hold, daemon=True)
    thread.start()
    time.sleep(0.5)
    quick = Counter(echo(proxied(agent, "/lc/quick"))["instance"] for _ in range(10))
    thread.join(timeout=10)
    busy = echo(slow["answer"])["instance"]
    assert busy not in quick and len(quick) == 1, f"leastconn sent quick requests to the instance busy with /slow ({busy}): {quick}"


def weight_shares(agent, src, requests_count):
    seen = Counter()
    with requests.Session() as session:
        for _ in range(requests_count):
            response = session.get(agent.proxy_url + src, timeout=PROXY_TIMEOUT)
            seen[echo(response)["instance"]] += 1
    return seen


@pytest.mark.parametrize("weighted_instances", [1, 2])
def test_weighted_route_gets_its_share(shared_agent, app_ids, backend_script, weighted_instances):
    """`weight=0.2` gives the instances carrying the tag 20% of the route's traffic together
    (Fabio: the share is the tagged service's, split among its instances)."""
    agent = shared_agent
    light, heavy = app_ids.new("light"), app_ids.new("heavy")
    src = f"/w-{unique_suffix(light)}"
    deploy(agent, backend_app(light, backend_script, f"urlprefix-{src} weight=0.2", instances=weighted_instances))
    deploy(agent, backend_app(heavy, backend_script, f"urlprefix-{src}"))
    entries = wait_for_targets(agent, src, weighted_instances + 1)
    light_service = light.strip("/").replace("/", "-")
    light_weight = sum(entry["weight"] for entry in entries if entry["service"] == light_service)
    heavy_weight = sum(entry["weight"] for entry in entries if entry["service"] != light_service)
    assert light_weight == pytest.approx(0.2, abs=0.01) and heavy_weight == pytest.approx(0.8, abs=0.01), (
        f"/api/routes weights of {src} (weight=0.2 on {weighted_instances} instance(s) of {light}): {entries}"
    )

    total = 500
    seen = weight_shares(agent, src, total)
    light_share = sum(count for instance, count in seen.items() if instance in task_ids(agent, light)) / total
    assert 0.15 <= light_share <= 0.25, f"weight=0.2 got {light_share:.1%} of {total} requests: {seen}"
    agent.delete(f"/v2/apps{light}")
    agent.delete(f"/v2/apps{heavy}")


# --- headers ----------------------------------------------------------------------------------


def test_forwarded_headers_and_hop_by_hop(shared_agent, app_ids, backend_script):
    agent = shared_agent
    app_id = app_ids.new()
    src = f"/hdr-{unique_suffix(app_id)}"
    deploy(agent, backend_app(app_id, backend_script, f"urlprefix-{src}"), src)

    sent = {
        "Host": "client.example:8443",
        "X-Forwarded-For": "203.0.113.7",
        "Connection": "keep-alive, Foo",
        "Foo": "bar",
        "Keep-Alive": "timeout=5",
        "TE": "trailers",
        "Proxy-Connection": "keep-alive",
        "X-Custom": "kept",
    }
    answer = echo(proxied(agent, f"{src}/h", headers=sent))
    assert header(answer, "X-Forwarded-For") == ["203.0.113.7, 127.0.0.1"], answer["headers"]
    assert header(answer, "X-Real-IP") == ["127.0.0.1"], answer["headers"]
    assert header(answer, "X-Forwarded-Proto") == ["http"], answer["headers"]
    assert header(answer, "X-Forwarded-Host") == ["client.example:8443"], answer["headers"]
    assert header(answer, "Host") == ["client.example:8443"], f"Host must be preserved: {answer['headers']}"
    assert header(answer, "X-Custom") == ["kept"], answer["headers"]
    for hop in ("Foo", "Keep-Alive", "TE", "Proxy-Connection"):
        assert header(answer, hop) == [], f"hop-by-hop header {hop} reached the backend: {answer['headers']}"
    assert all("foo" not in value.lower() for value in header(answer, "Connection")), answer["headers"]

    # Without an incoming X-Forwarded-For the proxy starts one.
    answer = echo(proxied(agent, f"{src}/h"))
    assert header(answer, "X-Forwarded-For") == ["127.0.0.1"], answer["headers"]
    assert header(answer, "X-Forwarded-Host") == [f"127.0.0.1:{agent.proxy_port}"], answer["headers"]

    # Status codes and response headers pass through.
    response = proxied(agent, f"{src}/status/418")
    assert response.status_code == 418 and response.headers.get("X-Instance") in task_ids(agent, app_id), response.headers
    response = proxied(agent, f"{src}/status/500")
    assert response.status_code == 500, f"an upstream 500 must reach the client as is: {response.status_code}"
    agent.delete(f"/v2/apps{app_id}")


# --- bodies -----------------------------------------------------------------------------------


def fresh_get(agent, path, timeout=5) -> requests.Response:
    """GET on a new client connection (so successive calls land on every event loop)."""
    try:
        return requests.get(agent.proxy_url + path, headers={"Connection": "close"}, timeout=timeout)
    except requests.RequestException as error:
        raise AssertionError(f"GET {path} through the proxy: {error!r}") from None


def test_large_bodies(shared_agent, app_ids, backend_script):
    agent = shared_agent
    app_id = app_ids.new()
    src = f"/body-{unique_suffix(app_id)}"
    deploy(agent, backend_app(app_id, backend_script, f"urlprefix-{src}"), src)
    body = pattern(5 * 1024 * 1024)[::-1]
    digest = hashlib.sha256(body).hexdigest()

    def post(data, what):
        try:
            return proxied(agent, f"{src}/echo-body", "POST", data=data, headers={"Connection": "close"}, timeout=15)
        except requests.RequestException as error:
            raise AssertionError(f"POST {src}/echo-body ({what}) through the proxy: {error!r}") from None

    response = post(body, "5 MiB with Content-Length")
    assert response.status_code == 200, response.text[:300]
    assert response.headers["X-Request-Chunked"] == "no"
    assert response.headers["X-Body-Sha256"] == digest, "the backend received another body"
    assert len(response.content) == len(body) and response.content == body

    def chunks():
        for offset in range(0, len(body), 100_000):
            yield body[offset:offset + 100_000]

    response = post(chunks(), "5 MiB chunked")
    assert response.status_code == 200, response.text[:300]
    assert response.headers["X-Request-Chunked"] == "yes"
    assert response.headers["X-Body-Sha256"] == digest, "the backend received another body (chunked request)"
    assert response.content == body

    size = 12 * 1024 * 1024 + 17
    try:
        response = proxied(agent, f"{src}/stream?bytes={size}", stream=True, headers={"Connection": "close"}, timeout=10)
        assert response.status_code == 200
        received = hashlib.sha256()
        length = 0
        for piece in response.iter_content(65536):
            received.update(piece)
            length += len(piece)
    except requests.RequestException as error:
        raise AssertionError(f"GET {src}/stream?bytes={size} through the proxy: {error!r}") from None
    assert length == size and received.hexdigest() == hashlib.sha256(pattern(size)).hexdigest()
    agent.delete(f"/v2/apps{app_id}")


def test_upstream_connection_reused_after_a_slow_client(shared_agent, app_ids, backend_script):
    """A client that reads a large response slowly makes the proxy pause reading the upstream;
    the upstream connection must read again when it goes back to the pool for the next request."""
    agent = shared_agent
    app_id = app_ids.new()
    src = f"/slowread-{unique_suffix(app_id)}"
    deploy(agent, backend_app(app_id, backend_script, f"urlprefix-{src}"), src)
    size = 4 * 1024 * 1024
    failures = []
    for trial in range(3):
        response = proxied(agent, f"{src}/stream?bytes={size}", stream=True, headers={"Connection": "close"})
        length = 0
        for piece in response.iter_content(65536):
            length += len(piece)
            time.sleep(0.01)
        response.close()
        assert length == size
        for number in range(4):
            try:
                quick = requests.get(f"{agent.proxy_url}{src}/after/{trial}/{number}", headers={"Connection": "close"}, timeout=3)
                if quick.status_code != 200:
                    failures.append((trial, number, quick.status_code))
            except requests.RequestException as error:
                failures.append((trial, number, repr(error)[:120]))
                break  # the stuck connection is closed with the client's; next trial
    assert not failures, f"requests after a slowly read 4 MiB response failed (trial, request, error): {failures}"
    agent.delete(f"/v2/apps{app_id}")


def test_server_sent_events_stream_one_by_one(shared_agent, app_ids, backend_script):
    agent = shared_agent
    app_id = app_ids.new()
    src = f"/sse-{unique_suffix(app_id)}"
    deploy(agent, backend_app(app_id, backend_script, f"urlprefix-{src}"), src)
    # The backend sends 3 events 0.7 s apart, each in its own chunk.
    started = time.monotonic()
    arrivals = []
    data = b""
    with socket.create_connection(("127.0.0.1", agent.proxy_port), timeout=10) as connection:
        connection.sendall(f"GET {src}/sse HTTP/1.1\r\nHost: sse.test\r\nAccept: text/event-stream\r\n\r\n".encode())
        while b"\r\n0\r\n\r\n" not in data and time.monotonic() - started < 10:
            piece = connection.recv(65536)
            if not piece:
                break
            data += piece
            for number in range(3):
                if b"data: event %d" % number in data and len(arrivals) == number:
                    arrivals.append(time.monotonic() - started)
    head = data.split(b"\r\n\r\n", 1)[0].lower()
    assert head.startswith(b"http/1.1 200") and b"text/event-stream" in head, data[:500]
    assert len(arrivals) == 3, f"events received at {arrivals}; data: {data[:500]!r}"
    assert arrivals[0] < 0.5, f"the first event took {arrivals[0]:.2f}s: it was held back"
    assert arrivals[1] - arrivals[0] > 0.4 and arrivals[2] - arrivals[1] > 0.4, f"events arrived at {arrivals}: buffered, not streamed"
    agent.delete(f"/v2/apps{app_id}")


# --- keep-alive -------------------------------------------------------------------------------


def test_keep_alive_to_clients_and_upstreams(shared_agent, app_ids, backend_script):
    agent = shared_agent
    app_id = app_ids.new()
    src = f"/ka-{unique_suffix(app_id)}"
    deploy(agent, backend_app(app_id, backend_script, f"urlprefix-{src}"), src)

    connection = http.client.HTTPConnection("127.0.0.1", agent.proxy_port, timeout=10)
    peer_ports = []
    first_socket = None
    try:
        for number in range(100):
            connection.request("GET", f"{src}/n/{number}")
            response = connection.getresponse()
            payload = response.read()
            assert response.status == 200, payload[:300]
            if first_socket is None:
                first_socket = connection.sock
            assert connection.sock is first_socket, f"the proxy closed the client connection after {number} requests"
            peer_ports.append(json.loads(payload)["peer_port"])
    finally:
        connection.close()
    distinct = set(peer_ports)
    assert len(distinct) <= 2, f"100 sequential requests reached the backend over {len(distinct)} connections: no upstream reuse"

    with requests.Session() as session:
        for number in range(50):
            response = session.get(f"{agent.proxy_url}{src}/s/{number}", timeout=PROXY_TIMEOUT)
            assert echo(response)["path"] == f"{src}/s/{number}"

    # HTTP/1.0 without keep-alive: answered, then closed.
    with socket.create_connection(("127.0.0.1", agent.proxy_port), timeout=10) as raw:
        raw.sendall(f"GET {src}/old HTTP/1.0\r\nHost: old.test\r\n\r\n".encode())
        data = b""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            piece = raw.recv(65536)
            if not piece:
                break
            data += piece
    assert data.startswith(b"HTTP/1.") and b" 200 " in data.split(b"\r\n", 1)[0], data[:300]
    assert b'"instance"' in data, f"HTTP/1.0 response body missing: {data[:500]!r}"
    agent.delete(f"/v2/apps{app_id}")


def test_upstream_closing_idle_connections(shared_agent, app_ids, backend_script):
    """A backend that closes idle keep-alive connections after 0.3 s (as many servers do, sooner
    or later): requests that come around that moment still succeed."""
    agent = shared_agent
    app_id = app_ids.new()
    src = f"/idle-{unique_suffix(app_id)}"
    deploy(agent, backend_app(app_id, backend_script, f"urlprefix-{src}", env={"IDLE_TIMEOUT": "0.3"}), src)
    failures = []
    with requests.Session() as session:
        for number in range(14):
            time.sleep(0.22 + 0.01 * number + (0.5 if number == 13 else 0))
            try:
                response = session.get(f"{agent.proxy_url}{src}/idle/{number}", timeout=5)
                if response.status_code != 200:
                    failures.append((number, response.status_code, response.text[:200]))
            except requests.RequestException as error:
                failures.append((number, repr(error)[:200]))
    assert not failures, f"requests to a backend that closes idle connections after 0.3 s failed: {failures}"
    agent.delete(f"/v2/apps{app_id}")


# --- retries and passive health ---------------------------------------------------------------


def register_external(agent, service_id, name, port, tag):
    response = agent.put(
        "/v1/agent/service/register",
        json={
            "ID": service_id,
            "Name": name,
            "Address": "127.0.0.1",
            "Port": port,
            "Tags": [tag],
            "Check": {"TTL": "60s", "Status": "passing"},
        },
    )
    assert response.status_code == 200, f"register {service_id}: {response.status_code} {response.text}"


def test_allow_deny_and_redirect_routes(shared_agent, app_ids, backend_script):
    """Fabio's allow=/deny= by source address (the connection's and X-Forwarded-For's), and
    redirect=CODE,URL with $path."""
    agent = shared_agent
    app_id = app_ids.new()
    suffix = unique_suffix(app_id)
    deploy(agent, backend_app(app_id, backend_script))
    port = agent.tasks(app_id)[0]["ports"][0]
    tags = {
        "open": "allow=ip:127.0.0.0/8", "closed": "deny=ip:127.0.0.1", "others": "allow=ip:10.0.0.0/8",
        "typo": "allow=ip:127.0.0.1/40", "moved": "redirect=308,https://new.example$path",
    }
    for name, options in tags.items():
        register_external(agent, f"{name}-{suffix}", f"{name}-{suffix}", port, f"urlprefix-/{name}-{suffix} {options}")
    try:
        for name in tags:
            wait_for_targets(agent, f"/{name}-{suffix}", 1)
        assert echo(proxied(agent, f"/open-{suffix}/x"))["path"] == f"/open-{suffix}/x"
        forged = proxied(agent, f"/open-{suffix}/x", headers={"X-Forwarded-For": "203.0.113.9"})
        assert forged.status_code == 403 and "203.0.113.9" in forged.text
        for name in ("closed", "others", "typo"):
            refused = proxied(agent, f"/{name}-{suffix}/x")
            assert refused.status_code == 403, (name, refused.status_code, refused.text)
        # A forged header cannot widen an allow list: the connection's own address still counts.
        assert proxied(agent, f"/others-{suffix}/x", headers={"X-Forwarded-For": "10.1.2.3"}).status_code == 403
        moved = proxied(agent, f"/moved-{suffix}/a/b?c=1", allow_redirects=False)
        assert moved.status_code == 308 and moved.headers["Location"] == f"https://new.example/moved-{suffix}/a/b?c=1"
        entry = route_entries(agent, f"/others-{suffix}")[0]
        assert "allow=ip:10.0.0.0/8" in entry["opts"] and "invalid" in route_entries(agent, f"/typo-{suffix}")[0]["opts"]
    finally:
        for name in tags:
            agent.put(f"/v1/agent/service/deregister/{name}-{suffix}")
        agent.delete(f"/v2/apps{app_id}")


def test_connect_failure_is_retried_and_the_dead_target_ejected(shared_agent, app_ids, backend_script):
    agent = shared_agent
    app_id = app_ids.new()
    suffix = unique_suffix(app_id)
    src = f"/ext-{suffix}"
    name = f"ext-{suffix}"
    deploy(agent, backend_app(app_id, backend_script))  # no route of its own
    live_port = agent.tasks(app_id)[0]["ports"][0]
    dead_port = free_tcp_port()  # nothing listens there
    register_external(agent, f"{name}-dead", name, dead_port, f"urlprefix-{src}")
    register_external(agent, f"{name}-live", name, live_port, f"urlprefix-{src}")
    try:
        entries = wait_for_targets(agent, src, 2)
        assert {entry["dst"] for entry in entries} == {f"http://127.0.0.1:{dead_port}/", f"http://127.0.0.1:{live_port}/"}

        retries_before = metric(agent, "flotilla_proxy_retries_total")
        with requests.Session() as session:
            for number in range(10):
                answer = echo(session.get(f"{agent.proxy_url}{src}/r/{number}", timeout=PROXY_TIMEOUT))
                assert answer["instance"] in task_ids(agent, app_id)
        retries_first = metric(agent, "flotilla_proxy_retries_total") - retries_before
        assert 1 <= retries_first <= 5, f"10 requests over a dead and a live target: {retries_first} retries"

        # Ejected now: the next requests go straight to the live target.
        started = time.monotonic()
        with requests.Session() as session:
            for number in range(30):
                echo(session.get(f"{agent.proxy_url}{src}/e/{number}", timeout=PROXY_TIMEOUT))
        elapsed = time.monotonic() - started
        retries_after = metric(agent, "flotilla_proxy_retries_total") - retries_before - retries_first
        assert elapsed < 8, f"30 requests took {elapsed:.1f}s"
        assert retries_after == 0, f"{retries_after} more retries after {retries_first}: the dead target was not ejected"
    finally:
        for service_id in (f"{name}-dead", f"{name}-live"):
            agent.put(f"/v1/agent/service/deregister/{service_id}")
        agent.delete(f"/v2/apps{app_id}")


# --- TCP routes -------------------------------------------------------------------------------


def receive_exactly(connection, size, timeout=10) -> bytes:
    data = b""
    deadline = time.monotonic() + timeout
    while len(data) < size and time.monotonic() < deadline:
        piece = connection.recv(min(1 << 20, size - len(data)))
        if not piece:
            break
        data += piece
    return data


def receive_line(connection, timeout=10) -> bytes:
    data = b""
    deadline = time.monotonic() + timeout
    while b"\n" not in data and time.monotonic() < deadline:
        piece = connection.recv(1)
        if not piece:
            break
        data += piece
    return data


def tcp_listening(port) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def test_tcp_route(shared_agent, app_ids, backend_script):
    agent = shared_agent
    app_id = app_ids.new()
    port = free_tcp_port()
    assert not tcp_listening(port)
    agent.create_app(backend_app(app_id, backend_script, f"urlprefix-:{port} proto=tcp", mode="tcp"))
    agent.wait_for_running(app_id, 1)
    started = time.monotonic()
    wait_for_targets(agent, f":{port}", 1)
    wait_until(lambda: tcp_listening(port), timeout=5, what=f"the TCP route's listener on :{port}")
    assert time.monotonic() - started < 5
    (instance,) = task_ids(agent, app_id)

    with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
        greeting = receive_line(connection)
        assert greeting == f"hello from {instance}\n".encode(), greeting
        connection.sendall(b"ping\n")
        assert receive_exactly(connection, 5) == b"ping\n"
        payload = pattern(2 * 1024 * 1024)
        sender = threading.Thread(target=connection.sendall, args=(payload,), daemon=True)
        sender.start()
        echoed = receive_exactly(connection, len(payload), timeout=20)
        sender.join(timeout=10)
        assert len(echoed) == len(payload) and echoed == payload, f"{len(echoed)} of {len(payload)} bytes echoed"

    # An instance that sends more than the sockets hold and closes at once, to a client that is
    # slow to read: everything it sent arrives before the close.
    with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
        receive_line(connection)
        size = 8 * 1024 * 1024
        connection.sendall(f"dump {size}\n".encode())
        time.sleep(0.5)
        received = receive_exactly(connection, size + 1, timeout=20)
        assert len(received) == size and received == pattern(size), f"{len(received)} of {size} bytes before the close"

    entry = route_entries(agent, f":{port}")[0]
    assert entry["proto"] == "tcp" and entry["dst"] == f"127.0.0.1:{agent.tasks(app_id)[0]['ports'][0]}", entry

    agent.delete(f"/v2/apps{app_id}")
    wait_until(lambda: not tcp_listening(port), timeout=10, what=f"the listener on :{port} to close once the app is gone")


# --- metrics ----------------------------------------------------------------------------------


def test_metrics_count_requests_per_route(make_agent, app_ids, backend_script):
    agent = make_agent()
    app_id = app_ids.new()
    deploy(agent, backend_app(app_id, backend_script, "urlprefix-/api strip=/api"), "/api")
    with requests.Session() as session:
        for number in range(25):
            echo(session.get(f"{agent.proxy_url}/api/m/{number}", timeout=PROXY_TIMEOUT))
        for _ in range(3):
            assert session.get(f"{agent.proxy_url}/api/status/503", timeout=PROXY_TIMEOUT).status_code == 503
        for _ in range(2):
            assert session.get(f"{agent.proxy_url}/none", timeout=PROXY_TIMEOUT).status_code == 404

    text = agent.get("/metrics").text
    assert re.search(r'^flotilla_proxy_requests_total\{route="/api",code="2xx"\} 25(\.0+)?$', text, re.M), (
        "no flotilla_proxy_requests_total{route=\"/api\",code=\"2xx\"} 25 in:\n"
        + "\n".join(line for line in text.splitlines() if "flotilla_proxy" in line)
    )
    assert metric(agent, "flotilla_proxy_requests_total", route="/api", code="5xx") == 3
    assert metric(agent, "flotilla_proxy_requests_total", code="4xx") == 2
    buckets = [
        (labels, value)
        for name, labels, value in metrics(agent)
        if name == "flotilla_proxy_upstream_latency_seconds_bucket" and labels.get("route") == "/api"
    ]
    assert len(buckets) >= 5, text
    inf = [value for labels, value in buckets if labels.get("le") == "+Inf"]
    assert inf == [28], f"latency observations for /api: {buckets}"
    assert metric(agent, "flotilla_proxy_upstream_latency_seconds_count", route="/api") == 28


# --- zero downtime ----------------------------------------------------------------------------


class Load:
    """`threads` clients, each with a keep-alive session, GETting `url` until stopped (at most
    `max_seconds` and `max_requests` each). Every 10th request takes 0.2 s at the backend, so
    some are in flight when an instance starts draining. Times recorded are when requests were
    sent."""

    def __init__(self, url, threads=4, max_seconds=45, max_requests=20000):
        self.url, self.max_seconds, self.max_requests = url, max_seconds, max_requests
        self.lock = threading.Lock()
        self.statuses = Counter()
        self.errors = []
        self.bad = []
        self.instances = Counter()
        self.timeline = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(index,), daemon=True) for index in range(threads)]

    def __enter__(self):
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc_info):
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=15)

    def _run(self, index):
        deadline = time.monotonic() + self.max_seconds
        with requests.Session() as session:
            for number in range(self.max_requests):
                if self._stop.is_set() or time.monotonic() > deadline:
                    return
                path = f"{self.url}/t{index}/{number}" + ("/slow?seconds=0.2" if number % 10 == 0 else "")
                sent_at = time.monotonic()
                try:
                    response = session.get(path, timeout=10)
                except requests.RequestException as error:
                    with self.lock:
                        self.errors.append((sent_at, path, repr(error)))
                    continue
                with self.lock:
                    self.statuses[response.status_code] += 1
                    if response.status_code // 100 != 2:
                        self.bad.append((sent_at, path, response.status_code, response.text[:200]))
                    else:
                        instance = response.headers.get("X-Instance")
                        self.instances[instance] += 1
                        self.timeline.append((sent_at, instance))

    @property
    def total(self):
        return sum(self.statuses.values()) + len(self.errors)


def zero_downtime_app(app_id, script, src, instances=3, strategy=None):
    return backend_app(
        app_id,
        script,
        f"urlprefix-{src}",
        instances=instances,
        drainSeconds=2,
        healthChecks=[health_check(gracePeriodSeconds=10)],
        upgradeStrategy={"minimumHealthCapacity": 1, "maximumOverCapacity": 1, "progressDeadlineSeconds": 30, **(strategy or {})},
    )


def wait_for_deployment(agent, deployment_id, timeout=40) -> dict:
    def ended():
        response = agent.get(f"/flotilla/v1/deployments/{deployment_id}")
        assert response.status_code == 200, response.text
        status = response.json()
        return status if status["status"] != "running" else None

    status = wait_until(ended, timeout=timeout, interval=0.2, what=f"deployment {deployment_id} to end")
    assert status["status"] == "succeeded", status
    return status


def assert_no_failures(load, what):
    assert not load.errors, f"{what}: {len(load.errors)} connection errors of {load.total} requests, first: {load.errors[:3]}"
    assert not load.bad, f"{what}: {len(load.bad)} non-2xx of {load.total} requests, first: {load.bad[:3]}"
    assert load.total >= 300, f"{what}: only {load.total} requests were sent"
    print(f"{what}: {load.total} requests, by instance {dict(load.instances)}")


@pytest.mark.parametrize(
    "strategy",
    [
        pytest.param({}, id="all-new-beside-the-old"),
        # One instance at a time, down to 2 of 3 in service: old and new serve side by side.
        pytest.param({"minimumHealthCapacity": 0.5, "maximumOverCapacity": 0}, id="rolling-one-by-one"),
    ],
)
def test_zero_downtime_restart(make_agent, app_ids, backend_script, strategy):
    agent = make_agent()
    app_id = app_ids.new()
    deploy(agent, zero_downtime_app(app_id, backend_script, "/zd", strategy=strategy), "/zd", timeout=30)
    old = task_ids(agent, app_id)
    with Load(agent.proxy_url + "/zd") as load:
        time.sleep(1)
        response = agent.post(f"/v2/apps{app_id}/restart")
        assert response.status_code == 200, f"restart: {response.status_code} {response.text}"
        wait_for_deployment(agent, response.json()["deploymentId"])
        new = task_ids(agent, app_id)
        wait_for_targets(agent, "/zd", 3)
        settled = time.monotonic()
        time.sleep(1.5)
    assert not old & new and len(new) == 3, f"old {old}, new {new}"
    assert_no_failures(load, "restart of 3 instances under load")
    served = set(load.instances)
    assert served & old and served & new, f"served by {load.instances}; old {old}, new {new}"
    assert served <= old | new, load.instances
    late = {instance for at, instance in load.timeline if at > settled}
    assert late == new, f"after the restart requests went to {late}; the new instances are {new}"


def test_zero_downtime_scale_down(make_agent, app_ids, backend_script):
    agent = make_agent()
    app_id = app_ids.new()
    deploy(agent, zero_downtime_app(app_id, backend_script, "/zd"), "/zd", timeout=30)
    before = task_ids(agent, app_id)
    with Load(agent.proxy_url + "/zd") as load:
        time.sleep(1.5)
        response = agent.put(f"/v2/apps{app_id}", json={"instances": 1})
        assert response.status_code == 200, f"scale: {response.status_code} {response.text}"
        wait_for_deployment(agent, response.json()["deploymentId"])
        wait_until(lambda: len(agent.tasks(app_id)) == 1, timeout=10, what="one instance left")
        switched = time.monotonic()
        time.sleep(2)
    (kept,) = task_ids(agent, app_id)
    assert kept in before
    assert_no_failures(load, "scale down 3 → 1 under load")
    assert set(load.instances) == before, f"served by {load.instances}; before {before}"
    late = {instance for at, instance in load.timeline if at > switched}
    assert late == {kept}, f"requests after the scale-down went to {late}, only {kept} is left"


def test_websocket_upgrade_becomes_a_tunnel(shared_agent, app_ids, backend_script):
    agent = shared_agent
    app_id = app_ids.new()
    src = f"/ws-{unique_suffix(app_id)}"
    deploy(agent, backend_app(app_id, backend_script, tags=f"urlprefix-{src}"), src=src)

    with socket.create_connection(("127.0.0.1", agent.proxy_port), timeout=5) as connection:
        connection.sendall(
            f"GET {src}/chat HTTP/1.1\r\nHost: chat.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        received = b""
        while b"\r\n\r\n" not in received:
            chunk = connection.recv(65536)
            assert chunk, f"the proxy closed the connection before answering: {received!r}"
            received += chunk
        head, rest = received.split(b"\r\n\r\n", 1)
        assert head.startswith(b"HTTP/1.1 101"), head
        assert b"upgrade: websocket" in head.lower() and b"connection: upgrade" in head.lower(), head
        # Bytes of the new protocol both ways, including what the backend sent with its 101.
        payload = pattern(200_000)
        connection.sendall(payload)
        deadline = time.monotonic() + 10
        while len(rest) < len(b"welcome from |") + len(payload) and time.monotonic() < deadline:
            chunk = connection.recv(65536)
            if not chunk:
                break
            rest += chunk
        assert rest.startswith(b"welcome from "), rest[:60]
        assert rest.split(b"|", 1)[1] == payload

    # The proxy still serves plain HTTP afterwards.
    assert proxied(agent, src + "/after").status_code == 200

    # A client that sends more than the sockets hold and closes at once: all of it reaches the
    # instance before the proxy closes that side too.
    payload = pattern(16 * 1024 * 1024)
    with socket.create_connection(("127.0.0.1", agent.proxy_port), timeout=30) as connection:
        connection.sendall(
            f"GET {src}/sink HTTP/1.1\r\nHost: chat.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n".encode())
        received = b""
        while not received.endswith(b"|"):
            chunk = connection.recv(65536)
            assert chunk, f"the proxy closed the connection before the upgrade: {received!r}"
            received += chunk
        assert received.startswith(b"HTTP/1.1 101"), received[:60]
        connection.sendall(payload)
    expected = f"sink received {len(payload)} {hashlib.sha256(payload).hexdigest()}"
    wait_until(lambda: expected in agent.cli("logs", app_id).stdout, timeout=20, what=f"the instance to log {expected!r}")


# --- shutdown ---------------------------------------------------------------------------------


def test_shutdown_answers_requests_under_way(make_agent, app_ids, backend_script):
    """On SIGTERM the proxy stops accepting, closes idle keep-alive connections, and answers the
    requests under way (with `Connection: close`) before the agent exits."""
    agent = make_agent(on_exit="keep")  # the instance outlives the agent, as in an upgrade
    app_id = app_ids.new()
    src = f"/drain-{unique_suffix(app_id)}"
    deploy(agent, backend_app(app_id, backend_script, tags=f"urlprefix-{src}"), src=src)

    idle = socket.create_connection(("127.0.0.1", agent.proxy_port), timeout=10)
    idle.sendall(f"GET {src}/first HTTP/1.1\r\nHost: drain.test\r\n\r\n".encode())
    first = b""
    while b"\r\n\r\n" not in first:
        first += idle.recv(65536)
    head, body = first.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 200"), head
    length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
    assert len(receive_exactly(idle, length - len(body))) == length - len(body)

    busy = socket.create_connection(("127.0.0.1", agent.proxy_port), timeout=10)
    busy.sendall(f"GET {src}/slow?seconds=2 HTTP/1.1\r\nHost: drain.test\r\n\r\n".encode())
    time.sleep(0.5)  # the request has reached the instance
    started = time.monotonic()
    stopper = threading.Thread(target=agent.stop, daemon=True)
    stopper.start()

    response = b""
    while True:
        chunk = busy.recv(65536)
        if not chunk:
            break
        response += chunk
    head = response.split(b"\r\n\r\n", 1)[0].lower()
    assert head.startswith(b"http/1.1 200"), response[:200]
    assert b"connection: close" in head, head
    # The idle keep-alive connection was closed without an answer.
    assert idle.recv(65536) == b""
    idle.close()
    busy.close()
    stopper.join(timeout=30)
    assert not agent.is_running()
    assert time.monotonic() - started < 9, "the agent waited out the whole drain timeout"


def test_running_out_of_descriptors_is_survived(make_agent, app_ids, backend_script):
    """More clients than the agent has file descriptors: it keeps running (no spin, no crash),
    says in its log what to do, and serves again once they leave."""
    agent = make_agent(open_files=256)
    app_id = app_ids.new()
    src = f"/fds-{unique_suffix(app_id)}"
    deploy(agent, backend_app(app_id, backend_script, tags=f"urlprefix-{src}"), src=src)

    flood = []
    try:
        for _ in range(400):  # the kernel completes them (backlog); the agent cannot accept them all
            flood.append(socket.create_connection(("127.0.0.1", agent.proxy_port), timeout=5))
        time.sleep(0.5)
        assert agent.is_running()
        wait_until(lambda: "raise the open-file limit" in agent.log_path.read_text(), timeout=5,
                   what="the agent to log that it cannot accept connections")
    finally:
        for connection in flood:
            connection.close()

    def serves():
        try:
            return proxied(agent, src + "/after", timeout=2).status_code == 200
        except requests.ConnectionError:
            return False  # descriptors still being freed: asked again

    wait_until(serves, timeout=10, what="the proxy to serve again once the clients have gone")
    assert agent.is_running()
