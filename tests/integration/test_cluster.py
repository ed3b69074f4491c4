"""Several agents on one etcd: one elected scheduler, instances placed over every node.

Each agent is its own host on loopback (127.0.0.2, .3, …), with its own API, DNS and proxy ports
and data directory; they share one etcd. Covered here:
- exactly one leader, named alike by every agent (`/v2/leader`, `/v1/status/leader`);
- a write sent to a follower is forwarded to the leader and applied once;
- `GROUP_BY hostname` spreads instances over the nodes, each runs on its own node;
- the proxy on one node routes to instances on the other;
- an instance's logs and Marathon's event stream answer on any agent (relayed from the node that
  runs the instance, and from the leader);
- `kill -9` of the leader while a deployment is under way: another server leads within 10 s,
  resumes the deployment from the store and completes it, and accepts writes;
- an agent cut off (SIGSTOP): its node is down, its instances TASK_UNREACHABLE, replaced after the
  app's inactiveAfterSeconds; back again, it stops what was replaced and nothing is doubled;
- every etcd member down for 10 s: no instance stops, each proxy still routes, writes answer 503,
  and everything recovers by itself;
- three agents (two servers, one that only runs instances) spread by `GROUP_BY hostname`;
- secrets and tokens with the state on etcd: one key file for every agent, a secret written
  through one agent read through the other (hvac), a token made on one used and revoked on the
  other, an instance on either node given its secret; no secret value or token in etcd.
"""

import json
import os
import signal
import subprocess
import time
import uuid

import hvac
import pytest
import requests
from hvac.exceptions import Forbidden

from support.flotilla import app_definition, wait_until

# Each instance answers with the node address it runs on.
WHO_CMD = "echo $HOST > index.html && exec python3 -m http.server $PORT0 --bind $HOST"


def cluster(etcd, make_agent, count=2, servers=None):
    """`count` agents on 127.0.0.2, .3, …; the first `servers` of them (all by default) are scheduler candidates."""
    servers = count if servers is None else servers
    agents = []
    for number in range(count):
        extra = ["--store", etcd.store_url] + (["--server"] if number < servers else [])
        agents.append(make_agent(bind=f"127.0.0.{number + 2}", node_name=f"node-{number + 2}", extra_args=extra))
    return agents


def leader_of(agents):
    """The one agent every agent names as leader (waits for the election to settle)."""

    def agreed():
        names = set()
        for agent in agents:
            answer = agent.get("/v2/leader", timeout=5)
            if answer.status_code != 200:
                return None
            names.add(answer.json()["leader"])
        if len(names) != 1:
            return None
        (address,) = names
        return next((agent for agent in agents if f"{agent.bind}:{agent.api_port}" == address), None)

    return wait_until(agreed, timeout=20, what="one leader named by every agent")


def running(agent, app_id):
    return [task for task in agent.tasks(app_id) if task["state"] == "TASK_RUNNING"]


