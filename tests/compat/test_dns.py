"""Consul-style DNS, asked with `dig` as operators do (and once each over UDP and TCP with
dnspython): `<svc>.service.flotilla` (A of passing instances only), SRV with node targets and their
A records as additionals, `<tag>.<svc>.service`, RFC 2782 `_<svc>._<tag>.service` and
`_<svc>._tcp.service`, the datacenter form, `<node>.node`, NXDOMAIN for unknown names, NOERROR with
no answer for a known service with nothing passing (failing checks, draining), TCP, truncation of
large answers over UDP, and case-insensitive names.

All instances of the test agent share the address 127.0.0.1, so which instances are in an answer
shows in SRV (their ports); services registered through the agent API with addresses 127.0.0.x
show it in A.
"""

import uuid

import consul
import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import pytest

from support.dns import dig, dig_short
from support.flotilla import app_definition, flotilla_binary, start_agent, wait_until

NODE = "test-node"
DOMAIN = "flotilla"
NODE_TARGET = f"{NODE}.node.dc1.{DOMAIN}."
SLEEP_CMD = "sleep 600"
ONE_PORT = [{"port": 0}]
# Serves its sandbox: GET /health answers 200 while the file `health` is there, 404 once removed.
HEALTH_FILE_SERVER_CMD = (
    'touch "$MESOS_SANDBOX/health" && '
    'exec python3 -m http.server "$PORT0" --bind 127.0.0.1 --directory "$MESOS_SANDBOX"'
)


def service_name(app_id: str) -> str:
    return app_id.strip("/").replace("/", "-")


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def srv_line(port: int) -> str:
    return f"1 1 {port} {NODE_TARGET}"


@pytest.fixture(scope="module")
def consul_api(agent):
    return consul.Consul(host="127.0.0.1", port=agent.api_port)


@pytest.fixture(scope="module")
def web(agent, client):
    """A Marathon app with two instances and the tags urlprefix-/web and v1: (service name, ports)."""
    app_id = f"/compat/dns-web-{uuid.uuid4().hex[:8]}"
    agent.create_app(
        app_definition(app_id, SLEEP_CMD, instances=2, portDefinitions=ONE_PORT, labels={"SERVICE_TAGS": "urlprefix-/web,v1"})
    )
    ports = sorted(task["ports"][0] for task in agent.wait_for_running(app_id, 2))
    name = service_name(app_id)
    wait_until(
        lambda: dig_short(agent.dns_port, f"{name}.service.{DOMAIN}", "SRV") == sorted(srv_line(port) for port in ports),
        timeout=10,
        what=f"both instances of {name} in DNS",
    )
    yield name, ports
    client.delete_app(app_id, force=True)


def test_service_a_and_srv(agent, web):
    name, ports = web
    answer = dig(agent.dns_port, f"{name}.service.{DOMAIN}", "A")
    assert answer.status == "NOERROR"
    assert "aa" in answer.flags and "qr" in answer.flags
    assert answer.data("A") == ["127.0.0.1"], answer.output
    assert all(record[0] == f"{name}.service.{DOMAIN}." for record in answer.answer)

    assert dig_short(agent.dns_port, f"{name}.service.{DOMAIN}", "SRV") == sorted(srv_line(port) for port in ports)
    srv = dig(agent.dns_port, f"{name}.service.{DOMAIN}", "SRV")
    assert srv.status == "NOERROR"
    assert len(srv.records("answer", "SRV")) == 2, srv.output
    assert srv.records("additional", "A") == [(NODE_TARGET, 0, "A", "127.0.0.1")], srv.output


