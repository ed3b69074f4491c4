"""Consul HTTP API v1 compatibility, driven by the real `consul` client (py-consul) and, where a
client hides what the wire says, by raw `requests`: catalog, health, agent (services, TTL / HTTP /
TCP checks, DeregisterCriticalServiceAfter), KV (cas, flags, recurse, keys, binary values),
blocking queries, and the errors Consul answers with.

Apps are deployed through the Marathon API; an app `/compat/web-x` is the service `compat-web-x`.
Services registered through the agent API get unique names, so the tests share one agent.
"""

import subprocess
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import consul
import pytest
import requests

from support.flotilla import AGENTS_KEY, app_definition, flotilla_binary, free_tcp_port, start_agent, wait_until

NODE = "test-node"
DATACENTER = "dc1"
SLEEP_CMD = "sleep 600"
HTTP_SERVER_CMD = 'exec python3 -m http.server "$PORT0" --bind 127.0.0.1 --directory "$MESOS_SANDBOX"'
WEB_LABELS = {"SERVICE_TAGS": "urlprefix-/web,v1"}
ONE_PORT = [{"port": 0}]


@pytest.fixture(scope="module")
def consul_api(agent):
    return consul.Consul(host="127.0.0.1", port=agent.api_port)


def service_name(app_id: str) -> str:
    """Registrator's default: the app id without the leading '/', with '/' as '-'."""
    return app_id.strip("/").replace("/", "-")


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def deploy(agent, app_id, cmd=SLEEP_CMD, instances=1, **fields) -> list:
    agent.create_app(app_definition(app_id, cmd, instances=instances, portDefinitions=ONE_PORT, labels=WEB_LABELS, **fields))
    return agent.wait_for_running(app_id, instances)


def health_entries(consul_api, name, **options) -> list:
    return consul_api.health.service(name, **options)[1]


def check_status(consul_api, name, check_id) -> str:
    """The status of one check of service `name`, as /v1/health/checks says; None if absent."""
    _, checks = consul_api.health.checks(name)
    found = [check["Status"] for check in checks if check["CheckID"] == check_id]
    return found[0] if found else None


class CheckTarget:
    """A real HTTP server on a free loopback port: 200 on /ok, 500 on /fail."""

    def __init__(self):
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                status = 200 if self.path == "/ok" else 500
                body = b"ok\n" if status == 200 else b"failing\n"
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def private_agent(request, tmp_path_factory):
    """An agent of this test alone, for tests that restart it or may bring it down."""
    agent = start_agent(flotilla_binary(), tmp_path_factory.mktemp("consul-private"))
    request.node.stash[AGENTS_KEY] = [agent]
    yield agent
    agent.stop()
    agent.assert_no_leftovers()


@pytest.fixture
def check_target():
    target = CheckTarget()
    yield target
    target.close()


# --- catalog ---------------------------------------------------------------------------------


def test_catalog_services_and_service_for_a_marathon_app(agent, consul_api, app_ids):
    app_id = app_ids.new("web")
    name = service_name(app_id)
    [task] = deploy(agent, app_id)

    def listed():
        index, services = consul_api.catalog.services()
        return (index, services) if name in services else None

    index, services = wait_until(listed, timeout=10, what=f"{name} in catalog.services")
    assert int(index) > 0
    assert sorted(services[name]) == ["urlprefix-/web", "v1"]

    index, entries = consul_api.catalog.service(name)
    assert int(index) > 0
    assert len(entries) == 1, entries
    [entry] = entries
    assert entry["ServiceName"] == name
    assert entry["ServicePort"] == task["ports"][0]
    assert entry["ServiceAddress"] == "127.0.0.1"
    assert sorted(entry["ServiceTags"]) == ["urlprefix-/web", "v1"]
    assert entry["Node"] == NODE
    assert entry["Address"] == "127.0.0.1"
    assert entry["Datacenter"] == DATACENTER
    assert entry["ServiceID"]

    assert len(consul_api.catalog.service(name, tag="v1")[1]) == 1
    assert consul_api.catalog.service(name, tag="no-such-tag")[1] == []
    assert consul_api.catalog.service(unique("no-such-service"))[1] == []


