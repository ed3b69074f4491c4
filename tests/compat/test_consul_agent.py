"""The rest of Consul's agent and catalog API that clients call, driven by py-consul: checks
registered on their own (TTL, HTTP with a method and headers, command checks), maintenance
mode of a service and of the node, one service's definition with hash-based blocking, catalog
registration of external nodes, and user events."""

import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import consul
import pytest
import requests

from support.dns import dig, dig_short
from support.flotilla import app_definition, wait_until

NODE = "test-node"
DOMAIN = "flotilla"


@pytest.fixture(scope="module")
def consul_api(agent):
    return consul.Consul(host="127.0.0.1", port=agent.api_port)


def unique(prefix):
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def node_checks(consul_api):
    return {check["CheckID"]: check for check in consul_api.health.node(NODE)[1]}


def passing_ids(consul_api, name):
    return {entry["Service"]["ID"] for entry in consul_api.health.service(name, passing=True)[1]}


@pytest.fixture
def recorder():
    """An HTTP server that remembers the method and headers of each request it gets."""
    seen = []

    class Handler(BaseHTTPRequestHandler):
        def handle_one_request(self):
            super().handle_one_request()

        def answer(self):
            length = int(self.headers.get("Content-Length") or 0)
            seen.append((self.command, dict(self.headers), self.rfile.read(length) if length else b""))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_GET = do_POST = do_PUT = do_HEAD = answer

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1], seen
    server.shutdown()
    server.server_close()


def test_node_checks_registered_on_their_own(consul_api, agent):
    service = unique("on-node")
    assert consul_api.agent.service.register(service, service_id=service, port=1)
    wait_until(lambda: passing_ids(consul_api, service) == {service}, timeout=5, what="the service passing")

    check_id = unique("disk")
    assert consul_api.agent.check.register("disk space", check=consul.Check.ttl("30s"), check_id=check_id, notes="df")
    checks = node_checks(consul_api)
    assert checks[check_id]["Status"] == "critical", "a new check starts critical, as in Consul"
    assert checks[check_id]["Notes"] == "df" and checks[check_id]["ServiceID"] == ""
    assert check_id in consul_api.agent.checks()
    # A critical node check takes every service on the node out of the passing set, and out of DNS.
    assert passing_ids(consul_api, service) == set()
    assert dig(agent.dns_port, f"{service}.service.{DOMAIN}", "A").status == "NXDOMAIN"

    assert consul_api.agent.check.ttl_pass(check_id, "plenty")
    assert node_checks(consul_api)[check_id]["Status"] == "passing"
    assert passing_ids(consul_api, service) == {service}
    assert dig_short(agent.dns_port, f"{service}.service.{DOMAIN}", "A") == ["127.0.0.1"]

    assert consul_api.agent.check.deregister(check_id)
    assert check_id not in node_checks(consul_api)
    assert consul_api.agent.check.deregister(check_id) is False, "an unknown check id is 404"
    reply = agent.put("/v1/agent/check/register", json={"Name": "both", "TTL": "10s", "Interval": "10s", "HTTP": "http://x/"})
    assert reply.status_code == 400, reply.text
    reply = agent.put("/v1/agent/check/register", json={"Name": "orphan", "TTL": "10s", "ServiceID": "no-such-service"})
    assert reply.status_code == 404 and "does not exist" in reply.text
    consul_api.agent.service.deregister(service)


def test_http_check_sends_its_method_headers_and_body(consul_api, agent, recorder):
    port, seen = recorder
    service = unique("probed")
    assert consul_api.agent.service.register(service, service_id=service, port=port)
    check = {**consul.Check.http(f"http://127.0.0.1:{port}/health", "1s", header={"X-Probe": ["flotilla"]}),
             "Method": "POST", "Body": "ping"}
    assert consul_api.agent.check.register("probe", check=check, check_id=f"{service}-http", service_id=service)
    wait_until(lambda: consul_api.health.checks(service)[1] and consul_api.health.checks(service)[1][-1]["Status"] == "passing",
               timeout=10, what="the HTTP check to pass")
    method, headers, body = seen[-1]
    assert method == "POST" and headers.get("X-Probe") == "flotilla" and body == b"ping"
    consul_api.agent.service.deregister(service)


def test_command_checks_run_their_arguments(consul_api):
    good, bad = unique("script-ok"), unique("script-bad")
    assert consul_api.agent.check.register("ok", check=consul.Check.script(["/bin/sh", "-c", "exit 0"], "1s"), check_id=good)
    assert consul_api.agent.check.register("bad", check=consul.Check.script(["sh", "-c", "echo broken; exit 2"], "1s"), check_id=bad)
    wait_until(lambda: node_checks(consul_api)[good]["Status"] == "passing", timeout=10, what="the passing command check")
    wait_until(lambda: node_checks(consul_api)[bad]["Output"] != "", timeout=10, what="the failing command check to run")
    failing = node_checks(consul_api)[bad]
    assert failing["Status"] == "critical" and "exit status 2" in failing["Output"] and "broken" in failing["Output"]
    consul_api.agent.check.deregister(good)
    consul_api.agent.check.deregister(bad)