def test_one_leader_and_instances_spread_over_the_nodes(etcd, make_agent, app_ids):
    # Two scheduler candidates and a third agent that only runs instances.
    agents = cluster(etcd, make_agent, count=3, servers=2)
    leader = leader_of(agents)
    assert leader in agents[:2], "an agent started without --server must never lead"
    follower = next(agent for agent in agents[:2] if agent is not leader)
    assert follower.get("/v1/status/leader").json() == f"{leader.bind}:8300"
    assert follower.get("/v2/info").json()["elected"] is False
    assert leader.get("/v2/info").json()["elected"] is True

    # Every node registered, each with its address.
    def every_node():
        nodes = follower.get("/v1/catalog/nodes").json()
        return nodes if {node["Node"] for node in nodes} == {"node-2", "node-3", "node-4"} else None

    nodes = wait_until(every_node, timeout=20, what="every node in the catalog")
    assert {node["Node"]: node["Address"] for node in nodes} == {"node-2": "127.0.0.2", "node-3": "127.0.0.3", "node-4": "127.0.0.4"}

    app_id = app_ids.new("who")
    route = f"/{app_id.rsplit('/', 1)[-1]}"
    definition = app_definition(
        app_id, WHO_CMD, instances=6, portDefinitions=[{"port": 0}], constraints=[["hostname", "GROUP_BY"]],
        labels={"SERVICE_TAGS": f"urlprefix-{route} strip={route}"},
    )
    # Sent to the follower: forwarded to the leader, created once.
    answer = follower.post("/v2/apps", json=definition)
    assert answer.status_code == 201, answer.text
    assert len(leader.get("/v2/apps").json()["apps"]) == 1

    def spread():
        tasks = follower.tasks(app_id)
        running = [task for task in tasks if task["state"] == "TASK_RUNNING"]
        return running if len(running) == 6 else None

    tasks = wait_until(spread, timeout=45, what="6 running instances")
    by_host = {}
    for task in tasks:
        by_host.setdefault(task["host"], []).append(task["id"])
    assert {host: len(ids) for host, ids in by_host.items()} == {"127.0.0.2": 2, "127.0.0.3": 2, "127.0.0.4": 2}
    # Each instance runs on the node it was placed on, started by that node's agent.
    for agent in agents:
        assert set(agent.instance_leaders(app_id)) == set(by_host[agent.bind])

    # The proxy on each node reaches the instances on both.
    for agent in agents:
        def seen_both():
            seen = set()
            for _ in range(12):
                answer = requests.get(agent.proxy_url + route + "/", timeout=5)
                if answer.status_code == 200:
                    seen.add(answer.text.strip())
            return seen if seen == {"127.0.0.2", "127.0.0.3", "127.0.0.4"} else None

        wait_until(seen_both, timeout=20, what=f"the proxy on {agent.bind} reaching every node")

    # Logs of an instance on another node, asked of this one: relayed from the node that runs it
    # (python's server logs each request to stderr; the proxy checks above made some).
    (remote,) = by_host["127.0.0.4"][:1]
    def remote_log():
        answer = follower.get(f"/flotilla/v1/logs/{remote}?stream=stderr&lines=50")
        assert answer.status_code == 200, answer.text
        return answer.text if '"GET / HTTP/1.1" 200' in answer.text else None

    wait_until(remote_log, timeout=20, what=f"the log of {remote} (on node-4) through {follower.node_name}")
    printed = follower.cli("logs", remote, "--stderr", "--lines", "5")
    assert printed.returncode == 0 and "GET /" in printed.stdout, printed.stdout + printed.stderr

    result = follower.cli("nodes", "--json")
    assert result.returncode == 0, result.stderr
    listed = {node["name"]: node for node in json.loads(result.stdout)}
    assert set(listed) == {"node-2", "node-3", "node-4"}
    assert all(node["status"] == "ready" and node["instances"] == 2 for node in listed.values()), listed
    assert [name for name, node in listed.items() if node["leader"]] == [leader.node_name]
    # The table marks the leader's node.
    table = follower.cli("nodes")
    assert table.returncode == 0, table.stderr
    marked = [line.split()[0] for line in table.stdout.splitlines()[1:] if " * " in f" {line} "]
    assert marked == [leader.node_name], table.stdout

    # Marathon's event stream on a follower is the leader's: a change shows up in it.
    with requests.get(follower.url + "/v2/events?event_type=deployment_info", stream=True, timeout=30,
                      headers={"Accept": "text/event-stream"}) as events:
        assert events.status_code == 200, events.text
        assert leader.put(f"/v2/apps/{app_id}", json={"instances": 7}).status_code == 200
        seen = []
        for line in events.iter_lines(decode_unicode=True):
            seen.append(line)
            if line.startswith("data:") and app_id in line:
                break
            assert len(seen) < 200, seen
        assert any(line == "event: deployment_info" for line in seen), seen


