"""One agent with its state in etcd (`--store etcd://…`) instead of SQLite.

- Everything an agent keeps lands under the etcd prefix, nothing in a local state.db; a kill -9
  and restart finds it all again and adopts the running instances.
- An etcd outage (every member frozen) stops nothing: instances keep running, the load balancer
  keeps routing, reads answer; writes answer 503 saying the store is unreachable, and everything
  works again by itself when etcd is back.
- An agent whose etcd does not answer at start exits saying so.
"""

import subprocess
import time

import requests

from support.flotilla import app_definition, free_tcp_port, wait_until

HTTP_SERVER_CMD = "python3 -m http.server $PORT0 --bind 127.0.0.1"


# Tests take `etcd` before `make_agent`: fixtures end in reverse order, so the agents stop while
# etcd still runs.
def etcd_agent(make_agent, etcd, prefix="/flotilla", **options):
    extra = ["--store", etcd.store_url, "--etcd-prefix", prefix, "--server"] + list(options.pop("extra_args", []))
    agent = make_agent(extra_args=extra, **options)
    # Ready (`/ping`) comes before the election: writes need the lead, which takes a moment.
    wait_until(lambda: agent.get("/v2/leader", timeout=5).status_code == 200, timeout=20, what="the agent to lead")
    return agent


def test_state_lives_in_etcd_and_survives_kill9(etcd, make_agent, app_ids):
    agent = etcd_agent(make_agent, etcd, prefix="/it-cluster-a", on_exit="keep")
    app_id = app_ids.new("web")
    agent.create_app(app_definition(app_id, HTTP_SERVER_CMD, instances=2, portDefinitions=[{"port": 0}]))
    tasks = agent.wait_for_running(app_id, 2)
    flat = app_id.lstrip("/").replace("/", "_")
    keys = etcd.keys("/it-cluster-a/")
    assert f"/it-cluster-a/apps/{flat}" in keys, keys
    assert sum(key.startswith("/it-cluster-a/instances/") for key in keys) == 2, keys
    assert not (agent.state_dir / "state.db").exists(), "the agent wrote a local state database beside etcd"
    # A KV write is an etcd key too, and the value is readable with etcdctl (after one tag byte).
    assert agent.put("/v1/kv/config/colour", data="blue").json() is True
    value = etcd.etcdctl("get", "--print-value-only", "/it-cluster-a/kv/config/colour").stdout
    assert value.endswith("blue\n"), value

    agent.kill9()
    agent.restart(on_exit="stop")
    again = agent.wait_for_running(app_id, 2)
    assert sorted(task["id"] for task in again) == sorted(task["id"] for task in tasks)
    assert agent.get("/v1/kv/config/colour?raw").text == "blue"
    # The statuses from before the kill still say running: the adoption is logged a moment later.
    wait_until(lambda: "adopted" in agent.log_text(), timeout=10, what="the agent to adopt its instances")


def test_an_etcd_outage_stops_nothing_and_heals_by_itself(etcd, make_agent, app_ids):
    agent = etcd_agent(make_agent, etcd)
    app_id = app_ids.new("svc")
    route = f"/{app_id.rsplit('/', 1)[-1]}"
    agent.create_app(
        app_definition(
            app_id, HTTP_SERVER_CMD, instances=2, portDefinitions=[{"port": 0}],
            labels={"SERVICE_TAGS": f"urlprefix-{route} strip={route}"},
            healthChecks=[{"protocol": "HTTP", "path": "/", "portIndex": 0, "intervalSeconds": 1, "gracePeriodSeconds": 10}],
        )
    )
    tasks = agent.wait_for_running(app_id, 2)
    wait_until(lambda: requests.get(agent.proxy_url + route + "/", timeout=2).status_code == 200, timeout=20, what="the route")
    wait_until(lambda: not agent.deployments(), timeout=30, what="the first deployment to finish")
    pids = {task["id"]: agent.instance_leaders(app_id).get(task["id"]) for task in tasks}

    etcd.pause()
    try:
        started = time.monotonic()
        answer = agent.put(f"/v2/apps/{app_id}", json={"instances": 3}, timeout=30)
        assert answer.status_code == 503, answer.text
        assert "unreachable" in answer.json()["message"], answer.text
        assert time.monotonic() - started < 20, "a write to an unreachable store should fail within the request timeout"
        # Reads and routing go on from what the agent last saw.
        assert agent.get(f"/v2/apps/{app_id}", timeout=10).status_code == 200
        for _ in range(5):
            assert requests.get(agent.proxy_url + route + "/", timeout=5).status_code == 200
        time.sleep(10)
        assert agent.instance_leaders(app_id) == pids, "an instance was stopped or replaced during the outage"
        for _ in range(5):
            assert requests.get(agent.proxy_url + route + "/", timeout=5).status_code == 200
    finally:
        etcd.resume()

    # Back: the same write succeeds (the client retries, as after any 503), and is carried out.
    def scaled():
        answer = agent.put(f"/v2/apps/{app_id}", json={"instances": 3}, timeout=10)
        return answer.status_code == 200

    wait_until(scaled, timeout=30, what="a write after etcd came back")
    agent.wait_for_running(app_id, 3, timeout=30)
    assert set(pids) <= {task["id"] for task in agent.tasks(app_id)}


