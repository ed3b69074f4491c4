"""The load balancer and TLS: an HTTPS listener (--proxy-https-port) that picks its certificate
by SNI from a directory (--proxy-cert-dir) and re-reads it when the files change, and
`proto=https` routes that speak TLS to instances, verified against --proxy-upstream-ca unless
the route says `tlsskipverify=true`. Certificates come from test CAs (trustme)."""

import hashlib
import http.client
import json
import socket
import ssl
import time

import pytest
import trustme
from cryptography import x509

from support.flotilla import app_definition, free_tcp_port, wait_until

# An instance that serves HTTPS only: it answers every request with what it saw.
TLS_BACKEND = r'''
import json, os, ssl, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *args):
        pass
    def do_GET(self):
        body = json.dumps({"instance": os.environ.get("FLOTILLA_INSTANCE_ID"), "path": self.path,
                           "headers": dict(self.headers.items())}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

server = ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT0"])), Handler)
context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
context.load_cert_chain(sys.argv[1], sys.argv[2])
server.socket = context.wrap_socket(server.socket, server_side=True)
server.serve_forever()
'''

ECHO_BACKEND = r'''
import hashlib, json, os
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *args):
        pass
    def answer(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length)
        out = json.dumps({"path": self.path, "headers": dict(self.headers.items()), "length": len(body),
                          "sha256": hashlib.sha256(body).hexdigest()}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)
    do_GET = do_POST = answer

ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT0"])), Handler).serve_forever()
'''


def write_cert(cert, directory, name):
    """`name`.pem (the chain) and `name`.key in `directory`."""
    with open(directory / f"{name}.pem", "wb") as chain:
        for blob in cert.cert_chain_pems:
            chain.write(blob.bytes())
    cert.private_key_pem.write_to_path(str(directory / f"{name}.key"))


class PinnedHTTPSConnection(http.client.HTTPSConnection):
    """HTTPS to 127.0.0.1:`port` that names `server_name` in SNI (and in Host)."""

    def __init__(self, port, server_name, context):
        super().__init__(server_name, port, context=context, timeout=10)
        self.server_name, self.real_port = server_name, port

    def connect(self):
        raw = socket.create_connection(("127.0.0.1", self.real_port), timeout=10)
        self.sock = self._context.wrap_socket(raw, server_hostname=self.server_name)

    def served_names(self):
        certificate = x509.load_der_x509_certificate(self.sock.getpeercert(binary_form=True))
        return sorted(certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName))


def client_context(authority):
    context = ssl.create_default_context()
    authority.configure_trust(context)
    return context


def request(connection, method, path, body=None):
    connection.request(method, path, body=body)
    response = connection.getresponse()
    return response.status, response.read()


def deploy(agent, definition, timeout=30):
    agent.create_app(definition)
    app_id = definition["id"]
    wait_until(lambda: agent.app(app_id)["tasksHealthy"] == definition["instances"], timeout=timeout, what=f"{app_id} healthy")


def wait_for_route(agent, src, timeout=20):
    def ready():
        entries = [entry for entry in agent.get("/api/routes").json() if entry["src"] == src and entry["dst"]]
        return entries or None
    return wait_until(ready, timeout=timeout, what=f"route {src}")


def tcp_check():
    return {"protocol": "TCP", "portIndex": 0, "gracePeriodSeconds": 10, "intervalSeconds": 1, "timeoutSeconds": 1, "maxConsecutiveFailures": 3}


@pytest.fixture
def certificates(tmp_path):
    authority = trustme.CA()
    directory = tmp_path / "certs"
    directory.mkdir()
    write_cert(authority.issue_cert("shop.example"), directory, "shop")
    write_cert(authority.issue_cert("*.api.example"), directory, "api")
    write_cert(authority.issue_cert("fallback.example"), directory, "default")
    return authority, directory


