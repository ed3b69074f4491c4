"""Marathon groups through the unmodified `marathon` client: create, list, get, scale, update,
roll back and delete, with `dependencies` ordering the deployment.

The client cannot serialise a group with apps on Python 3.10+ (its encoder uses
`collections.Iterable`), so groups with apps are sent as JSON; everything else goes through it."""

import time
import uuid

import pytest
from marathon import MarathonApp
from marathon.exceptions import ConflictError, MarathonHttpError, NotFoundError
from marathon.models.group import MarathonGroup

from support.flotilla import wait_until
from test_marathon import SLEEP_CMD, TASK_RESOURCES, wait_for_running_tasks

# Serves HTTP on $PORT0 only after a few seconds: what its dependents must wait for.
SLOW_SERVER_CMD = 'sleep 3; exec python3 -m http.server "$PORT0" --bind 127.0.0.1'
HEALTH = {"protocol": "HTTP", "path": "/", "portIndex": 0, "gracePeriodSeconds": 30, "intervalSeconds": 1,
          "timeoutSeconds": 1, "maxConsecutiveFailures": 0}


@pytest.fixture
def group_id(client):
    group = f"/groups-{uuid.uuid4().hex[:8]}"
    yield group
    try:
        client.delete_group(group, force=True)
    except NotFoundError:
        pass


def app(app_id, **fields):
    return {"id": app_id, "cmd": SLEEP_CMD, **TASK_RESOURCES, **fields}


def test_create_list_get_scale_and_delete_a_group(client, agent, group_id):
    reply = agent.post("/v2/groups", json={"id": group_id, "apps": [app("web", instances=1)]})
    assert reply.status_code == 201, reply.text
    assert reply.headers["Location"] == group_id
    result = reply.json()
    assert result["deploymentId"] and result["version"]
    wait_for_running_tasks(client, f"{group_id}/web", 1)

    listed = {group.id: group for group in client.list_groups()}
    assert group_id in listed, "list_groups reads the root's subgroups"
    group = client.get_group(group_id)
    assert isinstance(group, MarathonGroup) and [a.id for a in group.apps] == [f"{group_id}/web"]

    with pytest.raises(ConflictError):
        client.create_group(MarathonGroup(id=group_id))
    empty = client.create_group(MarathonGroup(id=f"{group_id}-empty"))
    assert empty["version"]
    assert client.get_group(f"{group_id}-empty").apps == []
    client.delete_group(f"{group_id}-empty")

    client.scale_group(group_id, 3)
    wait_for_running_tasks(client, f"{group_id}/web", 3)

    deleted = client.delete_group(group_id)
    assert deleted["deploymentId"]
    wait_until(lambda: not [t for t in client.list_tasks() if t.app_id == f"{group_id}/web"], timeout=20, what="the group's tasks to stop")
    with pytest.raises(NotFoundError):
        client.get_group(group_id)


def test_nested_groups_relative_ids_and_embed(client, agent, group_id):
    body = {"id": group_id, "groups": [{"id": "backend", "apps": [app("db", instances=0)]}], "apps": [app("front", instances=0)]}
    reply = agent.post("/v2/groups", json=body)
    assert reply.status_code == 201, reply.text
    assert client.get_app(f"{group_id}/backend/db").instances == 0, "relative ids resolve against their group"
    tree = agent.get(f"/v2/groups{group_id}").json()
    assert [g["id"] for g in tree["groups"]] == [f"{group_id}/backend"]
    assert [a["id"] for a in tree["groups"][0]["apps"]] == [f"{group_id}/backend/db"]
    only_groups = agent.get(f"/v2/groups{group_id}", params={"embed": "group.groups"}).json()
    assert only_groups["apps"] == [] and only_groups["groups"], "any embed replaces the default set"
    counted = agent.get(f"/v2/groups{group_id}", params={"embed": ["group.apps", "group.apps.counts"]}).json()
    assert counted["apps"][0]["tasksRunning"] == 0

    # A structural update replaces the levels it names: leaving out `backend` removes it.
    reply = agent.put(f"/v2/groups{group_id}", json={"id": group_id, "groups": [], "apps": [app("front", instances=0)]})
    assert reply.status_code == 200, reply.text
    with pytest.raises(NotFoundError):
        client.get_app(f"{group_id}/backend/db")
    # An app outside the group it is listed in is refused.
    reply = agent.put(f"/v2/groups{group_id}", json={"apps": [app("/elsewhere/x")]})
    assert reply.status_code == 422 and "not child" in reply.text


