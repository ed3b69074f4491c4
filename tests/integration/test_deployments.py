"""Deployments against a real agent, with deliberately broken versions: a deployment fails for a
reason people can act on, rolls the app back by itself (unless told not to), never takes more
capacity out of service than `upgradeStrategy` allows, can be overridden or cancelled, and
blue-green switches and switches back without starting processes. Stopping an instance drains it
first. Scaling alone never restarts instances.

Health checks run every second with short timeouts and deadlines so the tests stay short.
"""

import json
import re
import threading
import time
from datetime import datetime

from support.events import EventStream
from support.flotilla import app_definition, is_alive, process_environment, wait_until

HTTP_SERVER_CMD = "python3 -m http.server $PORT0 --bind 127.0.0.1"
SLEEP_CMD = "sleep 600"
ONE_PORT = [{"port": 0}]


def http_check(**fields) -> dict:
    check = {
        "protocol": "HTTP",
        "path": "/",
        "portIndex": 0,
        "gracePeriodSeconds": 5,
        "intervalSeconds": 1,
        "timeoutSeconds": 0.5,
        "maxConsecutiveFailures": 3,
    }
    return {**check, **fields}


def web_app(app_id, version: str, instances=1, cmd=HTTP_SERVER_CMD, check=None, strategy=None, **fields) -> dict:
    """An HTTP server with a health check; `version` goes into its environment as VERSION."""
    return app_definition(
        app_id,
        cmd,
        instances=instances,
        env={"VERSION": version},
        portDefinitions=ONE_PORT,
        healthChecks=[check or http_check()],
        drainSeconds=0,
        backoffSeconds=0.2,
        backoffFactor=1,
        upgradeStrategy={"minimumHealthCapacity": 1, "maximumOverCapacity": 1, "progressDeadlineSeconds": 10, **(strategy or {})},
        **fields,
    )


def deployment_status(agent, deployment_id) -> dict:
    response = agent.get(f"/flotilla/v1/deployments/{deployment_id}")
    assert response.status_code == 200, f"GET /flotilla/v1/deployments/{deployment_id}: {response.status_code} {response.text}"
    return response.json()


def wait_for_end(agent, deployment_id, timeout=20) -> dict:
    """The deployment's final status, once it is no longer running."""

    def ended():
        status = deployment_status(agent, deployment_id)
        return status if status["status"] != "running" else None

    return wait_until(ended, timeout=timeout, interval=0.1, what=f"deployment {deployment_id} to end")


def wait_for_success(agent, deployment_id, timeout=20) -> dict:
    status = wait_for_end(agent, deployment_id, timeout)
    assert status["status"] == "succeeded", f"deployment {deployment_id} did not succeed: {status}"
    return status


def create_and_settle(agent, definition, timeout=20) -> dict:
    """Creates the app and waits for its deployment to succeed; returns the app."""
    created = agent.create_app(definition)
    wait_for_success(agent, created["deployments"][0]["id"], timeout)
    return agent.app(definition["id"])


def update(agent, app_id, definition, force=False) -> dict:
    response = agent.put(f"/v2/apps{app_id}", params={"force": "true"} if force else None, json=definition)
    assert response.status_code == 200, f"PUT /v2/apps{app_id}: {response.status_code} {response.text}"
    return response.json()


def instances_of(agent, app_id) -> list:
    response = agent.get("/flotilla/v1/instances", params={"app": app_id})
    assert response.status_code == 200, f"GET /flotilla/v1/instances?app={app_id}: {response.status_code} {response.text}"
    return response.json()["instances"]


def by_id(instances) -> dict:
    return {instance["id"]: instance for instance in instances}