def test_catalog_nodes_and_node(agent, consul_api, app_ids):
    app_id = app_ids.new("node")
    name = service_name(app_id)
    deploy(agent, app_id)

    index, nodes = consul_api.catalog.nodes()
    assert int(index) > 0
    assert [node["Node"] for node in nodes] == [NODE], nodes
    assert nodes[0]["Address"] == "127.0.0.1"
    assert nodes[0]["Datacenter"] == DATACENTER

    def with_service():
        _, node = consul_api.catalog.node(NODE)
        ids = [service_id for service_id, service in node["Services"].items() if service["Service"] == name]
        return (node, ids) if ids else None

    node, ids = wait_until(with_service, timeout=10, what=f"{name} among the services of node {NODE}")
    assert node["Node"]["Node"] == NODE
    assert node["Node"]["Address"] == "127.0.0.1"
    assert len(ids) == 1

    index, missing = consul_api.catalog.node("no-such-node")
    assert missing is None
    assert int(index) > 0


# --- health ----------------------------------------------------------------------------------


def test_health_service_passing_and_tag(agent, consul_api, app_ids):
    app_id = app_ids.new("healthy")
    name = service_name(app_id)
    health_check = {
        "protocol": "HTTP", "path": "/", "portIndex": 0, "gracePeriodSeconds": 0, "intervalSeconds": 1,
        "timeoutSeconds": 0.5, "maxConsecutiveFailures": 0,
    }
    tasks = deploy(agent, app_id, HTTP_SERVER_CMD, instances=2, healthChecks=[health_check])

    passing = wait_until(
        lambda: (lambda entries: entries if len(entries) == 2 else None)(health_entries(consul_api, name, passing=True)),
        timeout=15,
        what=f"2 passing instances of {name}",
    )
    assert sorted(entry["Service"]["Port"] for entry in passing) == sorted(task["ports"][0] for task in tasks)
    for entry in passing:
        assert entry["Node"]["Node"] == NODE
        assert entry["Service"]["Service"] == name
        statuses = {check["CheckID"]: check["Status"] for check in entry["Checks"]}
        assert statuses.pop("serfHealth") == "passing", entry["Checks"]
        assert statuses and set(statuses.values()) == {"passing"}, entry["Checks"]

    assert len(health_entries(consul_api, name, passing=True, tag="v1")) == 2
    assert len(health_entries(consul_api, name, passing=True, tag="urlprefix-/web")) == 2
    assert health_entries(consul_api, name, passing=True, tag="no-such-tag") == []
    assert health_entries(consul_api, unique("no-such-service")) == []


def test_health_checks_and_state(consul_api):
    name = unique("state")
    assert consul_api.agent.service.register(name, service_id=name, port=8080, check=consul.Check.ttl("30s"))
    check_id = f"service:{name}"

    index, checks = consul_api.health.checks(name)
    assert int(index) > 0
    assert [(check["CheckID"], check["Status"], check["ServiceName"]) for check in checks] == [(check_id, "critical", name)]

    def ids(state):
        return {check["CheckID"] for check in consul_api.health.state(state)[1]}

    assert check_id in ids("critical")
    assert check_id not in ids("passing")
    assert {"serfHealth", check_id} <= ids("any")
    assert "serfHealth" in ids("passing")

    assert consul_api.agent.check.ttl_pass(check_id)
    assert check_id in ids("passing")
    assert check_id not in ids("critical")
    states = {check["CheckID"]: check["Status"] for check in consul_api.health.state("any")[1]}
    assert states[check_id] == "passing"


# --- agent -----------------------------------------------------------------------------------