def test_service_maintenance_takes_it_out_of_service(consul_api, agent, app_ids):
    service = unique("maint")
    assert consul_api.agent.service.register(service, service_id=service, port=1)
    assert consul_api.agent.service.maintenance(service, True, "upgrading")
    [check] = [c for c in consul_api.health.checks(service)[1] if c["CheckID"] == f"_service_maintenance:{service}"]
    assert check["Status"] == "critical" and check["Notes"] == "upgrading" and check["Name"] == "Service Maintenance Mode"
    assert passing_ids(consul_api, service) == set()
    assert consul_api.agent.service.maintenance(service, False)
    assert passing_ids(consul_api, service) == {service}
    assert consul_api.agent.service.maintenance("no-such-service", True) is False, "an unknown service is 404"
    consul_api.agent.service.deregister(service)

    # An app's instance too: it leaves the passing set (and the load balancer) while in maintenance.
    app_id = app_ids.new("maint")
    name = app_id.strip("/").replace("/", "-")
    agent.create_app(app_definition(app_id, "sleep 600", portDefinitions=[{"port": 0}]))
    agent.wait_for_running(app_id, 1)
    wait_until(lambda: len(passing_ids(consul_api, name)) == 1, timeout=10, what="the instance passing")
    [instance_service] = passing_ids(consul_api, name)
    assert consul_api.agent.service.maintenance(instance_service, True)
    assert passing_ids(consul_api, name) == set()
    assert consul_api.agent.service.maintenance(instance_service, False)
    assert passing_ids(consul_api, name) == {instance_service}


def test_node_maintenance(consul_api):
    service = unique("node-maint")
    assert consul_api.agent.service.register(service, service_id=service, port=1)
    assert consul_api.agent.maintenance(True, "kernel upgrade")
    try:
        check = node_checks(consul_api)["_node_maintenance"]
        assert check["Status"] == "critical" and check["Notes"] == "kernel upgrade"
        assert passing_ids(consul_api, service) == set()
    finally:
        assert consul_api.agent.maintenance(False)
    assert "_node_maintenance" not in node_checks(consul_api)
    assert passing_ids(consul_api, service) == {service}
    consul_api.agent.service.deregister(service)


def test_one_service_definition_with_hash_blocking(consul_api, agent):
    service = unique("defined")
    assert consul_api.agent.service.register(service, service_id=service, port=7, tags=["a"])
    definition = consul_api.agent.service_definition(service)
    assert definition["ID"] == service and definition["Port"] == 7 and definition["Tags"] == ["a"]
    reply = agent.get(f"/v1/agent/service/{service}")
    content_hash = reply.headers["X-Consul-ContentHash"]
    assert reply.json()["ContentHash"] == content_hash

    def change_later():
        time.sleep(0.5)
        consul_api.agent.service.register(service, service_id=service, port=7, tags=["b"])

    threading.Thread(target=change_later).start()
    started = time.monotonic()
    reply = agent.get(f"/v1/agent/service/{service}", params={"hash": content_hash, "wait": "10s"})
    assert time.monotonic() - started < 5, "the blocking query must return on the change"
    assert reply.json()["Tags"] == ["b"] and reply.headers["X-Consul-ContentHash"] != content_hash
    assert agent.get("/v1/agent/service/no-such-service").status_code == 404
    consul_api.agent.service.deregister(service)


def test_agent_services_is_not_a_blocking_query(consul_api, agent):
    index = agent.get("/v1/catalog/services").headers["X-Consul-Index"]
    started = time.monotonic()
    assert agent.get("/v1/agent/services", params={"index": index, "wait": "5s"}).status_code == 200
    assert time.monotonic() - started < 2, "Consul documents /v1/agent/services as not blocking"


def test_catalog_register_and_deregister_an_external_node(consul_api, agent):
    node, service = unique("ext-node"), unique("ext-svc")
    assert consul_api.catalog.register(
        node, "127.0.0.77", service={"Service": service, "ID": service, "Port": 6379, "Tags": ["primary"]},
        check={"Node": node, "CheckID": f"{service}-alive", "Name": "alive", "Status": "passing", "ServiceID": service})
    assert node in {entry["Node"] for entry in consul_api.catalog.nodes()[1]}
    [entry] = consul_api.catalog.service(service)[1]
    assert (entry["Node"], entry["Address"], entry["ServicePort"], entry["ServiceTags"]) == (node, "127.0.0.77", 6379, ["primary"])
    assert passing_ids(consul_api, service) == {service}
    assert dig_short(agent.dns_port, f"{service}.service.{DOMAIN}", "A") == ["127.0.0.77"]

    assert consul_api.catalog.register(node, "127.0.0.77", check={"Node": node, "CheckID": f"{service}-alive", "Name": "alive",
                                                                  "Status": "critical", "ServiceID": service})
    assert passing_ids(consul_api, service) == set()

    assert consul_api.catalog.deregister(node)
    assert node not in {entry["Node"] for entry in consul_api.catalog.nodes()[1]}
    assert consul_api.catalog.service(service)[1] == []
    reply = agent.put("/v1/catalog/register", json={"Address": "1.2.3.4"})
    assert reply.status_code == 500 and "Must provide node" in reply.text
    reply = agent.put("/v1/catalog/register", json={"Node": node, "Address": "127.0.0.77", "Bogus": 1})
    assert reply.status_code == 400 and "unknown field" in reply.text