def parse_time(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def deploy_file(tmp_path, definition, name="app.json"):
    path = tmp_path / name
    path.write_text(json.dumps(definition))
    return path


def cli_output(result) -> str:
    return f"exit status {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"


def deployment_id_in(output: str) -> str:
    match = re.search(r"deployment ([0-9a-f-]{36})", output)
    assert match, f"no deployment id in the output of `flotilla deploy`:\n{output}"
    return match.group(1)


def assert_back_at(agent, app_id, version, task_ids, pids, env_version):
    """The app runs `version`'s configuration on exactly the tasks and processes it had then."""
    app = agent.app(app_id)
    assert app["env"] == {"VERSION": env_version}, app["env"]
    assert app["versionInfo"]["lastConfigChangeAt"] == version, app["versionInfo"]
    tasks = agent.running_tasks(app_id, len(task_ids))
    assert tasks is not None, f"{app_id} tasks now: {agent.tasks(app_id)}"
    assert {task["id"] for task in tasks} == set(task_ids), "the old version's tasks should have been kept"
    assert {task["version"] for task in tasks} == {version}, tasks
    assert agent.instance_leaders(app_id) == pids
    for pid in pids.values():
        assert process_environment(pid).get("VERSION") == env_version


class Sampler:
    """Samples GET /flotilla/v1/instances?app=… every ~100 ms on a thread until stopped."""

    def __init__(self, agent, app_id, interval=0.1):
        self.agent, self.app_id, self.interval = agent, app_id, interval
        self.samples = []
        self.error = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="instance-sampler", daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc_info):
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self):
        try:
            while not self._stop.is_set():
                self.samples.append((time.monotonic(), instances_of(self.agent, self.app_id)))
                self._stop.wait(self.interval)
        except Exception as error:
            self.error = error

    def check(self):
        assert self.error is None, f"sampling the instances failed: {self.error!r}"
        assert len(self.samples) >= 5, f"only {len(self.samples)} samples were taken"
        return self.samples


def describe(instances) -> list:
    return [
        (item["id"][-8:], item["state"], "in" if item["inService"] else "out", item["goal"], "standby" if item["standby"] else "")
        for item in instances
    ]


# --- failing deployments ----------------------------------------------------------------------


def test_version_that_exits_at_once_fails_the_deploy_and_rolls_back(agent, app_ids, tmp_path):
    app_id = app_ids.new()
    v1 = web_app(app_id, "1", instances=2)
    app = create_and_settle(agent, v1)
    v1_version = app["version"]
    v1_tasks = {task["id"] for task in agent.wait_for_running(app_id, 2)}
    pids = wait_until(lambda: (lambda found: found if len(found) == 2 else None)(agent.instance_leaders(app_id)), timeout=5)

    broken = {
        **v1,
        "cmd": "echo 'fatal: cannot read /etc/shop/app.conf' >&2; exit 3",
        "env": {"VERSION": "2"},
    }
    result = agent.cli("deploy", deploy_file(tmp_path, broken), "--timeout", 40)
    output = result.stdout + result.stderr
    assert result.returncode != 0, f"`flotilla deploy` of a crashing version succeeded:\n{cli_output(result)}"
    assert "status 3" in output, f"the exit status is not shown:\n{cli_output(result)}"
    assert "fatal: cannot read /etc/shop/app.conf" in output, f"the app's stderr is not shown:\n{cli_output(result)}"
    assert "rolled back" in output, cli_output(result)

    deployment_id = deployment_id_in(result.stdout)
    status = deployment_status(agent, deployment_id)
    assert status["status"] == "failed", status
    assert "status 3" in status["reason"] and "fatal: cannot read" in status["reason"], status
    assert status["rolledBackTo"] == v1_version, status
    wait_for_success(agent, status["rollbackDeploymentId"])
    assert_back_at(agent, app_id, v1_version, v1_tasks, pids, "1")
    failure = agent.app(app_id)["lastTaskFailure"]
    assert failure["state"] == "TASK_FAILED" and "status 3" in failure["message"], failure


def test_version_never_healthy_fails_at_the_progress_deadline_and_rolls_back(agent, app_ids):
    app_id = app_ids.new()
    v1 = web_app(app_id, "1")
    app = create_and_settle(agent, v1)
    v1_version = app["version"]
    v1_tasks = {task["id"] for task in agent.wait_for_running(app_id, 1)}
    pids = agent.instance_leaders(app_id)

    deadline = 4
    # Serves, but not /healthz: every check answers 404 (forgiven within the long grace period).
    never_healthy = web_app(
        app_id, "2", check=http_check(path="/healthz", gracePeriodSeconds=60), strategy={"progressDeadlineSeconds": deadline}
    )
    started = time.monotonic()
    deployment_id = update(agent, app_id, never_healthy)["deploymentId"]
    status = wait_for_end(agent, deployment_id, timeout=deadline + 10)
    elapsed = time.monotonic() - started
    assert status["status"] == "failed", status
    assert elapsed >= deadline - 0.5, f"failed after {elapsed:.1f}s, before its {deadline}s progress deadline: {status}"
    assert "progress deadline" in status["reason"], status
    assert "/healthz answered 404" in status["reason"], f"the failing check's cause is missing: {status}"
    assert status["rolledBackTo"] == v1_version, status

    wait_for_success(agent, status["rollbackDeploymentId"])
    wait_until(lambda: agent.running_tasks(app_id, 1), timeout=5, what="the never-healthy instance to stop")
    assert_back_at(agent, app_id, v1_version, v1_tasks, pids, "1")
    assert agent.app(app_id)["healthChecks"][0]["path"] == "/"