def test_tag_and_rfc2782_forms(agent, web):
    name, ports = web
    srv_lines = sorted(srv_line(port) for port in ports)
    assert dig_short(agent.dns_port, f"v1.{name}.service.{DOMAIN}", "A") == ["127.0.0.1"]
    assert dig_short(agent.dns_port, f"v1.{name}.service.{DOMAIN}", "SRV") == srv_lines
    assert dig_short(agent.dns_port, f"_{name}._v1.service.{DOMAIN}", "SRV") == srv_lines
    assert dig_short(agent.dns_port, f"_{name}._tcp.service.{DOMAIN}", "SRV") == srv_lines

    rfc2782 = dig(agent.dns_port, f"_{name}._tcp.service.{DOMAIN}", "SRV")
    assert rfc2782.records("additional", "A") == [(NODE_TARGET, 0, "A", "127.0.0.1")], rfc2782.output

    untagged = dig(agent.dns_port, f"no-such-tag.{name}.service.{DOMAIN}", "A")
    assert untagged.answer == [], untagged.output
    assert dig(agent.dns_port, f"_{name}._no-such-tag.service.{DOMAIN}", "SRV").answer == []


def test_datacenter_and_node_forms(agent, web):
    name, ports = web
    assert dig_short(agent.dns_port, f"{name}.service.dc1.{DOMAIN}", "A") == ["127.0.0.1"]
    assert dig_short(agent.dns_port, f"{name}.service.dc1.{DOMAIN}", "SRV") == sorted(srv_line(port) for port in ports)
    assert dig_short(agent.dns_port, f"v1.{name}.service.dc1.{DOMAIN}", "SRV") == sorted(srv_line(port) for port in ports)

    node = dig(agent.dns_port, f"{NODE}.node.{DOMAIN}", "A")
    assert node.status == "NOERROR"
    assert node.records("answer") == [(f"{NODE}.node.{DOMAIN}.", 0, "A", "127.0.0.1")], node.output
    assert dig_short(agent.dns_port, f"{NODE}.node.dc1.{DOMAIN}", "A") == ["127.0.0.1"]


def test_unknown_names_are_nxdomain(agent):
    for name in (
        f"{unique('no-such-service')}.service.{DOMAIN}",
        f"_{unique('no-such-service')}._tcp.service.{DOMAIN}",
        f"no-such-node.node.{DOMAIN}",
        f"no-such-node.node.dc1.{DOMAIN}",
    ):
        for rtype in ("A", "SRV"):
            answer = dig(agent.dns_port, name, rtype)
            assert answer.status == "NXDOMAIN", f"{name} {rtype}:\n{answer.output}"
            assert answer.answer == []
            assert "aa" in answer.flags
            assert answer.records("authority", "SOA"), f"NXDOMAIN should carry the zone's SOA:\n{answer.output}"


def test_a_answers_passing_and_warning_instances(agent, consul_api):
    name = unique("pick")
    for number in (1, 2, 3):
        assert consul_api.agent.service.register(
            name, service_id=f"{name}-{number}", address=f"127.0.0.{10 + number}", port=8000 + number,
            check=consul.Check.ttl("60s"),
        )
    # Consul answers NXDOMAIN for a service with no instance left to answer (checks start critical).
    nothing = dig(agent.dns_port, f"{name}.service.{DOMAIN}", "A")
    assert (nothing.status, nothing.answer) == ("NXDOMAIN", []), f"checks start critical:\n{nothing.output}"
    assert nothing.records("authority", "SOA"), nothing.output

    assert consul_api.agent.check.ttl_pass(f"service:{name}-1")
    assert consul_api.agent.check.ttl_pass(f"service:{name}-2")
    assert dig_short(agent.dns_port, f"{name}.service.{DOMAIN}", "A") == ["127.0.0.11", "127.0.0.12"]
    # Warning instances stay in the answers (Consul's only_passing = false); critical ones leave.
    assert consul_api.agent.check.ttl_warn(f"service:{name}-2")
    assert dig_short(agent.dns_port, f"{name}.service.{DOMAIN}", "A") == ["127.0.0.11", "127.0.0.12"]
    assert consul_api.agent.check.ttl_fail(f"service:{name}-2")
    assert dig_short(agent.dns_port, f"{name}.service.{DOMAIN}", "A") == ["127.0.0.11"]
    srv = dig(agent.dns_port, f"{name}.service.{DOMAIN}", "SRV")
    # A service away from its node's address gets a target of its own, as in Consul.
    assert [record[3] for record in srv.answer] == [f"1 1 8001 7f00000b.addr.dc1.{DOMAIN}."], srv.output
    assert srv.data("A", "additional") == ["127.0.0.11"], "an SRV target's A record is the service's address"


