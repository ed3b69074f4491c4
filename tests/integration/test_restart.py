"""The agent dies or stops; its instances and its acknowledged state must not be lost.

- kill -9: instances keep running in their own sessions; the next agent adopts them, with the
  same task ids and processes, and launches no duplicate.
- A write the API acknowledged is on disk before the answer.
- SIGTERM: `--on-exit stop` ends the instances with the agent, `--on-exit keep` leaves them to
  the next agent.
"""

import os
import signal
import subprocess
import time

import requests

from support.flotilla import app_definition, is_alive, process_stat, wait_until

HTTP_SERVER_CMD = "python3 -m http.server $PORT0 --bind 127.0.0.1"
SLEEP_CMD = "sleep 600"


def serves_http(port: int) -> bool:
    try:
        return requests.get(f"http://127.0.0.1:{port}/", timeout=2).status_code == 200
    except requests.RequestException:
        return False


def wait_for_leaders(agent, app_id, count: int) -> dict:
    """{task id: pid} once the app has exactly `count` instance session leaders."""

    def leaders():
        found = agent.instance_leaders(app_id)
        return found if len(found) == count else None

    return wait_until(leaders, timeout=5, what=f"{count} instance session leaders of {app_id}")


def app_sessions_only(agent, app_id, leaders: dict) -> None:
    """Every process carrying the app's FLOTILLA_APP_ID belongs to one of `leaders`' sessions."""
    sessions = set(leaders.values())
    for pid, environment in agent.instance_processes().items():
        if environment.get("FLOTILLA_APP_ID") != app_id:
            continue
        stat = process_stat(pid)
        if stat is None:
            continue  # ended meanwhile
        session = stat[1]
        assert session in sessions, (
            f"process {pid} of {app_id} (instance {environment.get('FLOTILLA_INSTANCE_ID')}) "
            f"is in session {session}, not one of the known instances {leaders}"
        )


def test_kill9_and_restart_adopts_running_instances(make_agent, app_ids):
    agent = make_agent()
    app_id = app_ids.new("web")
    stuck_id = app_ids.new("stuck")

    # Two versions of the app (created, then scaled), and a deployment that cannot finish.
    agent.create_app(app_definition(app_id, HTTP_SERVER_CMD, instances=1, portDefinitions=[{"port": 0}]))
    agent.wait_for_running(app_id, 1)
    scaled = agent.put(f"/v2/apps{app_id}", json={"instances": 3})
    assert scaled.status_code == 200, scaled.text
    tasks = agent.wait_for_running(app_id, 3)
    wait_until(lambda: agent.app(app_id)["deployments"] == [], timeout=10, what="the scaling deployment to finish")
    versions_before = agent.get(f"/v2/apps{app_id}/versions").json()["versions"]
    assert len(versions_before) == 2, versions_before

    stuck = agent.create_app(app_definition(stuck_id, SLEEP_CMD, cpus=1000))
    stuck_deployment = stuck["deployments"][0]["id"]
    assert stuck_deployment in {d["id"] for d in agent.deployments()}

    task_ids = {task["id"] for task in tasks}
    ports = {task["id"]: task["ports"][0] for task in tasks}
    started_at = {task["id"]: task["startedAt"] for task in tasks}
    leaders = wait_for_leaders(agent, app_id, 3)
    assert set(leaders) == task_ids
    for task_id, port in ports.items():
        wait_until(lambda: serves_http(port), timeout=10, what=f"{task_id} to serve HTTP on {port}")

    agent.kill9()

    for task_id, pid in leaders.items():
        assert is_alive(pid), f"instance {task_id} (pid {pid}) died with the agent"
    assert agent.instance_leaders(app_id) == leaders
    for task_id, port in ports.items():
        assert serves_http(port), f"{task_id} stopped serving on {port} while the agent was down"

    agent.restart()

    def adopted():
        now = agent.tasks(app_id)
        if {task["id"] for task in now} == task_ids and all(t["state"] == "TASK_RUNNING" for t in now):
            return now
        return None

    after = wait_until(adopted, timeout=10, what=f"the same 3 tasks of {app_id} running after the restart")
    assert {task["id"]: task["startedAt"] for task in after} == started_at, "adopted tasks keep their start time"
    assert {task["id"]: task["ports"][0] for task in after} == ports
    assert agent.instance_leaders(app_id) == leaders, "the restarted agent must adopt the same processes"
    # A few reconcile passes later: still the same three, nothing launched twice.
    time.sleep(2.5)
    assert {task["id"] for task in agent.tasks(app_id)} == task_ids
    assert agent.instance_leaders(app_id) == leaders
    app_sessions_only(agent, app_id, leaders)
    for task_id, port in ports.items():
        assert serves_http(port), f"{task_id} does not serve on {port} after the restart"

    # The state from before the kill is all there.
    assert agent.get(f"/v2/apps{app_id}/versions").json()["versions"] == versions_before
    assert stuck_deployment in {d["id"] for d in agent.deployments()}, "a deployment was lost in the restart"
    assert agent.app(stuck_id)["deployments"] == [{"id": stuck_deployment}]

    # An adopted instance that dies is noticed and replaced.
    victim_id, victim_pid = sorted(leaders.items())[0]
    os.killpg(victim_pid, signal.SIGKILL)

    def replaced():
        now = agent.running_tasks(app_id, 3)
        if now is None:
            return None
        ids = {task["id"] for task in now}
        return now if victim_id not in ids and len(ids - task_ids) == 1 else None

    wait_until(replaced, timeout=15, what=f"{victim_id} (killed) to be replaced by one new task")
    failure = agent.app(app_id).get("lastTaskFailure")
    assert failure is not None and failure["taskId"] == victim_id, failure
    now = agent.instance_leaders(app_id)
    assert len(now) == 3 and victim_pid not in now.values(), now
    assert {task_id: pid for task_id, pid in now.items() if task_id != victim_id and task_id in leaders} == {
        task_id: pid for task_id, pid in leaders.items() if task_id != victim_id
    }