def test_failed_deployment_without_auto_rollback_stays_failed(agent, app_ids):
    app_id = app_ids.new()
    v1 = web_app(app_id, "1")
    create_and_settle(agent, v1)
    v1_task = agent.wait_for_running(app_id, 1)[0]

    never_healthy = web_app(
        app_id,
        "2",
        check=http_check(path="/healthz", gracePeriodSeconds=60),
        strategy={"progressDeadlineSeconds": 3, "autoRollback": False},
    )
    v2 = update(agent, app_id, never_healthy)
    status = wait_for_end(agent, v2["deploymentId"], timeout=15)
    assert status["status"] == "failed", status
    assert "progress deadline" in status["reason"], status
    assert "rolledBackTo" not in status and "rollbackDeploymentId" not in status, status

    # Nothing rolls back later either: the app keeps version 2, the old instance keeps serving.
    time.sleep(1.5)
    app = agent.app(app_id)
    assert app["deployments"] == [], app["deployments"]
    assert app["env"] == {"VERSION": "2"} and app["version"] == v2["version"], app
    instances = by_id(instances_of(agent, app_id))
    assert instances[v1_task["id"]]["inService"] is True, describe(instances.values())
    assert not any(item["inService"] for key, item in instances.items() if key != v1_task["id"]), describe(instances.values())


def test_slow_starting_version_succeeds_within_its_deadline(agent, app_ids, tmp_path):
    app_id = app_ids.new()
    v1 = web_app(app_id, "1")
    create_and_settle(agent, v1)
    v1_task = agent.wait_for_running(app_id, 1)[0]

    slow = web_app(
        app_id,
        "2",
        cmd=f"sleep 3; exec {HTTP_SERVER_CMD}",
        check=http_check(gracePeriodSeconds=10),
        strategy={"progressDeadlineSeconds": 10},
    )
    started = time.monotonic()
    result = agent.cli("deploy", deploy_file(tmp_path, slow), "--timeout", 30)
    elapsed = time.monotonic() - started
    assert result.returncode == 0, cli_output(result)
    assert "succeeded" in result.stdout, cli_output(result)
    assert elapsed >= 3, f"`flotilla deploy` returned after {elapsed:.1f}s, before the new version could serve"
    status = deployment_status(agent, deployment_id_in(result.stdout))
    assert status["status"] == "succeeded", status

    tasks = agent.wait_for_running(app_id, 1, timeout=5)
    assert tasks[0]["id"] != v1_task["id"]
    assert agent.app(app_id)["env"] == {"VERSION": "2"}
    assert tasks[0]["healthCheckResults"][0]["alive"] is True, tasks[0]


def test_instance_that_turns_unhealthy_after_the_deployment_is_replaced(agent, app_ids, tmp_path):
    app_id = app_ids.new()
    # Serves for 3 s, then stops answering (the port closes) while the instance keeps running.
    flaky = web_app(
        app_id,
        "1",
        cmd=f"timeout 3 {HTTP_SERVER_CMD}; exec sleep 600",
        check=http_check(gracePeriodSeconds=1, maxConsecutiveFailures=2),
    )
    result = agent.cli("deploy", deploy_file(tmp_path, flaky), "--timeout", 20)
    assert result.returncode == 0, cli_output(result)
    deployment_id = deployment_id_in(result.stdout)
    first = agent.wait_for_running(app_id, 1)[0]
    assert first["healthCheckResults"][0]["alive"] is True, first

    def replaced():
        tasks = agent.tasks(app_id)
        return tasks if tasks and all(task["id"] != first["id"] for task in tasks) else None

    wait_until(replaced, timeout=15, what=f"{first['id']} to be killed as unhealthy and replaced")
    failure = agent.app(app_id)["lastTaskFailure"]
    assert failure["taskId"] == first["id"] and "unhealthy" in failure["message"], failure
    assert deployment_status(agent, deployment_id)["status"] == "succeeded"
    assert agent.app(app_id)["deployments"] == [], "replacing an unhealthy instance is no deployment"


