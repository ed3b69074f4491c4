"""Health checks the agent runs: HTTP, TCP and COMMAND verdicts in Marathon's shapes, killing and
replacing an instance that stays unhealthy past its grace period (with Marathon's events), never
killing when `maxConsecutiveFailures` is 0, and checks that time out without holding up others.

Checks run every second with a half-second timeout so the tests stay short.
"""

import os
import time
from datetime import datetime

from support.events import EventStream
from support.flotilla import app_definition, is_alive, wait_until

HTTP_SERVER_CMD = "python3 -m http.server $PORT0 --bind 127.0.0.1"
SLEEP_CMD = "sleep 600"

# Listens on $PORT0 and accepts connections, but never reads a request nor answers one.
SILENT_SERVER_ARGS = [
    "python3",
    "-c",
    "import os, socket\n"
    "server = socket.create_server(('127.0.0.1', int(os.environ['PORT0'])))\n"
    "held = []\n"
    "while True:\n"
    "    held.append(server.accept()[0])\n",
]

# Accepts TCP connections on $PORT0 and closes them: a TCP service that speaks no HTTP.
TCP_SERVER_ARGS = [
    "python3",
    "-c",
    "import os, socket\n"
    "server = socket.create_server(('127.0.0.1', int(os.environ['PORT0'])))\n"
    "while True:\n"
    "    server.accept()[0].close()\n",
]

ONE_PORT = [{"port": 0}]


def check(protocol="HTTP", **fields) -> dict:
    """A fast health check: every second, half a second to answer."""
    base = {
        "protocol": protocol,
        "gracePeriodSeconds": 0,
        "intervalSeconds": 1,
        "timeoutSeconds": 0.5,
        "maxConsecutiveFailures": 0,
    }
    if protocol in ("HTTP", "HTTPS"):
        base["path"] = "/"
    if protocol != "COMMAND":
        base["portIndex"] = 0
    return {**base, **fields}


def flotilla_instances(agent, app_id) -> list:
    response = agent.get("/flotilla/v1/instances", params={"app": app_id})
    assert response.status_code == 200, f"GET /flotilla/v1/instances?app={app_id}: {response.status_code} {response.text}"
    return response.json()["instances"]


def flotilla_instance(agent, app_id, task_id) -> dict:
    found = [item for item in flotilla_instances(agent, app_id) if item["id"] == task_id]
    assert len(found) == 1, f"{task_id} is not among the instances of {app_id}: {flotilla_instances(agent, app_id)}"
    return found[0]


def only_task(agent, app_id) -> dict:
    tasks = agent.tasks(app_id)
    assert len(tasks) == 1, f"{app_id} should have one task: {tasks}"
    return tasks[0]


def results_of(agent, app_id, count=1):
    """The single task of `app_id` once it has `count` health verdicts, else None."""
    tasks = agent.tasks(app_id)
    if len(tasks) != 1:
        return None
    results = tasks[0].get("healthCheckResults") or []
    return (tasks[0], results) if len(results) == count else None