def test_agent_self_and_members(consul_api):
    own = consul_api.agent.self()
    assert own["Config"]["Datacenter"] == DATACENTER
    assert own["Config"]["NodeName"] == NODE
    members = consul_api.agent.members()
    assert [member["Name"] for member in members] == [NODE]
    assert members[0]["Addr"] == "127.0.0.1"
    assert members[0]["Status"] == 1
    assert consul_api.catalog.datacenters() == [DATACENTER]


def test_agent_services_and_checks(agent, consul_api, app_ids):
    app_id = app_ids.new("agent")
    app_service = service_name(app_id)
    deploy(agent, app_id)
    name = unique("registered")
    assert consul_api.agent.service.register(
        name, service_id=f"{name}-1", address="127.0.0.9", port=9000, tags=["a", "b"], meta={"version": "7"},
        check=consul.Check.ttl("30s"),
    )

    services = consul_api.agent.services()
    assert services[f"{name}-1"]["Service"] == name
    assert services[f"{name}-1"]["Port"] == 9000
    assert services[f"{name}-1"]["Address"] == "127.0.0.9"
    assert services[f"{name}-1"]["Tags"] == ["a", "b"]
    assert services[f"{name}-1"]["Meta"] == {"version": "7"}
    wait_until(
        lambda: any(service["Service"] == app_service for service in consul_api.agent.services().values()),
        timeout=10,
        what=f"the app's service {app_service} in agent.services",
    )

    checks = consul_api.agent.checks()
    assert checks[f"service:{name}-1"]["Status"] == "critical"
    assert checks[f"service:{name}-1"]["ServiceID"] == f"{name}-1"
    assert checks[f"service:{name}-1"]["ServiceName"] == name


def test_ttl_check_starts_critical_and_passes(consul_api):
    name = unique("ttl")
    assert consul_api.agent.service.register(name, service_id=name, port=7000, check=consul.Check.ttl("10s"))
    check_id = f"service:{name}"

    [entry] = health_entries(consul_api, name)
    assert [check["Status"] for check in entry["Checks"] if check["CheckID"] == check_id] == ["critical"]
    assert health_entries(consul_api, name, passing=True) == []

    assert consul_api.agent.check.ttl_pass(check_id, "all good")
    [entry] = health_entries(consul_api, name, passing=True)
    assert entry["Service"]["ID"] == name
    [check] = [check for check in entry["Checks"] if check["CheckID"] == check_id]
    assert check["Status"] == "passing"
    assert check["Output"] == "all good"

    assert consul_api.agent.check.ttl_warn(check_id)
    assert check_status(consul_api, name, check_id) == "warning"
    assert health_entries(consul_api, name, passing=True) == []
    assert consul_api.agent.check.ttl_fail(check_id)
    assert check_status(consul_api, name, check_id) == "critical"
    assert not consul_api.agent.check.ttl_pass(f"service:{unique('no-such-check')}"), "an unknown check id is a 404"


def test_http_and_tcp_checks_pass(consul_api, check_target):
    name = unique("probed")
    assert consul_api.agent.service.register(
        name, service_id=name, address="127.0.0.1", port=check_target.port,
        check=consul.Check.http(check_target.url("/ok"), "1s", timeout="1s"),
        extra_checks=[consul.Check.tcp("127.0.0.1", check_target.port, "1s", timeout="1s")],
    )
    entries = wait_until(
        lambda: health_entries(consul_api, name, passing=True),
        timeout=5,
        what=f"the HTTP and TCP checks of {name} to pass",
    )
    [entry] = entries
    service_checks = [check for check in entry["Checks"] if check["ServiceID"] == name]
    assert sorted(check["Type"] for check in service_checks) == ["http", "tcp"], service_checks
    assert all(check["Status"] == "passing" for check in service_checks), service_checks