# --- capacity during a rolling replacement ---------------------------------------------------


def restart_and_sample(agent, app_id, count):
    before = {task["id"] for task in agent.wait_for_running(app_id, count)}
    response = agent.post(f"/v2/apps{app_id}/restart")
    assert response.status_code == 200, f"POST /v2/apps{app_id}/restart: {response.status_code} {response.text}"
    with Sampler(agent, app_id) as sampler:
        wait_for_success(agent, response.json()["deploymentId"], timeout=30)
        time.sleep(0.3)
    after = {task["id"] for task in agent.wait_for_running(app_id, count)}
    assert not before & after, f"instances not replaced by the restart: {before & after}"
    return sampler.check()


def test_rolling_restart_keeps_half_in_service_without_over_capacity(agent, app_ids):
    app_id = app_ids.new()
    count = 4
    definition = web_app(app_id, "1", instances=count, strategy={"minimumHealthCapacity": 0.5, "maximumOverCapacity": 0})
    definition["drainSeconds"] = 1  # an instance on its way out still runs (and holds its resources) for a second
    create_and_settle(agent, definition, timeout=30)
    samples = restart_and_sample(agent, app_id, count)
    lowest = min(samples, key=lambda sample: sum(item["inService"] for item in sample[1]))
    assert sum(item["inService"] for item in lowest[1]) >= 2, (
        f"fewer than 2 of {count} instances in service (minimumHealthCapacity 0.5): {describe(lowest[1])}"
    )
    largest = max(samples, key=lambda sample: len(sample[1]))
    assert len(largest[1]) <= count, (
        f"{len(largest[1])} live instances with maximumOverCapacity 0 (at most {count}): {describe(largest[1])}"
    )


def test_rolling_restart_with_the_default_strategy_never_drops_below_the_instance_count(agent, app_ids):
    app_id = app_ids.new()
    count = 2
    definition = web_app(app_id, "1", instances=count)
    definition["upgradeStrategy"] = {"progressDeadlineSeconds": 10}  # (1, 1): Marathon's default
    create_and_settle(agent, definition)
    samples = restart_and_sample(agent, app_id, count)
    for _, instances in samples:
        in_service = sum(item["inService"] for item in instances)
        assert in_service >= count, f"{in_service} of {count} in service during the restart: {describe(instances)}"
        assert len(instances) <= 2 * count, f"more than {2 * count} live instances: {describe(instances)}"


# --- overriding and cancelling deployments -----------------------------------------------------


def stuck_update(agent, app_id, v1, **changes) -> str:
    """A version that cannot be placed (1000 cpus): its deployment stays running."""
    deployment_id = update(agent, app_id, {**v1, "cpus": 1000, **changes})["deploymentId"]
    time.sleep(0.5)
    assert deployment_status(agent, deployment_id)["status"] == "running"
    return deployment_id


def test_change_during_a_deployment_conflicts_unless_forced(agent, app_ids, tmp_path):
    app_id = app_ids.new()
    v1 = app_definition(app_id, SLEEP_CMD, env={"VERSION": "1"}, drainSeconds=0)
    create_and_settle(agent, v1)
    stuck = stuck_update(agent, app_id, v1, env={"VERSION": "2"})

    v3 = {**v1, "env": {"VERSION": "3"}}
    conflict = agent.put(f"/v2/apps{app_id}", json=v3)
    assert conflict.status_code == 409, f"{conflict.status_code} {conflict.text}"
    body = conflict.json()
    assert stuck in body["message"], body
    assert body["deployments"] == [{"id": stuck}], body
    assert agent.app(app_id)["env"] == {"VERSION": "2"}, "a refused change must not apply"
    refused = agent.cli("deploy", deploy_file(tmp_path, v3), "--detach")
    assert refused.returncode != 0 and stuck in refused.stdout + refused.stderr, cli_output(refused)
    assert agent.app(app_id)["env"] == {"VERSION": "2"}, "a refused change must not apply"

    forced = agent.put(f"/v2/apps{app_id}", params={"force": "true"}, json=v3)
    assert forced.status_code == 200, f"{forced.status_code} {forced.text}"
    replacement = forced.json()["deploymentId"]
    assert replacement != stuck
    assert stuck not in {deployment["id"] for deployment in agent.deployments()}
    wait_for_success(agent, replacement)
    assert agent.app(app_id)["env"] == {"VERSION": "3"}
    assert agent.wait_for_running(app_id, 1)[0]["version"] == forced.json()["version"]