def test_srv_targets_resolve_to_each_instance_address(agent, consul_api):
    """Two instances of one service on one node with different addresses: each SRV answer's
    target must resolve (in ADDITIONAL) to that instance's own address, as Consul's do."""
    name = unique("split")
    expected = {}
    for number in (1, 2):
        service_id = f"{name}-{number}"
        expected[9000 + number] = f"127.0.0.{20 + number}"
        assert consul_api.agent.service.register(
            name, service_id=service_id, address=expected[9000 + number], port=9000 + number, check=consul.Check.ttl("60s")
        )
        assert consul_api.agent.check.ttl_pass(f"service:{service_id}")
    srv = dig(agent.dns_port, f"{name}.service.{DOMAIN}", "SRV")
    additional = {}
    for owner, _, _, address in srv.records("additional", "A"):
        additional.setdefault(owner, set()).add(address)
    resolved = {}
    for record in srv.records("answer", "SRV"):
        _, _, port, target = record[3].split()
        resolved[int(port)] = additional.get(target)
    assert resolved == {port: {address} for port, address in expected.items()}, (
        f"each SRV target should resolve to its instance's address {expected}:\n{srv.output}"
    )


def test_unhealthy_marathon_instances_are_left_out(agent, client, app_ids):
    """Two instances with HTTP health checks on /health; removing an instance's `health` file
    makes its checks fail: first one, then both, leave the answers."""
    app_id = app_ids.new("dns-health")
    name = service_name(app_id)
    health_check = {
        "protocol": "HTTP", "path": "/health", "portIndex": 0, "gracePeriodSeconds": 0, "intervalSeconds": 1,
        "timeoutSeconds": 0.5, "maxConsecutiveFailures": 0,
    }
    agent.create_app(app_definition(app_id, HEALTH_FILE_SERVER_CMD, instances=1, portDefinitions=ONE_PORT, healthChecks=[health_check]))
    agent.wait_for_running(app_id, 1)
    wait_until(
        lambda: not any(app_id in deployment["affectedApps"] for deployment in agent.deployments()),
        timeout=15,
        what=f"the first deployment of {app_id} to finish",
    )
    response = agent.put(f"/v2/apps{app_id}", json={"instances": 2})  # scaled through the Marathon API
    assert response.status_code == 200, response.text
    tasks = agent.wait_for_running(app_id, 2)
    lookup = f"{name}.service.{DOMAIN}"
    wait_until(
        lambda: dig_short(agent.dns_port, lookup, "SRV") == sorted(srv_line(task["ports"][0]) for task in tasks),
        timeout=15,
        what=f"both healthy instances of {name} in SRV",
    )
    assert dig_short(agent.dns_port, lookup, "A") == ["127.0.0.1"]

    sick, well = tasks
    (agent.sandbox(sick["id"]) / "health").unlink()
    wait_until(
        lambda: dig_short(agent.dns_port, lookup, "SRV") == [srv_line(well["ports"][0])],
        timeout=10,
        what=f"only the healthy instance of {name} in SRV",
    )
    assert dig_short(agent.dns_port, lookup, "A") == ["127.0.0.1"], "one instance still passes"

    (agent.sandbox(well["id"]) / "health").unlink()
    wait_until(lambda: dig_short(agent.dns_port, lookup, "SRV") == [], timeout=10, what=f"no instance of {name} in SRV")
    for rtype in ("A", "SRV"):
        answer = dig(agent.dns_port, lookup, rtype)
        assert answer.status == "NXDOMAIN", f"a known service with nothing healthy is NXDOMAIN, as in Consul:\n{answer.output}"
        assert answer.answer == [], answer.output
        assert answer.records("authority", "SOA"), answer.output
    assert len(agent.tasks(app_id)) == 2, "maxConsecutiveFailures 0: the instances stay"