def test_killing_the_leader_elects_another_that_takes_writes(etcd, make_agent, app_ids):
    agents = cluster(etcd, make_agent)
    leader = leader_of(agents)
    survivor = next(agent for agent in agents if agent is not leader)
    app_id = app_ids.new("failover")
    survivor.create_app(app_definition(app_id, WHO_CMD, instances=2, portDefinitions=[{"port": 0}]))
    wait_until(lambda: len([t for t in survivor.tasks(app_id) if t["state"] == "TASK_RUNNING"]) == 2, timeout=30, what="2 instances")
    wait_until(lambda: not survivor.deployments(), timeout=30, what="the first deployment to finish")

    # A deployment under way (its new instances take a few seconds to start) when the leader dies.
    answer = survivor.put(f"/v2/apps/{app_id}", json={"cmd": "sleep 3 && " + WHO_CMD})
    assert answer.status_code == 200, answer.text
    underway = answer.json()["deploymentId"]
    leader.kill9()
    started = time.monotonic()
    assert leader_of([survivor]) is survivor
    elected = time.monotonic() - started
    assert elected < 10, f"a new leader took {elected:.1f} s"
    # The new leader resumes it from the store and completes it (the dead node's instances are
    # replaced once its lease ends).
    wait_until(lambda: all(d["id"] != underway for d in survivor.deployments()), timeout=60, what="the deployment under way to complete")
    result = survivor.get(f"/flotilla/v1/deployments/{underway}").json()
    assert result["status"] == "succeeded", result
    tasks = running(survivor, app_id)
    assert len(tasks) == 2 and {task["host"] for task in tasks} == {survivor.bind}, tasks

    answer = survivor.put(f"/v2/apps/{app_id}", json={"instances": 3})
    assert answer.status_code == 200, answer.text
    deployment = answer.json()["deploymentId"]

    # The dead node's lease ends (10 s); its instances are lost and replaced on the survivor, and
    # the deployment completes there.
    def all_on_survivor():
        tasks = [task for task in survivor.tasks(app_id) if task["state"] == "TASK_RUNNING"]
        return tasks if len(tasks) == 3 and {task["host"] for task in tasks} == {survivor.bind} else None

    tasks = wait_until(all_on_survivor, timeout=45, what="3 instances running on the surviving node")
    wait_until(lambda: all(d["id"] != deployment for d in survivor.deployments()), timeout=30, what="the deployment to complete")
    assert set(survivor.instance_leaders(app_id)) == {task["id"] for task in tasks}

    # The dead node comes back: it stops the instances that were replaced meanwhile; none doubles.
    orphans = leader.instance_leaders(app_id)
    leader.restart()
    wait_until(lambda: not leader.instance_leaders(app_id), timeout=30, what=f"the returning node to stop its replaced instances {orphans}")
    assert len([task for task in survivor.tasks(app_id) if task["state"] == "TASK_RUNNING"]) == 3


def test_one_etcd_member_lost_disrupts_nothing(tmp_path_factory, make_agent, app_ids):
    from support.etcd import EtcdCluster

    etcd = EtcdCluster(tmp_path_factory.mktemp("etcd3"), members=3)
    agents = []
    try:
        agents += cluster(etcd, make_agent)
        leader = leader_of(agents)
        follower = next(agent for agent in agents if agent is not leader)
        app_id = app_ids.new("quorum")
        follower.create_app(app_definition(app_id, WHO_CMD, instances=2, portDefinitions=[{"port": 0}]))
        wait_until(lambda: len([t for t in follower.tasks(app_id) if t["state"] == "TASK_RUNNING"]) == 2, timeout=30, what="2 instances")
        wait_until(lambda: not follower.deployments(), timeout=30, what="the first deployment to finish")

        # The first member (the one every agent lists first) goes away for good.
        etcd.members[0].process.kill()
        etcd.members[0].process.wait()
        # If the member was etcd's raft leader, etcd elects another (a second or few); a write in
        # that window may answer 503 and is retried, as a client retries any 503.
        started = time.monotonic()

        def scaled():
            answer = follower.put(f"/v2/apps/{app_id}", json={"instances": 3}, timeout=30)
            assert answer.status_code in (200, 503), answer.text
            return answer.status_code == 200

        wait_until(scaled, timeout=30, what="the write after losing a member")
        assert time.monotonic() - started < 20
        wait_until(lambda: len([t for t in follower.tasks(app_id) if t["state"] == "TASK_RUNNING"]) == 3, timeout=30, what="3 instances")
        assert follower.put("/v1/kv/quorum/check", data="ok").json() is True
        assert leader.get("/v1/kv/quorum/check?raw").text == "ok"
        # Nobody lost the lead over it.
        assert leader_of(agents) is leader
    finally:
        # The agents stop (and record their last statuses) while etcd still runs.
        for agent in agents:
            agent.stop()
        etcd.stop()