def test_cancelling_a_deployment_reverts_it_and_force_only_drops_it(agent, app_ids):
    app_id = app_ids.new()
    v1 = web_app(app_id, "1")
    app = create_and_settle(agent, v1)
    v1_version = app["version"]
    v1_task = agent.wait_for_running(app_id, 1)[0]["id"]
    pids = agent.instance_leaders(app_id)

    # Version 2 starts but never becomes healthy, with a deadline far away: the deployment hangs.
    hanging = web_app(
        app_id, "2", check=http_check(path="/healthz", maxConsecutiveFailures=0), strategy={"progressDeadlineSeconds": 300}
    )
    stuck = update(agent, app_id, hanging)["deploymentId"]
    wait_until(lambda: len(agent.tasks(app_id)) == 2, timeout=5, what="version 2's instance to start")

    cancelled = agent.delete(f"/v2/deployments/{stuck}")
    assert cancelled.status_code == 200, f"DELETE /v2/deployments/{stuck}: {cancelled.status_code} {cancelled.text}"
    revert = cancelled.json()["deploymentId"]
    assert revert != stuck
    assert stuck not in {deployment["id"] for deployment in agent.deployments()}
    wait_for_success(agent, revert)
    wait_until(lambda: agent.running_tasks(app_id, 1), timeout=5, what="version 2's instance to stop")
    assert_back_at(agent, app_id, v1_version, {v1_task}, pids, "1")
    assert agent.app(app_id)["healthChecks"][0]["path"] == "/"

    # With force the deployment is only dropped: the app keeps the new definition.
    dropped = stuck_update(agent, app_id, v1, env={"VERSION": "3"})
    forced = agent.delete(f"/v2/deployments/{dropped}", params={"force": "true"})
    assert forced.status_code == 202, f"DELETE /v2/deployments/{dropped}?force=true: {forced.status_code} {forced.text}"
    assert dropped not in {deployment["id"] for deployment in agent.deployments()}
    app = agent.app(app_id)
    assert app["deployments"] == [], app["deployments"]
    assert app["cpus"] == 1000 and app["env"] == {"VERSION": "3"}, app
    assert {task["id"] for task in agent.tasks(app_id)} == {v1_task}

    # Like any deployment that ended, a cancelled one says how it ended (`flotilla deploy`, which
    # follows it there, reports "cancelled" rather than an unknown deployment).
    for deployment_id, how in ((stuck, "DELETE"), (dropped, "DELETE ?force=true")):
        response = agent.get(f"/flotilla/v1/deployments/{deployment_id}")
        assert response.status_code == 200 and response.json().get("status") == "cancelled", (
            f"GET /flotilla/v1/deployments/{deployment_id} after {how} /v2/deployments/{deployment_id}: "
            f"{response.status_code} {response.text}"
        )


# --- blue-green ------------------------------------------------------------------------------


def blue_green_app(app_id, color, instances=2, keep_old=30, cmd=HTTP_SERVER_CMD):
    definition = web_app(
        app_id,
        color,
        instances=instances,
        cmd=cmd,
        strategy={"type": "blue-green", "keepOldSeconds": keep_old, "progressDeadlineSeconds": 15},
    )
    return definition


