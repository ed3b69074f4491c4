"""Marathon behaviour that new users hit on day one, checked with the unmodified `marathon` client
(and plain HTTP where the client has no call): default ports, service ports, health checks
copied from published definitions, bulk updates and the small endpoints clients call.
"""

import json
import time
import socket

import pytest
import requests
from marathon import MarathonApp
from marathon.models import MarathonInfo
from support.flotilla import flotilla_binary, free_tcp_port, start_agent, wait_until

from test_marathon import (
    HTTP_SERVER_CMD,
    SLEEP_CMD,
    TASK_RESOURCES,
    answers_http_200,
    create_app,
    deployment_result,
    wait_for_running_tasks,
)

SERVICE_PORTS = range(10000, 20001)


def raw_app(agent, app_id):
    reply = agent.get(f"/v2/apps{app_id}")
    assert reply.status_code == 200, reply.text
    return reply.json()["app"]


def service_ports(agent, app_id):
    return [definition["port"] for definition in raw_app(agent, app_id)["portDefinitions"]]


def test_app_without_ports_gets_one_port_as_in_marathon(client, agent, app_ids):
    app_id = app_ids.new()
    # A definition as Marathon's docs write it: no ports at all, and $PORT0 in the command.
    reply = agent.post("/v2/apps", json={"id": app_id, "cmd": HTTP_SERVER_CMD, **TASK_RESOURCES})
    assert reply.status_code == 201, reply.text
    [definition] = reply.json()["portDefinitions"]
    assert definition["name"] == "default" and definition["protocol"] == "tcp"
    assert definition["port"] in SERVICE_PORTS, "port 0 becomes a service port from 10000-20000"

    [task] = wait_for_running_tasks(client, app_id, 1)
    assert len(task.ports) == 1 and task.ports[0] in agent.task_ports
    assert task.service_ports == [definition["port"]]
    wait_until(lambda: answers_http_200(task.ports[0]), what="the app serving on $PORT0")


def test_empty_port_definitions_mean_no_ports(client, agent, app_ids):
    app_id = app_ids.new()
    reply = agent.post("/v2/apps", json={"id": app_id, "cmd": SLEEP_CMD, "portDefinitions": [], **TASK_RESOURCES})
    assert reply.status_code == 201, reply.text
    [task] = wait_for_running_tasks(client, app_id, 1)
    assert task.ports == []


def test_health_check_timeout_above_interval_is_accepted(client, agent, app_ids):
    # Published definitions use interval 10 with timeout 20; Marathon accepts them.
    # (The client cannot serialise nested models on Python 3.10+, so the definition goes as JSON.)
    app_id = app_ids.new()
    check = {"protocol": "HTTP", "path": "/", "portIndex": 0, "intervalSeconds": 1, "timeoutSeconds": 20,
             "gracePeriodSeconds": 30, "maxConsecutiveFailures": 3}
    reply = agent.post("/v2/apps", json={"id": app_id, "cmd": HTTP_SERVER_CMD, "healthChecks": [check], **TASK_RESOURCES})
    assert reply.status_code == 201, reply.text
    wait_until(lambda: client.get_app(app_id).tasks_healthy == 1, timeout=30, what="a healthy task")
    [stored] = raw_app(agent, app_id)["healthChecks"]
    assert (stored["intervalSeconds"], stored["timeoutSeconds"]) == (1, 20)


def test_service_ports_are_unique_and_kept_across_versions(client, agent, app_ids):
    first, second = app_ids.new("first"), app_ids.new("second")
    create_app(client, first, cmd=SLEEP_CMD, ports=[0, 0])
    create_app(client, second, cmd=SLEEP_CMD, ports=[0])
    first_ports, second_ports = service_ports(agent, first), service_ports(agent, second)
    assert all(port in SERVICE_PORTS for port in first_ports + second_ports)
    assert len(set(first_ports + second_ports)) == 3, "no two apps share a service port"
    assert raw_app(agent, first)["ports"] == first_ports, "`ports` reports the service ports too"

    # A config change, and a PUT that sends port 0 again, keep the ports the app has.
    deployment_result(client.update_app(first, MarathonApp(cmd=SLEEP_CMD + " ", ports=[0, 0]), force=True))
    assert service_ports(agent, first) == first_ports
    tasks = wait_for_running_tasks(client, first, 1)
    assert tasks[0].service_ports == first_ports

    # A port given explicitly is kept as given.
    fixed = next(port for port in range(19999, 10000, -1) if port not in first_ports + second_ports)
    deployment_result(client.update_app(second, MarathonApp(ports=[fixed]), force=True))
    assert service_ports(agent, second) == [fixed]