def test_an_agent_cut_off_is_replaced_and_on_return_nothing_doubles(etcd, make_agent, app_ids):
    agents = cluster(etcd, make_agent)
    leader = leader_of(agents)
    cut = next(agent for agent in agents if agent is not leader)
    app_id = app_ids.new("cutoff")
    leader.create_app(
        app_definition(
            app_id, WHO_CMD, instances=2, portDefinitions=[{"port": 0}], constraints=[["hostname", "GROUP_BY"]],
            unreachableStrategy={"inactiveAfterSeconds": 3, "expungeAfterSeconds": 600},
        )
    )
    wait_until(lambda: len(running(leader, app_id)) == 2, timeout=30, what="2 instances")
    wait_until(lambda: not leader.deployments(), timeout=30, what="the first deployment to finish")
    (stranded,) = [task["id"] for task in running(leader, app_id) if task["host"] == cut.bind]
    assert list(cut.instance_leaders(app_id)) == [stranded]

    # The agent freezes (as on a hung machine or a cut link): no heartbeat, no status; its
    # instance's process goes on running.
    os.kill(cut.process.pid, signal.SIGSTOP)
    try:
        def node_down():
            nodes = {node["name"]: node for node in leader.get("/flotilla/v1/nodes").json()}
            return nodes if nodes.get(cut.node_name, {}).get("status") == "down" else None

        wait_until(node_down, timeout=25, what=f"{cut.node_name} shown down")
        members = {member["Name"]: member["Status"] for member in leader.get("/v1/agent/members").json()}
        assert members == {leader.node_name: 1, cut.node_name: 4}, members
        serf = [check for check in leader.get(f"/v1/health/node/{cut.node_name}").json() if check["CheckID"] == "serfHealth"]
        assert serf and serf[0]["Status"] == "critical", serf

        def unreachable():
            states = {task["id"]: task["state"] for task in leader.tasks(app_id)}
            return states if states.get(stranded) == "TASK_UNREACHABLE" else None

        wait_until(unreachable, timeout=15, what=f"{stranded} shown TASK_UNREACHABLE")
        # After inactiveAfterSeconds it is replaced on the node that is up; still listed until expunged.
        def replaced():
            tasks = running(leader, app_id)
            return tasks if len(tasks) == 2 and all(task["host"] == leader.bind for task in tasks) else None

        wait_until(replaced, timeout=20, what="the unreachable instance replaced on the node that is up")
        assert {task["id"]: task["state"] for task in leader.tasks(app_id)}[stranded] == "TASK_UNREACHABLE"
        assert list(cut.instance_leaders(app_id)) == [stranded], "the cut-off node's process should still run"
    finally:
        os.kill(cut.process.pid, signal.SIGCONT)

    # Back: the node is ready again and stops the instance that was replaced; two run, not three.
    wait_until(lambda: not cut.instance_leaders(app_id), timeout=30, what="the returning node to stop its replaced instance")
    def settled():
        tasks = leader.tasks(app_id)
        return tasks if len(tasks) == 2 and all(task["state"] == "TASK_RUNNING" for task in tasks) else None

    tasks = wait_until(settled, timeout=30, what="exactly the 2 replacements left")
    assert stranded not in {task["id"] for task in tasks}
    nodes = {node["name"]: node["status"] for node in leader.get("/flotilla/v1/nodes").json()}
    assert nodes == {leader.node_name: "ready", cut.node_name: "ready"}, nodes
    assert leader_of(agents) is leader