def test_blue_green_switches_at_once_and_rolls_back_to_the_warm_set(agent, app_ids):
    app_id = app_ids.new()
    create_and_settle(agent, blue_green_app(app_id, "blue"))
    blue = {task["id"] for task in agent.wait_for_running(app_id, 2)}

    # Green takes 1.5 s to serve: long enough to watch it wait out of service.
    green_definition = blue_green_app(app_id, "green", cmd=f"sleep 1.5; exec {HTTP_SERVER_CMD}")
    with Sampler(agent, app_id) as sampler:
        green_change = update(agent, app_id, green_definition)
        wait_for_success(agent, green_change["deploymentId"], timeout=20)
    switched_at = time.time()
    samples = sampler.check()

    saw_green_waiting = False
    for _, instances in samples:
        items = by_id(instances)
        green_items = [item for key, item in items.items() if key not in blue]
        in_service = [key for key, item in items.items() if item["inService"]]
        assert len(in_service) == 2, f"blue-green must always have exactly 2 in service: {describe(instances)}"
        if green_items and not all(item["ready"] for item in green_items):
            saw_green_waiting = True
            assert all(item["standby"] and not item["inService"] for item in green_items), describe(instances)
            assert all(items[key]["inService"] for key in blue), describe(instances)
    assert saw_green_waiting, "no sample showed the green set starting beside the blue one"

    items = by_id(instances_of(agent, app_id))
    green = set(items) - blue
    assert len(green) == 2 and blue <= set(items), describe(items.values())
    for key in green:
        assert items[key]["inService"] and not items[key]["standby"], describe(items.values())
    for key in blue:
        item = items[key]
        assert item["standby"] and not item["inService"] and item["state"] == "TASK_RUNNING", item
        left = parse_time(item["standbyUntil"]) - switched_at
        assert 25 <= left <= 31, f"blue stays warm for {left:.1f}s more, not about 30 s: {item}"
    pids = wait_until(lambda: (lambda found: found if len(found) == 4 else None)(agent.instance_leaders(app_id)), timeout=5)

    result = agent.cli("rollback", app_id)
    assert result.returncode == 0, cli_output(result)
    rolled_back_at = time.monotonic()

    def blue_in_service():
        items = by_id(instances_of(agent, app_id))
        return items if all(key in items and items[key]["inService"] for key in blue) else None

    items = wait_until(blue_in_service, timeout=5, interval=0.05, what="the blue set back in service")
    took = time.monotonic() - rolled_back_at
    assert took <= 1.0, f"switching back to the warm blue set took {took:.2f}s"
    assert set(items) == blue | green, "a rollback to a warm set starts no instance"
    for key in green:
        assert items[key]["standby"] and not items[key]["inService"] and items[key].get("standbyUntil"), items[key]
    assert agent.instance_leaders(app_id) == pids, "the rollback must not start or stop processes"
    assert agent.app(app_id)["env"] == {"VERSION": "blue"}
    assert sum(item["inService"] for item in items.values()) == 2


def test_blue_green_old_set_stops_after_keep_old_seconds(agent, app_ids):
    app_id = app_ids.new()
    keep_old = 2
    create_and_settle(agent, blue_green_app(app_id, "blue", instances=1, keep_old=keep_old))
    blue = agent.wait_for_running(app_id, 1)[0]["id"]
    blue_pid = agent.instance_leaders(app_id)[blue]

    change = update(agent, app_id, blue_green_app(app_id, "green", instances=1, keep_old=keep_old))
    wait_for_success(agent, change["deploymentId"])
    switched_at = time.monotonic()
    item = by_id(instances_of(agent, app_id))[blue]
    assert item["standby"] and item.get("standbyUntil"), item

    wait_until(lambda: blue not in by_id(instances_of(agent, app_id)), timeout=keep_old + 5, what="the blue set to stop")
    lived = time.monotonic() - switched_at
    assert lived >= keep_old - 0.5, f"the old set stopped {lived:.1f}s after the switch, before keepOldSeconds={keep_old}"
    wait_until(lambda: not is_alive(blue_pid), timeout=5, what=f"the blue process {blue_pid} to end")
    tasks = agent.running_tasks(app_id, 1)
    assert tasks and tasks[0]["id"] != blue, agent.tasks(app_id)


# --- draining and scaling ----------------------------------------------------------------------