def test_service_port_route_reaches_the_app(tmp_path_factory):
    # An agent of its own, with a service-port range nobody else on the machine uses.
    low = free_tcp_port()
    agent = start_agent(flotilla_binary(), tmp_path_factory.mktemp("service-ports"),
                        extra_args=["--service-ports", f"{low}-{low}"])
    try:
        app_id = "/compat/routed"
        definition = {"id": app_id, "cmd": HTTP_SERVER_CMD, **TASK_RESOURCES,
                      "labels": {"FLOTILLA_SERVICE_PORT_ROUTE": "true"}}
        reply = agent.post("/v2/apps", json=definition)
        assert reply.status_code == 201, reply.text
        assert reply.json()["portDefinitions"][0]["port"] == low

        def served():
            try:
                return requests.get(f"http://127.0.0.1:{low}/", timeout=2).status_code == 200
            except requests.RequestException:
                return False

        wait_until(served, timeout=30, what=f"the service port {low} routed to the instance")
        routes = agent.get("/api/routes").json()
        assert any(route["src"] == f":{low}" and route["proto"] == "tcp" for route in routes), routes

        # The range is full: a second app asking for a service port is refused, and says why.
        reply = agent.post("/v2/apps", json={"id": "/compat/second", "cmd": SLEEP_CMD, **TASK_RESOURCES})
        assert reply.status_code == 422, reply.text
        assert "--service-ports" in json.dumps(reply.json())
    finally:
        agent.stop()
        agent.assert_no_leftovers()


def test_bulk_update_apps_is_one_deployment(client, agent, app_ids):
    first, second = app_ids.new("first"), app_ids.new("second")
    create_app(client, first, cmd=SLEEP_CMD, instances=1)
    wait_for_running_tasks(client, first, 1)
    result = deployment_result(client.update_apps(
        [MarathonApp(id=first, instances=2), MarathonApp(id=second, cmd=SLEEP_CMD, instances=1, **TASK_RESOURCES)]))
    wait_for_running_tasks(client, first, 2)
    wait_for_running_tasks(client, second, 1)
    assert client.get_app(first).version == result["version"] == client.get_app(second).version

    # One invalid entry and nothing is applied.
    reply = agent.put("/v2/apps", json=[{"id": first, "instances": 3}, {"id": second, "instances": -1}])
    assert reply.status_code == 422, reply.text
    assert reply.json()["details"][0]["path"].startswith("/1")
    assert client.get_app(first).instances == 2


def test_small_endpoints_clients_call(client, agent, app_ids):
    info = client.get_info()
    assert isinstance(info, MarathonInfo)
    assert (info.marathon_config.local_port_min, info.marathon_config.local_port_max) == (10000, 20000)

    assert client.delete_leader() == {"message": "Leadership abdicated"}

    app_id = app_ids.new()
    create_app(client, app_id, cmd=SLEEP_CMD, instances=2)
    tasks = wait_for_running_tasks(client, app_id, 2)
    reply = agent.post("/v2/tasks/delete", json={"ids": [tasks[0].id]})
    assert reply.status_code == 200, reply.text
    assert [task["id"] for task in reply.json()["tasks"]] == [tasks[0].id]

    reply = agent.delete(f"/v2/queue{app_id}/delay")
    assert reply.status_code == 204, reply.text
    client.reset_delay(app_id)


READY_FILE_SERVER_CMD = 'exec python3 -m http.server "$PORT0" --bind 127.0.0.1 --directory "$MESOS_SANDBOX"'