def test_an_agent_whose_etcd_does_not_answer_says_so(binary, tmp_path):
    port = free_tcp_port()  # nothing listens there
    result = subprocess.run(
        [str(binary), "agent", "--data-dir", str(tmp_path / "data"), "--api-port", str(free_tcp_port()),
         "--dns-port", str(free_tcp_port()), "--proxy-port", str(free_tcp_port()), "--store", f"etcd://127.0.0.1:{port}"],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode != 0
    assert f"cannot reach etcd at 127.0.0.1:{port}" in result.stderr, result.stderr


def test_store_flags_are_checked(binary, tmp_path):
    for arguments, message in [
        (["--store", "postgres://x"], "--store must be sqlite:PATH or etcd://"),
        (["--store", "etcd://127.0.0.1:99999"], "the port must be a number"),
        (["--etcd-ca", "/x.pem"], "need --store etcd://"),
        (["--store", "etcd://127.0.0.1:2379", "--etcd-cert", "/c.pem"], "needs its key"),
    ]:
        result = subprocess.run(
            [str(binary), "agent", "--data-dir", str(tmp_path / "data"), *arguments], capture_output=True, text=True, timeout=30
        )
        assert result.returncode != 0, arguments
        assert message in result.stderr, (arguments, result.stderr)


def test_etcd_over_tls_with_a_client_certificate(tmp_path_factory, make_agent, app_ids, binary, tmp_path):
    from support.etcd import EtcdCluster

    etcd = EtcdCluster(tmp_path_factory.mktemp("etcd-tls"), tls=True)
    agent = None
    try:
        tls = ["--etcd-ca", etcd.ca_file, "--etcd-cert", etcd.client_cert_file, "--etcd-key", etcd.client_key_file]
        agent = etcd_agent(make_agent, etcd, prefix="/it-tls", extra_args=tls)
        app_id = app_ids.new("tls")
        agent.create_app(app_definition(app_id, HTTP_SERVER_CMD, instances=1, portDefinitions=[{"port": 0}]))
        agent.wait_for_running(app_id, 1)
        assert agent.put("/v1/kv/over/tls", data="yes").json() is True
        value = etcd.etcdctl("get", "--print-value-only", "/it-tls/kv/over/tls").stdout
        assert value.endswith("yes\n"), value

        # Without the client certificate etcd refuses the agent, and it says so at start.
        result = subprocess.run(
            [str(binary), "agent", "--data-dir", str(tmp_path / "nocert"), "--api-port", str(free_tcp_port()),
             "--dns-port", str(free_tcp_port()), "--proxy-port", str(free_tcp_port()), "--store", etcd.store_url,
             "--etcd-ca", etcd.ca_file, "--etcd-prefix", "/it-tls-nocert"],
            capture_output=True, text=True, timeout=60)
        assert result.returncode != 0
        assert "cannot reach etcd" in result.stderr and "--etcd-cert" in result.stderr, result.stderr
    finally:
        if agent is not None:
            agent.stop()
        etcd.stop()