def parse_time(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def stderr_of(agent, task_id) -> str:
    response = agent.get(f"/flotilla/v1/logs/{task_id}", params={"stream": "stderr", "lines": 10000})
    assert response.status_code == 200, f"logs of {task_id}: {response.status_code} {response.text}"
    return response.text


def test_http_check_passes_and_the_task_counts_as_healthy(shared_agent, app_ids):
    agent = shared_agent
    app_id = app_ids.new()
    agent.create_app(
        app_definition(app_id, HTTP_SERVER_CMD, portDefinitions=ONE_PORT, healthChecks=[check("HTTP", gracePeriodSeconds=5)])
    )

    def healthy():
        found = results_of(agent, app_id)
        return found if found and found[1][0]["alive"] is True else None

    task, results = wait_until(healthy, timeout=10, what=f"a passing HTTP check of {app_id}")
    result = results[0]
    assert result["consecutiveFailures"] == 0, result
    assert result["firstSuccess"] and result["lastSuccess"], result
    assert result["taskId"] == task["id"], result

    app = wait_until(
        lambda: (lambda app: app if app["tasksHealthy"] == 1 else None)(agent.app(app_id)),
        timeout=5,
        what=f"{app_id} to count one healthy task",
    )
    assert app["tasksUnhealthy"] == 0, app
    assert app["tasksRunning"] == 1, app

    instance = flotilla_instance(agent, app_id, task["id"])
    assert instance["healthy"] is True and instance["ready"] is True and instance["inService"] is True, instance
    assert instance["draining"] is False and instance["standby"] is False, instance

    # The verdict comes from real requests to the instance's port.
    assert '"GET / HTTP/1.1" 200' in stderr_of(agent, task["id"])
    agent.delete(f"/v2/apps{app_id}")


def test_tcp_checks_pass_on_a_listening_port_and_fail_on_a_closed_one(shared_agent, app_ids):
    agent = shared_agent
    app_id = app_ids.new()
    agent.create_app(
        app_definition(
            app_id,
            None,
            args=TCP_SERVER_ARGS,
            portDefinitions=[{"port": 0}, {"port": 0}],
            healthChecks=[check("TCP", portIndex=0), check("TCP", portIndex=1)],
        )
    )

    def verdicts():
        found = results_of(agent, app_id, count=2)
        return found if found and found[1][0]["alive"] is True and found[1][1]["alive"] is False else None

    # The listener needs a moment to start: its first check may fail, the next ones pass.
    task, results = wait_until(verdicts, timeout=10, what=f"TCP check 0 of {app_id} to pass and check 1 to fail")
    listening, closed = results
    assert listening["consecutiveFailures"] == 0, listening
    assert closed["consecutiveFailures"] >= 1, closed
    closed_port = task["ports"][1]
    assert str(closed_port) in closed["lastFailureCause"] and "refused" in closed["lastFailureCause"], closed

    app = agent.app(app_id)
    assert app["tasksHealthy"] == 0 and app["tasksUnhealthy"] == 1, app
    instance = flotilla_instance(agent, app_id, task["id"])
    assert instance["healthy"] is False and instance["ready"] is False and instance["inService"] is False, instance
    agent.delete(f"/v2/apps{app_id}")


def test_command_check_runs_in_the_sandbox_and_flips_to_passing(shared_agent, app_ids):
    agent = shared_agent
    app_id = app_ids.new()
    # `ready` is looked up in the instance's sandbox; $PORT0 shows the check sees the instance's environment.
    agent.create_app(
        app_definition(
            app_id,
            SLEEP_CMD,
            portDefinitions=ONE_PORT,
            healthChecks=[check("COMMAND", command={"value": 'test -f ready && test -n "$PORT0"'})],
        )
    )

    def failing():
        found = results_of(agent, app_id)
        return found if found and found[1][0]["alive"] is False else None

    task, results = wait_until(failing, timeout=10, what=f"a failing COMMAND check of {app_id}")
    assert "exit status 1" in (results[0]["lastFailureCause"] or ""), results[0]
    assert agent.app(app_id)["tasksUnhealthy"] == 1

    sandbox = agent.sandbox(task["id"])
    assert sandbox.is_dir(), f"no sandbox at {sandbox}"
    (sandbox / "ready").write_text("")

    def passing():
        found = results_of(agent, app_id)
        return found if found and found[1][0]["alive"] is True else None

    task_after, results = wait_until(passing, timeout=5, what=f"the COMMAND check of {app_id} to pass once ready exists")
    assert task_after["id"] == task["id"], "the instance must not have been replaced"
    assert results[0]["consecutiveFailures"] == 0, results[0]
    app = wait_until(
        lambda: (lambda app: app if app["tasksHealthy"] == 1 else None)(agent.app(app_id)),
        timeout=5,
        what=f"{app_id} to count one healthy task",
    )
    assert app["tasksUnhealthy"] == 0, app
    assert flotilla_instance(agent, app_id, task["id"])["healthy"] is True
    agent.delete(f"/v2/apps{app_id}")


def test_instance_failing_past_its_grace_period_is_killed_and_replaced(agent, app_ids):
    app_id = app_ids.new()
    grace = 2
    with EventStream(agent) as events:
        agent.create_app(
            app_definition(
                app_id,
                HTTP_SERVER_CMD,
                portDefinitions=ONE_PORT,
                backoffSeconds=0.5,
                # /healthz does not exist: http.server answers 404.
                healthChecks=[check("HTTP", path="/healthz", gracePeriodSeconds=grace, maxConsecutiveFailures=2)],
            )
        )
        first = agent.wait_for_running(app_id, 1)[0]
        leaders = wait_until(lambda: agent.instance_leaders(app_id), timeout=5, what=f"the process of {app_id}")
        first_pid = leaders[first["id"]]

        def replaced():
            tasks = agent.tasks(app_id)
            return tasks if tasks and all(task["id"] != first["id"] for task in tasks) else None

        replacement = wait_until(replaced, timeout=15, what=f"{first['id']} to be killed and replaced")
        assert len(replacement) == 1, replacement
        wait_until(lambda: not is_alive(first_pid), timeout=5, what=f"the killed instance's process {first_pid} to end")

        failure = agent.app(app_id)["lastTaskFailure"]
        assert failure["taskId"] == first["id"], failure
        assert "unhealthy" in failure["message"], failure
        assert "404" in failure["message"], failure
        lifetime = parse_time(failure["timestamp"]) - parse_time(first["startedAt"])
        assert lifetime >= grace, (
            f"{first['id']} was killed {lifetime:.2f}s after it started, within its {grace}s grace period"
        )

        task_id = first["id"]
        kill = events.wait_for(
            lambda e: e["eventType"] == "unhealthy_task_kill_event" and e.get("taskId") == task_id,
            what=f"unhealthy_task_kill_event for {task_id}",
        )
        assert kill["appId"] == app_id and "unhealthy" in kill.get("reason", ""), kill
        failed_check = events.wait_for(
            lambda e: e["eventType"] == "failed_health_check_event" and e.get("taskId") == task_id,
            what=f"failed_health_check_event for {task_id}",
        )
        assert failed_check["appId"] == app_id and failed_check["healthCheck"]["path"] == "/healthz", failed_check
        changed = events.wait_for(
            lambda e: e["eventType"] == "health_status_changed_event" and e.get("taskId") == task_id,
            what=f"health_status_changed_event for {task_id}",
        )
        assert changed["alive"] is False and changed["appId"] == app_id, changed


def test_max_consecutive_failures_zero_never_kills(shared_agent, app_ids):
    agent = shared_agent
    app_id = app_ids.new()
    # Nothing listens on the port: every check fails.
    agent.create_app(app_definition(app_id, SLEEP_CMD, portDefinitions=ONE_PORT, healthChecks=[check("HTTP")]))
    task = agent.wait_for_running(app_id, 1)[0]
    pid = wait_until(lambda: agent.instance_leaders(app_id), timeout=5, what=f"the process of {app_id}")[task["id"]]

    def failed_repeatedly():
        found = results_of(agent, app_id)
        return found if found and found[1][0]["consecutiveFailures"] >= 4 else None

    task_after, results = wait_until(failed_repeatedly, timeout=10, what=f"4 failed checks of {app_id} in a row")
    assert task_after["id"] == task["id"] and task_after["state"] == "TASK_RUNNING", task_after
    assert results[0]["alive"] is False and "refused" in results[0]["lastFailureCause"], results[0]
    assert agent.instance_leaders(app_id) == {task["id"]: pid}, "the unhealthy instance must keep running"
    app = agent.app(app_id)
    assert app.get("lastTaskFailure") is None, app.get("lastTaskFailure")
    assert app["tasksUnhealthy"] == 1, app
    agent.delete(f"/v2/apps{app_id}")


def test_check_that_times_out_fails_without_holding_up_other_checks(shared_agent, app_ids):
    agent = shared_agent
    silent_id = app_ids.new("silent")
    healthy_id = app_ids.new("healthy")
    silent_count = 6  # checked one after another, their timeouts alone would take 3 s per round
    agent.create_app(
        app_definition(
            silent_id, None, args=SILENT_SERVER_ARGS, instances=silent_count, portDefinitions=ONE_PORT, healthChecks=[check("HTTP")]
        )
    )
    agent.create_app(app_definition(healthy_id, HTTP_SERVER_CMD, portDefinitions=ONE_PORT, healthChecks=[check("HTTP")]))

    def all_timed_out():
        tasks = agent.tasks(silent_id)
        if len(tasks) != silent_count:
            return None
        results = [(task.get("healthCheckResults") or [None])[0] for task in tasks]
        # Before a server listens its check is refused; once it listens, the check times out.
        timed_out = all(
            result and result["alive"] is False and "no answer" in (result["lastFailureCause"] or "") for result in results
        )
        return results if timed_out else None

    try:
        results = wait_until(all_timed_out, timeout=15, what=f"every check of {silent_id} to time out")
    except AssertionError as error:
        now = [(task["id"], task.get("healthCheckResults")) for task in agent.tasks(silent_id)]
        raise AssertionError(f"{error}\nresults now: {now}") from None
    for result in results:
        assert "no answer within 0.5 s" in result["lastFailureCause"], result

    def healthy():
        found = results_of(agent, healthy_id)
        return found if found and found[1][0]["alive"] is True else None

    task, _ = wait_until(healthy, timeout=10, what=f"{healthy_id} to pass its check")

    # Count the checks the healthy instance receives while the silent ones keep timing out.
    def served() -> int:
        return stderr_of(agent, task["id"]).count('"GET / HTTP/1.1" 200')

    window = 4.5
    before = served()
    time.sleep(window)
    during = served() - before
    assert during >= 3, (
        f"{healthy_id} got {during} checks in {window}s (interval 1s) while {silent_count} checks of "
        f"{silent_id} were timing out: timeouts hold up other checks"
    )
    for instance in flotilla_instances(agent, silent_id):
        assert instance["state"] == "TASK_RUNNING" and instance["healthy"] is False, instance
    assert (results_of(agent, healthy_id) or (None, [{}]))[1][0].get("alive") is True
    agent.delete(f"/v2/apps{silent_id}")
    agent.delete(f"/v2/apps{healthy_id}")