def test_failing_http_checks_are_critical(consul_api, check_target):
    closed = unique("closed")
    failing = unique("failing")
    assert consul_api.agent.service.register(
        closed, service_id=closed, port=1, check=consul.Check.http(f"http://127.0.0.1:{free_tcp_port()}/", "1s", timeout="1s"),
    )
    assert consul_api.agent.service.register(
        failing, service_id=failing, port=1, check=consul.Check.http(check_target.url("/fail"), "1s", timeout="1s"),
    )

    def probed(name):
        def ran():
            _, checks = consul_api.health.checks(name)
            return checks if checks and checks[0]["Output"] else None
        return wait_until(ran, timeout=5, what=f"the HTTP check of {name} to have run")

    for name in (closed, failing):
        [check] = probed(name)
        assert check["Status"] == "critical", check
        assert health_entries(consul_api, name, passing=True) == []
    # Still critical on later runs.
    time.sleep(1.5)
    assert check_status(consul_api, closed, f"service:{closed}") == "critical"
    assert check_status(consul_api, failing, f"service:{failing}") == "critical"


def test_deregister_critical_service_after(consul_api):
    name = unique("reaped")
    check = {**consul.Check.ttl("1s"), "DeregisterCriticalServiceAfter": "2s"}
    assert consul_api.agent.service.register(name, service_id=name, port=1234, check=check)
    assert consul_api.agent.check.ttl_pass(f"service:{name}")
    passed_at = time.monotonic()
    assert len(health_entries(consul_api, name, passing=True)) == 1

    wait_until(
        lambda: name not in consul_api.agent.services(),
        timeout=10,
        interval=0.2,
        what=f"{name} to be deregistered 1 s (TTL) + 2 s (DeregisterCriticalServiceAfter) after its last pass",
    )
    gone_after = time.monotonic() - passed_at
    assert gone_after >= 2.0, f"deregistered {gone_after:.1f} s after the last pass: before TTL + DeregisterCriticalServiceAfter"
    assert consul_api.catalog.service(name)[1] == []
    assert name not in consul_api.catalog.services()[1]


def test_deregister(consul_api):
    name = unique("leaving")
    assert consul_api.agent.service.register(name, service_id=name, port=4321, check=consul.Check.ttl("30s"))
    assert name in consul_api.agent.services()
    assert consul_api.agent.service.deregister(name)
    assert name not in consul_api.agent.services()
    assert f"service:{name}" not in consul_api.agent.checks()
    assert consul_api.catalog.service(name)[1] == []
    assert not consul_api.agent.service.deregister(name), "deregistering an unknown service id is a 404"


# --- KV --------------------------------------------------------------------------------------


def test_kv_put_get_delete(consul_api):
    key = f"{unique('kv')}/greeting"
    assert consul_api.kv.put(key, "hello")
    index, entry = consul_api.kv.get(key)
    assert int(index) > 0
    assert entry["Key"] == key
    assert entry["Value"] == b"hello"
    assert entry["Flags"] == 0
    assert entry["CreateIndex"] <= entry["ModifyIndex"] <= int(index)

    assert consul_api.kv.put(key, "again")
    _, updated = consul_api.kv.get(key)
    assert updated["Value"] == b"again"
    assert updated["CreateIndex"] == entry["CreateIndex"]
    assert updated["ModifyIndex"] > entry["ModifyIndex"]

    assert consul_api.kv.delete(key)
    index, gone = consul_api.kv.get(key)
    assert gone is None
    assert int(index) > 0