def test_https_listener_picks_certificates_by_sni_and_forwards_plaintext(make_agent, app_ids, certificates, tmp_path):
    authority, directory = certificates
    https_port = free_tcp_port()
    agent = make_agent(extra_args=["--proxy-https-port", str(https_port), "--proxy-cert-dir", str(directory)])
    script = tmp_path / "echo.py"
    script.write_text(ECHO_BACKEND)
    app_id = app_ids.new()
    deploy(agent, app_definition(app_id, f"exec python3 {script}", instances=1, portDefinitions=[{"port": 0}],
                                 labels={"SERVICE_TAGS": "urlprefix-/tls"}, healthChecks=[tcp_check()]))
    wait_for_route(agent, "/tls")
    context = client_context(authority)

    # The certificate follows the name the client asks for; a wildcard covers one label.
    shop = PinnedHTTPSConnection(https_port, "shop.example", context)
    status, body = request(shop, "GET", "/tls/a?x=1")
    assert status == 200, body
    assert shop.served_names() == ["shop.example"]
    seen = json.loads(body)
    assert seen["path"] == "/tls/a?x=1"
    assert seen["headers"]["X-Forwarded-Proto"] == "https" and seen["headers"]["X-Forwarded-For"] == "127.0.0.1"
    assert seen["headers"]["Host"] == f"shop.example:{https_port}"
    # Kept alive: more requests, and a large body both ways, on the same TLS connection.
    payload = bytes(range(256)) * 8192  # 2 MiB
    for _ in range(3):
        status, body = request(shop, "POST", "/tls/upload", body=payload)
        assert status == 200 and json.loads(body)["sha256"] == hashlib.sha256(payload).hexdigest()
    shop.close()
    wildcard = PinnedHTTPSConnection(https_port, "orders.api.example", context)
    assert request(wildcard, "GET", "/tls/")[0] == 200 and wildcard.served_names() == ["*.api.example"]
    wildcard.close()
    unknown = PinnedHTTPSConnection(https_port, "nobody.example", ssl._create_unverified_context())
    assert request(unknown, "GET", "/tls/")[0] == 200 and unknown.served_names() == ["fallback.example"]
    unknown.close()
    # An unknown name is served the default certificate, which a verifying client refuses.
    with pytest.raises(ssl.SSLCertVerificationError):
        request(PinnedHTTPSConnection(https_port, "nobody.example", context), "GET", "/tls/")
    # Plain HTTP on the HTTPS port gets no answer.
    with socket.create_connection(("127.0.0.1", https_port), timeout=5) as plain:
        plain.sendall(b"GET /tls/ HTTP/1.1\r\nHost: x\r\n\r\n")
        assert b"HTTP/1.1 200" not in plain.recv(4096)

    # A renewed certificate is served without a restart.
    renewed = authority.issue_cert("shop.example", "www.shop.example")
    write_cert(renewed, directory, "shop")

    def renewed_served():
        connection = PinnedHTTPSConnection(https_port, "shop.example", context)
        try:
            request(connection, "GET", "/tls/")
            return connection.served_names() == ["shop.example", "www.shop.example"]
        finally:
            connection.close()

    wait_until(renewed_served, timeout=15, what="the renewed certificate served")
    assert "proxy HTTPS listening" in agent.log_tail(400)


def test_the_https_listener_needs_certificates(binary, tmp_path):
    import subprocess
    empty = tmp_path / "empty"
    empty.mkdir()
    result = subprocess.run([str(binary), "agent", "--data-dir", str(tmp_path / "data"), "--api-port", "0",
                             "--proxy-https-port", "0", "--proxy-cert-dir", str(empty)], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "no usable certificate" in result.stderr + result.stdout
    result = subprocess.run([str(binary), "agent", "--data-dir", str(tmp_path / "data"), "--proxy-https-port", "0"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "--proxy-cert-dir" in result.stderr


def test_https_to_instances_is_verified_unless_the_route_skips_it(make_agent, app_ids, tmp_path):
    trusted, stranger = trustme.CA(), trustme.CA()
    files = tmp_path / "upstream"
    files.mkdir()
    trusted.cert_pem.write_to_path(str(files / "ca.pem"))
    write_cert(trusted.issue_cert("127.0.0.1"), files, "trusted")
    write_cert(stranger.issue_cert("127.0.0.1"), files, "stranger")
    script = tmp_path / "tls_backend.py"
    script.write_text(TLS_BACKEND)
    agent = make_agent(extra_args=["--proxy-upstream-ca", str(files / "ca.pem")])

    verified, unverified = app_ids.new("verified"), app_ids.new("stranger")
    deploy(agent, app_definition(verified, f"exec python3 {script} {files}/trusted.pem {files}/trusted.key", instances=1,
                                 portDefinitions=[{"port": 0}], labels={"SERVICE_TAGS": "urlprefix-/secure proto=https"},
                                 healthChecks=[tcp_check()]))
    deploy(agent, app_definition(unverified, f"exec python3 {script} {files}/stranger.pem {files}/stranger.key", instances=1,
                                 portDefinitions=[{"port": 0}],
                                 labels={"SERVICE_TAGS": "urlprefix-/strict proto=https,urlprefix-/lenient proto=https tlsskipverify=true"},
                                 healthChecks=[tcp_check()]))
    entry = wait_for_route(agent, "/secure")[0]
    assert entry["dst"].startswith("https://") and "proto=https" in entry["opts"]
    assert "tlsskipverify=true" in wait_for_route(agent, "/lenient")[0]["opts"]
    wait_for_route(agent, "/strict")

    import requests
    answer = requests.get(f"{agent.proxy_url}/secure/x", timeout=10)
    assert answer.status_code == 200, answer.text
    assert answer.json()["path"] == "/secure/x" and answer.json()["headers"]["X-Forwarded-Proto"] == "http"
    # Kept-alive TLS connections to the instance serve later requests.
    with requests.Session() as session:
        for _ in range(5):
            assert session.get(f"{agent.proxy_url}/secure/y", timeout=10).status_code == 200
    # A certificate the proxy cannot verify: 502, and the log says what to do.
    refused = requests.get(f"{agent.proxy_url}/strict/x", timeout=10)
    assert refused.status_code == 502, refused.text
    wait_until(lambda: "--proxy-upstream-ca" in agent.log_tail(400), timeout=10, what="the TLS failure logged")
    lenient = requests.get(f"{agent.proxy_url}/lenient/x", timeout=10)
    assert lenient.status_code == 200 and lenient.json()["path"] == "/lenient/x"