def test_dependencies_order_the_deployment(client, agent, group_id):
    body = {"id": group_id, "apps": [
        app("db", cmd=SLOW_SERVER_CMD, portDefinitions=[{"port": 0}], healthChecks=[HEALTH]),
        app("web", dependencies=["db"]),
    ]}
    reply = agent.put(f"/v2/groups{group_id}", params={"dryRun": "true"}, json=body)
    assert reply.status_code == 200, reply.text
    steps = [[action["action"] + " " + action["app"] for action in step["actions"]] for step in reply.json()["steps"]]
    assert steps == [
        sorted([f"StartApplication {group_id}/db", f"StartApplication {group_id}/web"]),
        [f"ScaleApplication {group_id}/db"],
        [f"ScaleApplication {group_id}/web"],
    ] or steps == [
        [f"StartApplication {group_id}/db", f"StartApplication {group_id}/web"],
        [f"ScaleApplication {group_id}/db"],
        [f"ScaleApplication {group_id}/web"],
    ], steps

    reply = agent.post("/v2/groups", json=body)
    assert reply.status_code == 201, reply.text
    wait_until(lambda: client.get_app(f"{group_id}/db").tasks_running == 1, timeout=10, what="db to run")
    time.sleep(1)
    assert client.get_app(f"{group_id}/db").tasks_healthy == 0, "db is still starting"
    assert client.list_tasks(f"{group_id}/web") == [], "web waits for db to be healthy"
    wait_until(lambda: client.get_app(f"{group_id}/db").tasks_healthy == 1, timeout=20, what="db healthy")
    wait_for_running_tasks(client, f"{group_id}/web", 1)

    cyclic = {"id": group_id, "apps": [app("a", dependencies=["b"]), app("b", dependencies=["a"])]}
    reply = agent.put(f"/v2/groups{group_id}", json=cyclic)
    assert reply.status_code == 422 and "cyclic" in reply.text


def test_group_versions_and_rollback(client, agent, group_id):
    reply = agent.post("/v2/groups", json={"id": group_id, "apps": [app("one", instances=1)]})
    assert reply.status_code == 201, reply.text
    first = reply.json()
    wait_for_running_tasks(client, f"{group_id}/one", 1)
    wait_until(lambda: client.list_deployments() == [] or all(f"{group_id}/one" not in d.affected_apps for d in client.list_deployments()),
               timeout=20, what="the first deployment")
    reply = agent.put(f"/v2/groups{group_id}", json={"apps": [app("two", instances=1)]})
    assert reply.status_code == 200, reply.text
    wait_for_running_tasks(client, f"{group_id}/two", 1)
    with pytest.raises(NotFoundError):
        client.get_app(f"{group_id}/one")
    versions = agent.get(f"/v2/groups{group_id}/versions").json()
    assert first["version"] in versions and len(versions) == 2
    old = agent.get(f"/v2/groups{group_id}/versions/{first['version']}").json()
    assert [a["id"] for a in old["apps"]] == [f"{group_id}/one"]

    client.rollback_group(group_id, first["version"], force=True)
    wait_for_running_tasks(client, f"{group_id}/one", 1)
    with pytest.raises(NotFoundError):
        client.get_app(f"{group_id}/two")
    reply = agent.put(f"/v2/groups{group_id}", json={"version": "2001-01-01T00:00:00.000Z"})
    assert reply.status_code == 422
    reply = agent.put(f"/v2/groups{group_id}", json={"scaleBy": 2, "id": group_id})
    assert reply.status_code == 422 and "not allowed in conjunction" in reply.text


def test_cancelling_a_group_deployment_reverts_every_app_in_one_deployment(client, agent, group_id):
    reply = agent.post("/v2/groups", json={"id": group_id, "apps": [app("a", instances=0), app("b", instances=0)]})
    assert reply.status_code == 201, reply.text
    wait_until(lambda: not [d for d in agent.deployments() if f"{group_id}/a" in d["affectedApps"]], timeout=20, what="the first deployment")
    # A change that cannot finish (the instances are never ready: their checks never pass) ...
    never = {"protocol": "COMMAND", "command": {"value": "false"}, "gracePeriodSeconds": 0, "intervalSeconds": 1,
             "timeoutSeconds": 0.5, "maxConsecutiveFailures": 0}
    reply = agent.put(f"/v2/groups{group_id}", json={"apps": [app("a", instances=1, healthChecks=[never]), app("c", instances=0)]})
    assert reply.status_code == 200, reply.text
    # ... cancelled: a back to 0 instances, b (removed by the change) back, c (created by it) gone.
    reverted = agent.delete(f"/v2/deployments/{reply.json()['deploymentId']}")
    assert reverted.status_code == 200, reverted.text
    assert reverted.json()["deploymentId"]
    assert client.get_app(f"{group_id}/a").instances == 0
    assert client.get_app(f"{group_id}/b").instances == 0
    with pytest.raises(NotFoundError):
        client.get_app(f"{group_id}/c")
    assert client.get_app(f"{group_id}/a").version == client.get_app(f"{group_id}/b").version, "one deployment for all"