def test_instance_that_died_while_the_agent_was_down_is_replaced(make_agent, app_ids):
    agent = make_agent()
    app_id = app_ids.new()
    agent.create_app(app_definition(app_id, SLEEP_CMD, instances=2))
    task_ids = {task["id"] for task in agent.wait_for_running(app_id, 2)}
    leaders = wait_for_leaders(agent, app_id, 2)

    agent.kill9()
    victim_id, victim_pid = sorted(leaders.items())[0]
    os.killpg(victim_pid, signal.SIGKILL)
    wait_until(lambda: not is_alive(victim_pid), timeout=5, what=f"pid {victim_pid} to end")
    agent.restart()

    def replaced():
        now = agent.running_tasks(app_id, 2)
        if now is None:
            return None
        ids = {task["id"] for task in now}
        return now if victim_id not in ids and len(ids - task_ids) == 1 else None

    wait_until(replaced, timeout=15, what=f"{victim_id}, dead before the restart, to be replaced")
    failure = agent.app(app_id).get("lastTaskFailure")
    assert failure is not None and failure["taskId"] == victim_id, failure
    assert failure["state"] == "TASK_LOST", failure
    survivor_id = next(task_id for task_id in leaders if task_id != victim_id)
    now = agent.instance_leaders(app_id)
    assert len(now) == 2 and now[survivor_id] == leaders[survivor_id], now


def test_acknowledged_write_survives_kill9(make_agent, app_ids):
    agent = make_agent()
    app_id = app_ids.new()
    created = agent.create_app(app_definition(app_id, SLEEP_CMD, instances=0))
    agent.kill9()
    agent.restart()

    response = agent.get(f"/v2/apps{app_id}")
    assert response.status_code == 200, f"the app acknowledged before the kill is gone: {response.text}"
    app = response.json()["app"]
    assert app["version"] == created["version"]
    assert app["instances"] == 0
    assert agent.get(f"/v2/apps{app_id}/versions").json()["versions"] == [created["version"]]


def test_sigterm_with_on_exit_stop_ends_the_instances(make_agent, app_ids):
    agent = make_agent(on_exit="stop")
    app_id = app_ids.new()
    agent.create_app(app_definition(app_id, SLEEP_CMD, instances=2))
    agent.wait_for_running(app_id, 2)
    leaders = wait_for_leaders(agent, app_id, 2)

    started = time.monotonic()
    agent.process.send_signal(signal.SIGTERM)
    try:
        code = agent.process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        raise AssertionError("the agent did not end within 10 s of SIGTERM") from None
    elapsed = time.monotonic() - started

    assert code == 0, f"the agent exited with {code} after SIGTERM"
    assert elapsed < 10
    for task_id, pid in leaders.items():
        assert not is_alive(pid), f"instance {task_id} (pid {pid}) outlived an agent run with --on-exit stop"
    assert agent.instance_processes() == {}


def test_sigterm_with_on_exit_stop_kills_instances_that_ignore_sigterm(make_agent, app_ids):
    agent = make_agent(on_exit="stop")
    app_id = app_ids.new()
    # SIG_IGN is inherited through exec, so the whole instance ignores SIGTERM.
    agent.create_app(
        app_definition(app_id, "trap '' TERM; while true; do sleep 1; done", taskKillGracePeriodSeconds=2)
    )
    agent.wait_for_running(app_id, 1)
    leader = wait_for_leaders(agent, app_id, 1)

    started = time.monotonic()
    agent.process.send_signal(signal.SIGTERM)
    try:
        code = agent.process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        raise AssertionError("the agent did not end within 10 s of SIGTERM") from None
    elapsed = time.monotonic() - started

    assert code == 0, f"the agent exited with {code} after SIGTERM"
    assert elapsed >= 1.5, f"the agent ended after {elapsed:.1f} s, before the instance's 2 s grace period"
    assert agent.instance_processes() == {}, f"instance {leader} survived SIGKILL after its grace period"


def test_sigterm_with_on_exit_keep_leaves_instances_to_the_next_agent(make_agent, app_ids):
    agent = make_agent(on_exit="keep")
    app_id = app_ids.new()
    agent.create_app(app_definition(app_id, SLEEP_CMD, instances=2))
    task_ids = {task["id"] for task in agent.wait_for_running(app_id, 2)}
    leaders = wait_for_leaders(agent, app_id, 2)

    assert agent.stop(), "the agent did not end within 10 s of SIGTERM"
    assert agent.process.returncode == 0, f"the agent exited with {agent.process.returncode} after SIGTERM"
    for task_id, pid in leaders.items():
        assert is_alive(pid), f"instance {task_id} (pid {pid}) stopped with an agent run with --on-exit keep"

    # The next agent adopts them; this one stops them when it ends.
    agent.restart(on_exit="stop")
    wait_until(
        lambda: agent.running_tasks(app_id, 2),
        timeout=10,
        what="the two tasks running again after the restart",
    )
    assert {task["id"] for task in agent.tasks(app_id)} == task_ids
    assert agent.instance_leaders(app_id) == leaders

    assert agent.stop(), "the agent did not end within 10 s of SIGTERM"
    assert agent.instance_processes() == {}