def test_user_events_fire_and_list(consul_api):
    name = unique("deploy")
    event = consul_api.event.fire(name, "v2")
    assert event["Name"] == name and event["ID"] and event["Version"] == 1
    index, events = consul_api.event.list(name=name)
    assert [e["Payload"] for e in events] == [b"v2"]

    def fire_later():
        time.sleep(0.5)
        consul_api.event.fire(name, "v3")

    threading.Thread(target=fire_later).start()
    started = time.monotonic()
    new_index, events = consul_api.event.list(name=name, index=index, wait="10s")
    assert time.monotonic() - started < 5 and new_index != index
    assert [e["Payload"] for e in events] == [b"v2", b"v3"]
    with pytest.raises(consul.ConsulException):
        consul_api.event.fire(name, "x", tag="only-with-service")


def test_reregistration_keeps_or_replaces_checks_as_consul_does(consul_api, agent):
    service = unique("rereg")
    first = {"Name": service, "ID": service, "Port": 1, "Checks": [{"CheckID": "a", "TTL": "30s"}]}
    second = {"Name": service, "ID": service, "Port": 1, "Checks": [{"CheckID": "b", "TTL": "30s"}]}
    assert agent.put("/v1/agent/service/register", json=first).status_code == 200
    assert consul_api.agent.check.ttl_pass("a")
    assert agent.put("/v1/agent/service/register", json=second).status_code == 200
    checks = {c["CheckID"]: c["Status"] for c in consul_api.health.checks(service)[1]}
    assert checks == {"a": "passing", "b": "critical"}, "without replace-existing-checks the old check stays, with its state"
    reply = agent.put("/v1/agent/service/register", params={"replace-existing-checks": "1"}, json=second)
    assert reply.status_code == 200
    assert set(c["CheckID"] for c in consul_api.health.checks(service)[1]) == {"a", "b"}, "only '' or 'true' turns it on, as in Consul"
    assert agent.put("/v1/agent/service/register", params={"replace-existing-checks": "true"}, json=second).status_code == 200
    assert {c["CheckID"] for c in consul_api.health.checks(service)[1]} == {"b"}
    consul_api.agent.service.deregister(service)


def test_registration_fields_are_read_or_refused(agent):
    name = unique("fields")
    reply = agent.put("/v1/agent/service/register", json={"Name": name, "Weights": {"Passing": 3, "Warning": 1}, "EnableTagOverride": True})
    assert reply.status_code == 200, "fields kept by Consul and documented as ignored here are accepted"
    reply = agent.put("/v1/agent/service/register", json={"Name": name, "Colour": "blue"})
    assert reply.status_code == 400 and "unknown field" in reply.text
    reply = agent.put("/v1/agent/service/register", json={"Name": name, "Kind": "connect-proxy", "Proxy": {}})
    assert reply.status_code == 400 and "not supported" in reply.text
    agent.put(f"/v1/agent/service/deregister/{name}")


def test_https_checks_verify_certificates_unless_told_not_to(consul_api, tmp_path):
    import ssl
    import trustme

    authority = trustme.CA()
    certificate = authority.issue_cert("127.0.0.1")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    certificate.configure_cert(context)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"https://127.0.0.1:{server.server_address[1]}/"
    strict, lenient = unique("tls-strict"), unique("tls-skip")
    try:
        assert consul_api.agent.check.register("strict", check=consul.Check.http(url, "1s"), check_id=strict)
        assert consul_api.agent.check.register("lenient", check={**consul.Check.http(url, "1s"), "TLSSkipVerify": True}, check_id=lenient)
        wait_until(lambda: node_checks(consul_api)[lenient]["Status"] == "passing", timeout=10, what="the TLSSkipVerify check to pass")
        wait_until(lambda: node_checks(consul_api)[strict]["Output"] != "", timeout=10, what="the verifying check to run")
        assert node_checks(consul_api)[strict]["Status"] == "critical", "a certificate no CA vouches for fails, as in Consul"
    finally:
        consul_api.agent.check.deregister(strict)
        consul_api.agent.check.deregister(lenient)
        server.shutdown()
        server.server_close()