def test_kv_cas_and_flags(consul_api):
    key = f"{unique('cas')}/lock"
    assert consul_api.kv.put(key, "first", cas=0), "cas=0 creates a missing key"
    assert not consul_api.kv.put(key, "second", cas=0), "cas=0 never overwrites"
    _, entry = consul_api.kv.get(key)
    assert entry["Value"] == b"first"

    modify_index = entry["ModifyIndex"]
    assert consul_api.kv.put(key, "third", cas=modify_index)
    assert not consul_api.kv.put(key, "stale", cas=modify_index), "a stale cas index must not write"
    _, entry = consul_api.kv.get(key)
    assert entry["Value"] == b"third"

    assert not consul_api.kv.delete(key, cas=modify_index), "a stale cas index must not delete"
    assert consul_api.kv.get(key)[1] is not None
    assert consul_api.kv.delete(key, cas=entry["ModifyIndex"])
    assert consul_api.kv.get(key)[1] is None

    flagged = f"{unique('flags')}/x"
    assert consul_api.kv.put(flagged, "v", flags=42)
    assert consul_api.kv.get(flagged)[1]["Flags"] == 42
    assert consul_api.kv.put(flagged, "v", flags=2**63 - 1)
    assert consul_api.kv.get(flagged)[1]["Flags"] == 2**63 - 1


def test_kv_flags_take_any_uint64(private_agent):
    """Consul's flags are a uint64. On an agent of its own: a crash here must not take the others down."""
    client = consul.Consul(host="127.0.0.1", port=private_agent.api_port)
    for flags in (2**63, 2**64 - 1):
        key = f"flags/{flags}"
        try:
            written = client.kv.put(key, "v", flags=flags)
        except requests.ConnectionError as error:
            try:  # a crashing agent prints its backtrace before it exits
                status = private_agent.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                status = "still running"
            written = f"no answer ({error}); agent exit status: {status}"
        assert written is True, f"PUT /v1/kv/{key}?flags={flags}: {written}"
        assert client.kv.get(key)[1]["Flags"] == flags


def test_kv_recurse_keys_and_binary_values(consul_api):
    prefix = f"{unique('tree')}/"
    binary = bytes(range(256)) + b"\x00\xff\xfe"
    values = {"a": b"1", "b/c": b"2", "b/d/e": b"3", "bin": binary, "empty": None}
    for key, value in values.items():
        assert consul_api.kv.put(prefix + key, value)

    index, entries = consul_api.kv.get(prefix, recurse=True)
    assert int(index) > 0
    assert {entry["Key"]: entry["Value"] for entry in entries} == {prefix + key: value for key, value in values.items()}
    assert consul_api.kv.get(prefix + "bin")[1]["Value"] == binary
    raw = requests.get(f"{consul_api.http.base_uri}/v1/kv/{prefix}bin", params={"raw": ""}, timeout=10)
    assert raw.status_code == 200 and raw.content == binary

    _, keys = consul_api.kv.get(prefix, keys=True)
    assert sorted(keys) == sorted(prefix + key for key in values)
    _, shallow = consul_api.kv.get(prefix, keys=True, separator="/")
    assert sorted(shallow) == [prefix + "a", prefix + "b/", prefix + "bin", prefix + "empty"]
    _, deeper = consul_api.kv.get(prefix + "b/", keys=True, separator="/")
    assert sorted(deeper) == [prefix + "b/c", prefix + "b/d/"]

    assert consul_api.kv.delete(prefix + "b/", recurse=True)
    _, left = consul_api.kv.get(prefix, recurse=True)
    assert sorted(entry["Key"] for entry in left) == [prefix + "a", prefix + "bin", prefix + "empty"]
    assert consul_api.kv.delete(prefix, recurse=True)
    index, nothing = consul_api.kv.get(prefix, recurse=True)
    assert nothing is None and int(index) > 0


def test_kv_missing_key_is_404_with_an_index(agent, consul_api):
    key = f"{unique('missing')}/key"
    index, value = consul_api.kv.get(key)
    assert value is None
    assert index is not None and int(index) > 0
    response = agent.get(f"/v1/kv/{key}")
    assert response.status_code == 404
    assert int(response.headers["X-Consul-Index"]) > 0


# --- blocking queries ------------------------------------------------------------------------