def test_readiness_check_gates_the_deployment_and_the_routes(client, agent, app_ids):
    app_id = app_ids.new("ready")
    readiness = {"name": "warm", "protocol": "HTTP", "path": "/ready", "portName": "http", "intervalSeconds": 1,
                 "timeoutSeconds": 0.5, "httpStatusCodesForReady": [200], "preserveLastResponse": True}
    definition = {"id": app_id, "cmd": READY_FILE_SERVER_CMD, **TASK_RESOURCES, "portDefinitions": [{"port": 0, "name": "http"}],
                  "readinessChecks": [readiness], "labels": {"SERVICE_TAGS": f"urlprefix-/{app_id.rsplit('/', 1)[1]}"}}
    reply = agent.post("/v2/apps", json=definition)
    assert reply.status_code == 201, reply.text
    assert reply.json()["readinessChecks"][0]["portName"] == "http"
    [task] = wait_for_running_tasks(client, app_id, 1)

    def results():
        deployments = [d for d in agent.deployments() if app_id in d["affectedApps"]]
        if not deployments:
            return None
        checked = [r for action in deployments[0]["currentActions"] for r in action.get("readinessCheckResults", [])]
        return checked if checked and "lastResponse" in checked[0] else None

    [result] = wait_until(results, timeout=10, what="readinessCheckResults with the instance's answer in the deployment")
    assert result["name"] == "warm" and result["taskId"] == task.id and result["ready"] is False
    assert result["lastResponse"]["status"] == 404, "preserveLastResponse keeps what the instance answered"
    time.sleep(2)
    assert [d for d in agent.deployments() if app_id in d["affectedApps"]], "the deployment waits for readiness"
    name = app_id.strip("/").replace("/", "-")
    assert agent.get(f"/v1/health/service/{name}", params={"passing": "1"}).json() == [], "not ready: out of service"

    (agent.sandbox(task.id) / "ready").write_text("yes")
    wait_until(lambda: not [d for d in agent.deployments() if app_id in d["affectedApps"]], timeout=10,
               what="the deployment to finish once the instance is ready")
    assert len(agent.get(f"/v1/health/service/{name}", params={"passing": "1"}).json()) == 1


def test_readiness_checks_are_validated_as_marathon_does(agent, app_ids):
    app_id = app_ids.new()
    base = {"id": app_id, "cmd": SLEEP_CMD, **TASK_RESOURCES}
    reply = agent.post("/v2/apps", json={**base, "readinessChecks": [{"intervalSeconds": 5, "timeoutSeconds": 1}]})
    assert reply.status_code == 422 and "http-api" in reply.text, "the default portName must name a port"
    reply = agent.post("/v2/apps", json={**base, "portDefinitions": [{"port": 0, "name": "http-api"}],
                                         "readinessChecks": [{"intervalSeconds": 2, "timeoutSeconds": 2}]})
    assert reply.status_code == 422 and "timeoutSeconds" in reply.text


def test_marathon_json_metrics_and_prometheus_text(client, agent, app_ids):
    app_id = app_ids.new()
    create_app(client, app_id, cmd=SLEEP_CMD, instances=1)
    wait_for_running_tasks(client, app_id, 1)
    metrics = agent.get("/v2/metrics").json()
    assert metrics["version"] == "4.0.0"
    assert metrics["gauges"]["marathon.apps.active.gauge"]["value"] >= 1
    assert metrics["gauges"]["marathon.instances.running.gauge"]["value"] >= 1
    assert set(metrics) == {"version", "gauges", "counters", "histograms", "meters", "timers"}
    text = agent.get("/metrics")
    assert text.headers["Content-Type"].startswith("text/plain"), "Prometheus keeps its text format at /metrics"


def test_kill_selection_chooses_which_instances_a_scale_down_stops(client, agent, app_ids):
    for selection, keeps in (("OLDEST_FIRST", "youngest"), ("YOUNGEST_FIRST", "oldest")):
        app_id = app_ids.new(selection.lower().replace("_", "-"))
        reply = agent.post("/v2/apps", json={"id": app_id, "cmd": SLEEP_CMD, "instances": 1, "killSelection": selection,
                                             **TASK_RESOURCES})
        assert reply.status_code == 201, reply.text
        [first] = wait_for_running_tasks(client, app_id, 1)
        client.scale_app(app_id, instances=2)
        tasks = wait_for_running_tasks(client, app_id, 2)
        [second] = [task for task in tasks if task.id != first.id]
        client.scale_app(app_id, instances=1)
        [left] = wait_for_running_tasks(client, app_id, 1)
        assert left.id == (second.id if keeps == "youngest" else first.id), f"{selection} keeps the {keeps} instance"


def test_bulk_update_orders_apps_by_their_dependencies(client, agent, app_ids):
    db, web = app_ids.new("db"), app_ids.new("web")
    relative = db.rsplit("/", 1)[1]  # a sibling, named relative to the group both are in
    reply = agent.put("/v2/apps", json=[
        {"id": web, "cmd": SLEEP_CMD, **TASK_RESOURCES, "dependencies": [relative]},
        {"id": db, "cmd": SLEEP_CMD, **TASK_RESOURCES},
    ])
    assert reply.status_code == 200, reply.text
    assert raw_app(agent, web)["dependencies"] == [db], "a relative dependency resolves against the app's group"
    result = agent.get(f"/flotilla/v1/deployments/{reply.json()['deploymentId']}").json()
    steps = [[(a["action"], a["app"]) for a in step["actions"]] for step in result.get("steps", [])]
    assert steps[1:] == [[("ScaleApplication", db)], [("ScaleApplication", web)]], result
    wait_for_running_tasks(client, web, 1)