def test_draining_instances_are_left_out(agent, app_ids):
    app_id = app_ids.new("dns-drain")
    name = service_name(app_id)
    lookup = f"{name}.service.{DOMAIN}"
    agent.create_app(app_definition(app_id, SLEEP_CMD, instances=1, portDefinitions=ONE_PORT, drainSeconds=10))
    [task] = agent.wait_for_running(app_id, 1)
    wait_until(lambda: dig_short(agent.dns_port, lookup, "SRV") == [srv_line(task["ports"][0])], timeout=10, what=f"{name} in SRV")

    response = agent.put(f"/v2/apps{app_id}", json={"instances": 0})
    assert response.status_code == 200, response.text

    def draining():
        listed = agent.get("/flotilla/v1/instances", params={"app": app_id}).json()["instances"]
        return listed if listed and all(item.get("draining") for item in listed) else None

    wait_until(draining, timeout=5, what=f"the instance of {app_id} to drain")
    for rtype in ("A", "SRV"):
        answer = dig(agent.dns_port, lookup, rtype)
        assert answer.status == "NXDOMAIN", answer.output
        assert answer.answer == [], f"a draining instance must not be in DNS:\n{answer.output}"
    assert draining(), "the instance should still be draining (drainSeconds 10) when DNS left it out"


def test_ptr_names_the_node_or_service_at_an_address(agent, consul_api):
    answer = dig(agent.dns_port, "1.0.0.127.in-addr.arpa", "PTR")
    assert answer.status == "NOERROR", answer.output
    assert answer.data("PTR") == [f"{NODE}.node.dc1.{DOMAIN}."], answer.output
    name = unique("reverse")
    assert consul_api.agent.service.register(name, service_id=name, address="127.0.0.99", port=80)
    assert dig_short(agent.dns_port, "99.0.0.127.in-addr.arpa", "PTR") == [f"{name}.service.dc1.{DOMAIN}."]
    assert dig(agent.dns_port, "98.0.0.127.in-addr.arpa", "PTR").status == "NXDOMAIN"
    consul_api.agent.service.deregister(name)


def test_tcp(agent, web):
    name, ports = web
    answer = dig(agent.dns_port, f"{name}.service.{DOMAIN}", "SRV", "+tcp")
    assert "(TCP)" in answer.output
    assert answer.status == "NOERROR"
    assert sorted(record[3] for record in answer.answer) == sorted(srv_line(port) for port in ports)
    assert answer.data("A", "additional") == ["127.0.0.1"]
    assert dig_short(agent.dns_port, f"{name}.service.{DOMAIN}", "A", "+tcp") == ["127.0.0.1"]
    assert dig(agent.dns_port, f"{unique('nope')}.service.{DOMAIN}", "A", "+tcp").status == "NXDOMAIN"


def test_large_answers_truncate_over_udp(agent, consul_api):
    name = unique("many")
    addresses = [f"127.0.0.{number}" for number in range(10, 70)]
    for number, address in enumerate(addresses):
        service_id = f"{name}-{number}"
        assert consul_api.agent.service.register(name, service_id=service_id, address=address, port=80, check=consul.Check.ttl("120s"))
        assert consul_api.agent.check.ttl_pass(f"service:{service_id}")
    lookup = f"{name}.service.{DOMAIN}"

    udp = dig(agent.dns_port, lookup, "A", "+noedns", "+ignore")
    assert "tc" in udp.flags, f"60 A records cannot fit in 512 bytes: TC expected\n{udp.output}"
    assert udp.size is not None and udp.size <= 512, f"a UDP answer without EDNS is at most 512 bytes, got {udp.size}"
    assert 0 < len(udp.answer) < len(addresses), udp.output
    assert set(udp.data("A")) <= set(addresses)

    tcp = dig(agent.dns_port, lookup, "A", "+tcp")
    assert "tc" not in tcp.flags
    assert tcp.data("A") == sorted(addresses), tcp.output

    # dig's default (EDNS, retry over TCP when truncated) gets them all too.
    assert sorted(dig_short(agent.dns_port, lookup, "A")) == sorted(addresses)