def test_blocking_kv_get_returns_soon_after_a_put(consul_api):
    key = f"{unique('watch')}/value"
    assert consul_api.kv.put(key, "before")
    index, _ = consul_api.kv.get(key)

    def watch():
        result = consul_api.kv.get(key, index=index, wait="10s")
        return result, time.monotonic()

    with ThreadPoolExecutor(max_workers=1) as pool:
        future = pool.submit(watch)
        time.sleep(0.5)
        assert not future.done(), f"the blocking get returned before any change: {future.result()}"
        put_at = time.monotonic()
        assert consul_api.kv.put(key, "after")
        (new_index, entry), returned_at = future.result(timeout=15)
    assert returned_at - put_at < 1.0, f"the blocking get returned {returned_at - put_at:.2f} s after the put"
    assert int(new_index) > int(index)
    assert entry["Value"] == b"after"


def test_blocking_health_service_returns_when_the_app_scales(agent, consul_api, app_ids):
    app_id = app_ids.new("scaled")
    name = service_name(app_id)
    deploy(agent, app_id)
    index, entries = wait_until(
        lambda: (lambda answer: answer if len(answer[1]) == 1 else None)(consul_api.health.service(name)),
        timeout=10,
        what=f"one instance of {name} in health.service",
    )

    def watch_until_two(after):
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            new_index, found = consul_api.health.service(name, index=after, wait="10s")
            assert int(new_index) >= int(after), f"the index went backwards: {after} -> {new_index}"
            if len(found) == 2:
                return new_index, found, time.monotonic()
            after = new_index
        return None

    with ThreadPoolExecutor(max_workers=1) as pool:
        future = pool.submit(watch_until_two, index)
        time.sleep(0.5)
        assert not future.done(), f"the blocking query returned before any change: {future.result()}"
        scaled_at = time.monotonic()
        response = agent.put(f"/v2/apps{app_id}", json={"instances": 2})
        assert response.status_code == 200, response.text
        result = future.result(timeout=30)
    assert result is not None, f"{name} never showed 2 instances to the blocking query"
    new_index, found, returned_at = result
    assert int(new_index) > int(index)
    assert returned_at - scaled_at < 10, "the blocking query should have returned as the new instance started"
    ports = sorted(task["ports"][0] for task in agent.wait_for_running(app_id, 2))
    assert sorted(entry["Service"]["Port"] for entry in found) == ports


def test_indexes_never_go_backwards_across_a_restart(private_agent):
    agent = private_agent
    client = consul.Consul(host="127.0.0.1", port=agent.api_port)
    for number in range(5):
        assert client.kv.put(f"restart/key{number}", str(number))
    assert client.kv.delete("restart/key4")  # the last change is a delete
    name = unique("kept")
    assert client.agent.service.register(name, service_id=name, port=80, check=consul.Check.ttl("30s"))
    assert client.agent.service.register(unique("dropped"), service_id="dropped", port=81)
    assert client.agent.service.deregister("dropped")

    def indexes():
        kv = agent.get("/v1/kv/", params={"recurse": ""})
        catalog = agent.get("/v1/catalog/services")
        assert kv.status_code == 200 and catalog.status_code == 200, (kv.text, catalog.text)
        return int(kv.headers["X-Consul-Index"]), int(catalog.headers["X-Consul-Index"])

    kv_before, catalog_before = indexes()
    assert agent.stop()
    agent.restart()
    kv_after, catalog_after = indexes()
    assert kv_after >= kv_before, f"/v1/kv/ index went backwards across a restart: {kv_before} -> {kv_after}"
    assert catalog_after >= catalog_before, (
        f"/v1/catalog/services index went backwards across a restart: {catalog_before} -> {catalog_after}"
    )
    assert name in client.catalog.services()[1]
    assert client.kv.get("restart/key3")[1]["Value"] == b"3"
    assert client.kv.get("restart/key4")[1] is None

    # Nothing changed since: a blocking query at the index reported now waits out its wait.
    started = time.monotonic()
    client.kv.get("restart/", recurse=True, index=kv_after, wait="1s")
    assert time.monotonic() - started >= 0.9, "a blocking query at the current index must block"