def test_all_of_etcd_down_stops_nothing_and_the_cluster_recovers(etcd, make_agent, app_ids):
    agents = cluster(etcd, make_agent)
    leader = leader_of(agents)
    app_id = app_ids.new("outage")
    route = f"/{app_id.rsplit('/', 1)[-1]}"
    leader.create_app(
        app_definition(
            app_id, WHO_CMD, instances=2, portDefinitions=[{"port": 0}], constraints=[["hostname", "GROUP_BY"]],
            labels={"SERVICE_TAGS": f"urlprefix-{route} strip={route}"},
        )
    )
    wait_until(lambda: len(running(leader, app_id)) == 2, timeout=30, what="2 instances")
    wait_until(lambda: not leader.deployments(), timeout=30, what="the first deployment to finish")
    before = {agent.bind: agent.instance_leaders(app_id) for agent in agents}
    assert all(len(pids) == 1 for pids in before.values()), before

    def routes_to_both(agent, strict=True):
        seen = set()
        for _ in range(12):
            answer = requests.get(agent.proxy_url + route + "/", timeout=5)
            if strict:
                assert answer.status_code == 200, answer.text
            elif answer.status_code != 200:
                return False  # still starting: a server that is running but not yet listening
            seen.add(answer.text.strip())
        return seen == {agent.bind for agent in agents}

    for agent in agents:
        wait_until(lambda: routes_to_both(agent, strict=False), timeout=20, what=f"the proxy on {agent.bind} reaching both nodes")

    etcd.pause()
    try:
        started = time.monotonic()
        for agent in agents:
            answer = agent.put(f"/v2/apps/{app_id}", json={"instances": 3}, timeout=30)
            assert answer.status_code == 503, answer.text
            assert "unreachable" in answer.text or "no leader" in answer.text, answer.text
        while time.monotonic() - started < 10:
            for agent in agents:
                assert routes_to_both(agent), f"the proxy on {agent.bind} lost a node during the outage"
            time.sleep(1)
        assert {agent.bind: agent.instance_leaders(app_id) for agent in agents} == before, "an instance stopped during the outage"
    finally:
        etcd.resume()

    # Back: a leader again (the old lead lapsed in the outage), the write goes through, and the
    # instances that ran through the outage are still the same ones. A write the outage left
    # unconfirmed may have reached etcd before it froze and be applied now, as the 503 said.
    leader = leader_of(agents)

    def scaled():
        if leader.get(f"/v2/apps/{app_id}").json()["app"]["instances"] == 3:
            return True
        answer = leader.put(f"/v2/apps/{app_id}?force=true", json={"instances": 3}, timeout=10)
        assert answer.status_code in (200, 503), answer.text
        return answer.status_code == 200

    wait_until(scaled, timeout=30, what="a write after etcd came back")
    wait_until(lambda: len(running(leader, app_id)) == 3, timeout=30, what="3 instances")
    # Past a node lease and the new leader's grace: no node was judged lost.
    time.sleep(14)
    for agent in agents:
        assert set(before[agent.bind]) <= set(agent.instance_leaders(app_id)), f"an instance on {agent.bind} was replaced after the outage"
    assert len(running(leader, app_id)) == 3