def test_names_are_case_insensitive(agent, web):
    name, ports = web
    assert dig_short(agent.dns_port, f"{name.upper()}.Service.FLOTILLA", "A") == ["127.0.0.1"]
    assert dig_short(agent.dns_port, f"V1.{name.upper()}.SERVICE.DC1.flotilla", "SRV") == sorted(srv_line(port) for port in ports)
    assert dig_short(agent.dns_port, f"_{name.upper()}._TCP.Service.Flotilla", "SRV") == sorted(srv_line(port) for port in ports)
    assert dig_short(agent.dns_port, f"{NODE.upper()}.NODE.Flotilla", "A") == ["127.0.0.1"]


def test_the_question_keeps_its_case(agent, web):
    """RFC 4343: a server echoes the question as asked. Resolvers that randomise case
    (DNS 0x20, e.g. Unbound's use-caps-for-id) drop answers whose question differs."""
    name, _ = web
    asked = f"{name.upper()}.Service.FlotillA."
    query = dns.message.make_query(asked, "A")
    response = dns.query.udp(query, "127.0.0.1", port=agent.dns_port, timeout=2)
    assert response.question[0].name.to_text() == asked, (
        f"question {asked} answered as {response.question[0].name.to_text()}"
    )


def test_dnspython_over_udp_and_tcp(agent, web):
    name, ports = web
    query = dns.message.make_query(f"{name}.service.{DOMAIN}", "SRV")
    udp = dns.query.udp(query, "127.0.0.1", port=agent.dns_port, timeout=2)
    assert udp.rcode() == dns.rcode.NOERROR
    assert udp.flags & dns.flags.AA and udp.flags & dns.flags.QR
    [answer] = udp.answer
    assert answer.rdtype == dns.rdatatype.SRV
    assert sorted(item.port for item in answer) == ports
    assert {item.target.to_text() for item in answer} == {NODE_TARGET}
    [additional] = udp.additional
    assert additional.name.to_text() == NODE_TARGET
    assert [item.address for item in additional] == ["127.0.0.1"]

    tcp = dns.query.tcp(dns.message.make_query(f"{name}.service.{DOMAIN}", "A"), "127.0.0.1", port=agent.dns_port, timeout=2)
    assert tcp.rcode() == dns.rcode.NOERROR
    [answer] = tcp.answer
    assert [item.address for item in answer] == ["127.0.0.1"]

    missing = dns.query.tcp(dns.message.make_query(f"{unique('nope')}.service.{DOMAIN}", "A"), "127.0.0.1", port=agent.dns_port, timeout=2)
    assert missing.rcode() == dns.rcode.NXDOMAIN


def test_consul_domain_makes_a_drop_in(tmp_path_factory):
    agent = start_agent(flotilla_binary(), tmp_path_factory.mktemp("consul-domain"), extra_args=["--dns-domain", "consul"])
    try:
        name = unique("dropin")
        api = consul.Consul(host="127.0.0.1", port=agent.api_port)
        assert api.agent.service.register(name, service_id=name, address="127.0.0.42", port=80)
        assert dig_short(agent.dns_port, f"{name}.service.consul", "A") == ["127.0.0.42"]
        assert dig(agent.dns_port, f"{name}.service.flotilla", "A").status == "REFUSED"
        api.agent.service.deregister(name)
    finally:
        agent.stop()
        agent.assert_no_leftovers()