# --- the wire: headers, consistency modes, errors ---------------------------------------------


def test_consul_headers(agent):
    for path in ("/v1/catalog/services", "/v1/catalog/nodes", "/v1/health/state/any", "/v1/kv/?recurse"):
        response = agent.get(path)
        assert response.status_code in (200, 404), (path, response.status_code, response.text)
        assert int(response.headers["X-Consul-Index"]) > 0, path
        assert response.headers["X-Consul-KnownLeader"] == "true", path
        assert "X-Consul-LastContact" in response.headers, path
        assert int(response.headers["X-Consul-LastContact"]) >= 0, path


def test_stale_and_consistent_are_accepted(agent, consul_api):
    for mode in ("stale", "consistent"):
        response = agent.get("/v1/catalog/services", params={mode: ""})
        assert response.status_code == 200, (mode, response.text)
        assert agent.get("/v1/health/state/any", params={mode: "1"}).status_code == 200
    for mode in ("stale", "consistent"):
        client = consul.Consul(host="127.0.0.1", port=agent.api_port, consistency=mode)
        assert client.catalog.services()[1] is not None
        assert NODE in [node["Node"] for node in client.catalog.nodes()[1]]


@pytest.mark.parametrize(
    "method, path, params, body",
    [
        ("GET", "/v1/catalog/services", {"index": "abc"}, None),
        ("GET", "/v1/health/service/web", {"index": "-1"}, None),
        ("GET", "/v1/kv/some/key", {"index": "1.5"}, None),
        ("GET", "/v1/catalog/services", {"index": "1", "wait": "forever"}, None),
        ("GET", "/v1/kv/some/key", {"index": "1", "wait": "10x"}, None),
        ("GET", "/v1/health/state/bogus", {}, None),
        ("PUT", "/v1/agent/service/register", {}, b"{not json"),
        ("PUT", "/v1/agent/service/register", {}, b"[1, 2]"),
        ("PUT", "/v1/agent/service/register", {}, b'{"Port": 80}'),
        ("PUT", "/v1/agent/service/register", {}, b'{"Name": "x", "Port": "eighty"}'),
        ("PUT", "/v1/agent/service/register", {}, b'{"Name": "x", "Check": {"TTL": "soon"}}'),
    ],
    ids=[
        "index-not-a-number", "index-negative", "index-fraction", "wait-word", "wait-bad-unit", "health-state",
        "register-not-json", "register-not-object", "register-no-name", "register-bad-port", "register-bad-ttl",
    ],
)
def test_bad_requests_are_400(agent, method, path, params, body):
    response = agent.request(method, path, params=params, data=body)
    assert response.status_code == 400, f"{method} {path} {params} {body!r}: {response.status_code} {response.text}"


def test_kv_value_over_512_kib_is_413(agent, consul_api):
    key = f"{unique('big')}/value"
    response = agent.put(f"/v1/kv/{key}", data=b"x" * (512 * 1024 + 1))
    assert response.status_code == 413, f"{response.status_code} {response.text}"
    assert consul_api.kv.get(key)[1] is None
    exactly = agent.put(f"/v1/kv/{key}", data=b"y" * (512 * 1024))
    assert exactly.status_code == 200 and exactly.json() is True, exactly.text
    assert len(consul_api.kv.get(key)[1]["Value"]) == 512 * 1024


def test_unknown_datacenter_is_404(agent, consul_api):
    for path in ("/v1/catalog/services", "/v1/health/service/web", "/v1/kv/some/key", "/v1/catalog/nodes"):
        response = agent.get(path, params={"dc": "no-such-dc"})
        assert response.status_code == 404, (path, response.status_code, response.text)
    assert agent.get("/v1/catalog/services", params={"dc": DATACENTER}).status_code == 200
    assert consul.Consul(host="127.0.0.1", port=agent.api_port, dc=DATACENTER).catalog.services()[1] is not None