def test_secrets_and_tokens_are_shared_by_the_cluster_and_sealed_in_etcd(etcd, make_agent, binary, tmp_path, app_ids):
    key = tmp_path / "secrets.key"
    key.write_text(subprocess.run([str(binary), "secrets", "keygen"], capture_output=True, text=True, check=True).stdout)
    key.chmod(0o600)
    agents = []
    for number in (2, 3):
        extra = ["--store", etcd.store_url, "--server", "--secrets-key-file", str(key), "--acl", "default-deny"]
        agents.append(make_agent(bind=f"127.0.0.{number}", node_name=f"node-{number}", extra_args=extra))
    # Bootstrapping (once per store) needs no leader; finding the leader needs a token.
    root = requests.put(f"{agents[1].url}/v1/acl/bootstrap", timeout=10).json()["SecretID"]
    assert requests.put(f"{agents[0].url}/v1/acl/bootstrap", timeout=10).status_code == 403, "bootstrapped twice"
    assert requests.get(f"{agents[0].url}/v2/leader", timeout=10).status_code in (401, 403)

    def named_leader():
        named = {requests.get(f"{agent.url}/v2/leader", headers={"X-Vault-Token": root}, timeout=5).json().get("leader") for agent in agents}
        address = named.pop() if len(named) == 1 else None
        return next((agent for agent in agents if f"{agent.bind}:{agent.api_port}" == address), None)

    leader = wait_until(named_leader, timeout=20, what="one leader named by every agent")
    other = next(agent for agent in agents if agent is not leader)
    planted = f"planted-{uuid.uuid4().hex}"
    by_leader = hvac.Client(url=leader.url, token=root)
    by_other = hvac.Client(url=other.url, token=root)
    by_leader.secrets.kv.v2.create_or_update_secret(path="shop/db", secret={"password": planted})
    assert by_other.secrets.kv.v2.read_secret_version(path="shop/db", raise_on_deleted_version=True)["data"]["data"] == {"password": planted}
    assert by_other.secrets.kv.v2.list_secrets(path="shop")["data"]["keys"] == ["db"]

    by_other.sys.create_or_update_policy("shop-read", 'path "secret/data/shop/*" { capabilities = ["read"] }')
    reader = by_other.auth.token.create(policies=["shop-read"], ttl="1h")["auth"]["client_token"]
    reading = hvac.Client(url=leader.url, token=reader)
    assert reading.secrets.kv.v2.read_secret_version(path="shop/db", raise_on_deleted_version=True)["data"]["data"]["password"] == planted
    with pytest.raises(Forbidden):
        reading.secrets.kv.v2.create_or_update_secret(path="shop/db", secret={"password": "x"})
    by_other.auth.token.revoke(reader)

    def refused():
        try:
            reading.secrets.kv.v2.read_secret_version(path="shop/db", raise_on_deleted_version=True)
            return False
        except Forbidden:
            return True

    # Caches on the other agent live up to 1 s.
    wait_until(refused, timeout=10, what="the revoked token refused by the other agent")

    # An instance on each node gets the secret, resolved on its node.
    app_id = app_ids.new("sealed")
    created = requests.post(f"{other.url}/v2/apps", headers={"X-Vault-Token": root}, timeout=20, json=app_definition(
        app_id, "echo got-$DB_PASSWORD-on-$HOST > secret.txt && exec sleep 300", instances=2,
        env={"DB_PASSWORD": {"secret": "db"}}, secrets={"db": {"source": "shop/db@password"}},
        constraints=[["hostname", "UNIQUE"]]))
    assert created.status_code == 201, created.text

    def placed():
        answer = requests.get(f"{leader.url}/v2/apps{app_id}/tasks", headers={"X-Vault-Token": root}, timeout=10).json()
        tasks = [task for task in answer.get("tasks", []) if task["state"] == "TASK_RUNNING"]
        return tasks if len(tasks) == 2 else None

    for task in wait_until(placed, timeout=30, what="an instance on each node"):
        agent = next(agent for agent in agents if agent.bind == task["host"])
        written = agent.sandbox(task["id"]) / "secret.txt"
        wait_until(written.exists, timeout=10, what=f"{written}")
        assert written.read_text().strip() == f"got-{planted}-on-{task['host']}"

    dump = etcd.etcdctl("get", "--prefix", "")
    assert dump.returncode == 0, dump.stderr
    assert dump.stdout and planted not in dump.stdout and root not in dump.stdout and reader not in dump.stdout
    requests.delete(f"{leader.url}/v2/apps{app_id}?force=true", headers={"X-Vault-Token": root}, timeout=20)

    # The key rotated in etcd from outside the agents; one restarted with the new key reads on.
    new_key = tmp_path / "new.key"
    new_key.write_text(subprocess.run([str(binary), "secrets", "keygen"], capture_output=True, text=True, check=True).stdout)
    new_key.chmod(0o600)
    rotated = subprocess.run([str(binary), "secrets", "rotate-key", "--store", etcd.store_url, "--old-key-file", str(key),
                              "--new-key-file", str(new_key), "--json"], capture_output=True, text=True, timeout=60)
    assert rotated.returncode == 0 and json.loads(rotated.stdout) == {"rotated": True}, rotated.stdout + rotated.stderr
    other.stop()
    key.write_text(new_key.read_text())
    other.restart()
    again = hvac.Client(url=other.url, token=root)
    assert again.secrets.kv.v2.read_secret_version(path="shop/db", raise_on_deleted_version=True)["data"]["data"] == {"password": planted}
