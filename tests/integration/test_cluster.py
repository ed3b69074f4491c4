"""Several agents on one etcd: one elected scheduler, instances placed over every node.

Each agent is its own host on loopback (127.0.0.2, .3, …), with its own API, DNS and proxy ports
and data directory; they share one etcd. Covered here:
- exactly one leader, named alike by every agent (`/v2/leader`, `/v1/status/leader`);
- a write sent to a follower is forwarded to the leader and applied once;
- `GROUP_BY hostname` spreads instances over the nodes, each runs on its own node;
- the proxy on one node routes to instances on the other;
- `kill -9` of the leader: another server leads and accepts writes within 10 s, and a
  deployment started after it completes.
"""

import time

import requests

from support.flotilla import app_definition, wait_until

# Each instance answers with the node address it runs on.
WHO_CMD = "echo $HOST > index.html && exec python3 -m http.server $PORT0 --bind $HOST"


def cluster(etcd, make_agent, count=2, server=True):
    agents = []
    for number in range(count):
        extra = ["--store", etcd.store_url] + (["--server"] if server else [])
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


def test_one_leader_and_instances_spread_over_the_nodes(etcd, make_agent, app_ids):
    agents = cluster(etcd, make_agent)
    leader = leader_of(agents)
    follower = next(agent for agent in agents if agent is not leader)
    assert follower.get("/v1/status/leader").json() == f"{leader.bind}:8300"
    assert follower.get("/v2/info").json()["elected"] is False
    assert leader.get("/v2/info").json()["elected"] is True

    # Both nodes registered, each with its address.
    def both_nodes():
        nodes = follower.get("/v1/catalog/nodes").json()
        return nodes if {node["Node"] for node in nodes} == {"node-2", "node-3"} else None

    nodes = wait_until(both_nodes, timeout=20, what="both nodes in the catalog")
    assert {node["Node"]: node["Address"] for node in nodes} == {"node-2": "127.0.0.2", "node-3": "127.0.0.3"}

    app_id = app_ids.new("who")
    route = f"/{app_id.rsplit('/', 1)[-1]}"
    definition = app_definition(
        app_id, WHO_CMD, instances=4, portDefinitions=[{"port": 0}], constraints=[["hostname", "GROUP_BY"]],
        labels={"SERVICE_TAGS": f"urlprefix-{route} strip={route}"},
    )
    # Sent to the follower: forwarded to the leader, created once.
    answer = follower.post("/v2/apps", json=definition)
    assert answer.status_code == 201, answer.text
    assert len(leader.get("/v2/apps").json()["apps"]) == 1

    def spread():
        tasks = follower.tasks(app_id)
        running = [task for task in tasks if task["state"] == "TASK_RUNNING"]
        return running if len(running) == 4 else None

    tasks = wait_until(spread, timeout=30, what="4 running instances")
    by_host = {}
    for task in tasks:
        by_host.setdefault(task["host"], []).append(task["id"])
    assert {host: len(ids) for host, ids in by_host.items()} == {"127.0.0.2": 2, "127.0.0.3": 2}
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
            return seen if seen == {"127.0.0.2", "127.0.0.3"} else None

        wait_until(seen_both, timeout=20, what=f"the proxy on {agent.bind} reaching both nodes")

    result = follower.cli("nodes", "--json")
    assert result.returncode == 0, result.stderr
    # The table marks the leader's node.
    table = follower.cli("nodes")
    assert table.returncode == 0, table.stderr
    marked = [line.split()[0] for line in table.stdout.splitlines()[1:] if " * " in f" {line} "]
    assert marked == [leader.node_name], table.stdout


def test_killing_the_leader_elects_another_that_takes_writes(etcd, make_agent, app_ids):
    agents = cluster(etcd, make_agent)
    leader = leader_of(agents)
    survivor = next(agent for agent in agents if agent is not leader)
    app_id = app_ids.new("failover")
    survivor.create_app(app_definition(app_id, WHO_CMD, instances=2, portDefinitions=[{"port": 0}]))
    wait_until(lambda: len([t for t in survivor.tasks(app_id) if t["state"] == "TASK_RUNNING"]) == 2, timeout=30, what="2 instances")
    wait_until(lambda: not survivor.deployments(), timeout=30, what="the first deployment to finish")

    leader.kill9()
    started = time.monotonic()
    assert leader_of([survivor]) is survivor
    elected = time.monotonic() - started
    assert elected < 10, f"a new leader took {elected:.1f} s"

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