def test_scaled_down_instance_drains_before_sigterm(agent, app_ids, tmp_path):
    app_id = app_ids.new()
    drain = 2
    marks = tmp_path / "terminated"
    marks.mkdir()
    # On SIGTERM each instance writes when it got it, then exits.
    cmd = (
        f"trap 'date +%s.%N > \"$MARKS/$FLOTILLA_INSTANCE_ID\"; exit 0' TERM; "
        "while true; do sleep 0.1; done"
    )
    definition = app_definition(
        app_id, cmd, instances=2, drainSeconds=drain, taskKillGracePeriodSeconds=5, env={"MARKS": str(marks)}
    )
    with EventStream(agent) as events:
        create_and_settle(agent, definition)
        before = {task["id"] for task in agent.wait_for_running(app_id, 2)}
        time.sleep(0.3)  # the traps are set up

        scaled_at = time.time()
        response = agent.put(f"/v2/apps{app_id}", json={"instances": 1})
        assert response.status_code == 200, response.text

        def draining():
            found = [item for item in instances_of(agent, app_id) if item["draining"]]
            return found or None

        seen = wait_until(draining, timeout=3, interval=0.02, what="an instance to show draining")
        seen_at = time.time()
        victim = seen[0]
        assert len(seen) == 1 and victim["id"] in before, seen
        assert seen_at - scaled_at <= 0.5, f"draining showed {seen_at - scaled_at:.2f}s after the scale-down"
        assert victim["state"] == "TASK_KILLING" and victim["inService"] is False, victim
        survivor = (before - {victim["id"]}).pop()
        assert by_id(instances_of(agent, app_id))[survivor]["inService"] is True

        mark = marks / victim["id"]
        wait_until(mark.exists, timeout=drain + 5, what=f"{victim['id']} to get SIGTERM")
        terminated_at = float(wait_until(lambda: mark.read_text().strip(), timeout=2))
        assert terminated_at - seen_at >= drain - 0.2, (
            f"SIGTERM came {terminated_at - seen_at:.2f}s after draining was seen: drainSeconds={drain}"
        )
        assert terminated_at - scaled_at <= drain + 1.0, (
            f"SIGTERM came {terminated_at - scaled_at:.2f}s after the scale-down: drainSeconds={drain}"
        )
        assert not (marks / survivor).exists(), "the instance that stays got SIGTERM"

        event = events.wait_for(
            lambda e: e["eventType"] == "instance_changed_event" and e.get("instanceId") == victim["id"] and e.get("draining") is True,
            timeout=5,
            what=f"instance_changed_event with draining for {victim['id']}",
        )
        assert event["runSpecId"] == app_id and event["inService"] is False, event
    tasks = agent.wait_for_running(app_id, 1, timeout=5)
    assert tasks[0]["id"] == survivor


def test_scaling_alone_does_not_restart_instances(agent, app_ids):
    app_id = app_ids.new()
    app = create_and_settle(agent, web_app(app_id, "1", instances=2))
    config_version = app["versionInfo"]["lastConfigChangeAt"]
    tasks = {task["id"]: task["startedAt"] for task in agent.wait_for_running(app_id, 2)}
    pids = wait_until(lambda: (lambda found: found if len(found) == 2 else None)(agent.instance_leaders(app_id)), timeout=5)

    wait_for_success(agent, update(agent, app_id, {"instances": 3})["deploymentId"])
    now = {task["id"]: task["startedAt"] for task in agent.wait_for_running(app_id, 3)}
    assert {key: now[key] for key in tasks if key in now} == tasks, "scaling up restarted instances"
    leaders = agent.instance_leaders(app_id)
    assert {key: leaders.get(key) for key in pids} == pids, "scaling up replaced processes"
    app = agent.app(app_id)
    assert app["versionInfo"]["lastConfigChangeAt"] == config_version, app["versionInfo"]
    assert app["versionInfo"]["lastScalingAt"] > config_version, app["versionInfo"]

    # A client that echoes the whole app back with only `instances` changed is scaling too.
    echoed = agent.app(app_id)
    echoed["instances"] = 2
    wait_for_success(agent, update(agent, app_id, echoed)["deploymentId"])
    now = {task["id"]: task["startedAt"] for task in agent.wait_for_running(app_id, 2)}
    assert now == tasks, "scaling back down should stop the youngest instance and keep the others as they were"
    assert agent.instance_leaders(app_id) == pids
    assert agent.app(app_id)["versionInfo"]["lastConfigChangeAt"] == config_version
