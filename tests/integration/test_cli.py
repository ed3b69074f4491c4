"""The `flotilla` client commands against a real agent (`--api`)."""

import json
import queue
import re
import subprocess
import threading
import time

import pytest

from support.flotilla import app_definition, wait_until

SLEEP_CMD = "sleep 600"


def yaml_app(app_id: str, *, color: str, instances: int = 1, cpus: float = 0.1) -> str:
    return (
        f"id: {app_id}\n"
        f"cmd: {SLEEP_CMD}\n"
        f"instances: {instances}\n"
        f"cpus: {cpus}\n"
        "mem: 32\n"
        "env:\n"
        f"  COLOR: {color}\n"
    )


def succeeded(result: subprocess.CompletedProcess, what: str) -> subprocess.CompletedProcess:
    assert result.returncode == 0, (
        f"`flotilla {what}` exited with {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    )
    return result


def json_of(agent, *args):
    result = succeeded(agent.cli(*args, "--json"), " ".join(map(str, args)) + " --json")
    try:
        return json.loads(result.stdout)
    except json.JSONDecodeError as error:
        raise AssertionError(f"`flotilla {' '.join(args)} --json` printed invalid JSON ({error}):\n{result.stdout}")


def test_deploy_scale_rollback_destroy(shared_agent, app_ids, tmp_path):
    agent = shared_agent
    app_id = app_ids.new()
    definition = tmp_path / "app.yaml"
    definition.write_text(yaml_app(app_id, color="blue"))

    deployed = succeeded(agent.cli("deploy", definition, "--timeout", "30"), "deploy app.yaml")
    assert "creating" in deployed.stdout and app_id in deployed.stdout, deployed.stdout
    assert "ready" in deployed.stdout, f"no progress printed:\n{deployed.stdout}"
    assert "succeeded" in deployed.stdout, deployed.stdout
    agent.wait_for_running(app_id, 1)

    apps = json_of(agent, "apps")
    assert isinstance(apps, list) and app_id in {app["id"] for app in apps}
    app = json_of(agent, "app", app_id)
    assert app["id"] == app_id and app["env"] == {"COLOR": "blue"}
    tasks = json_of(agent, "tasks")
    assert isinstance(tasks, list) and any(task["appId"] == app_id for task in tasks)
    app_tasks = json_of(agent, "tasks", app_id)
    assert [task["appId"] for task in app_tasks] == [app_id]
    versions = json_of(agent, "versions", app_id)
    assert isinstance(versions, list) and len(versions) == 1 and all(isinstance(v, str) for v in versions)
    deployments = json_of(agent, "deployments")
    assert isinstance(deployments, list)

    succeeded(agent.cli("scale", app_id, 2), "scale")
    agent.wait_for_running(app_id, 2)
    assert agent.app(app_id)["instances"] == 2

    # A configuration change, then back to the configuration before it.
    definition.write_text(yaml_app(app_id, color="green", instances=2))
    succeeded(agent.cli("deploy", definition, "--timeout", "30"), "deploy (changed) app.yaml")
    assert agent.app(app_id)["env"] == {"COLOR": "green"}
    assert len(json_of(agent, "versions", app_id)) == 3

    succeeded(agent.cli("rollback", app_id), "rollback")
    rolled_back = agent.app(app_id)
    assert rolled_back["env"] == {"COLOR": "blue"}, rolled_back["env"]
    assert rolled_back["instances"] == 2
    wait_until(lambda: agent.app(app_id)["deployments"] == [], timeout=20, what="the rollback deployment to finish")
    agent.wait_for_running(app_id, 2)

    succeeded(agent.cli("destroy", app_id), "destroy")
    assert agent.app(app_id) is None

    def tasks_gone():
        return all(task["appId"] != app_id for task in agent.get("/v2/tasks").json()["tasks"])

    wait_until(tasks_gone, timeout=15, what=f"the tasks of {app_id} to end")


def test_unknown_app_fails_with_one_line(shared_agent):
    result = shared_agent.cli("app", "/nope")
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{result.stderr}"
    assert "/nope" in lines[0]


def test_deploy_that_cannot_fit_times_out(shared_agent, app_ids, tmp_path):
    app_id = app_ids.new()
    definition = tmp_path / "huge.yaml"
    definition.write_text(yaml_app(app_id, color="red", cpus=1000))
    started = time.monotonic()
    result = shared_agent.cli("deploy", definition, "--timeout", "3", timeout=30)
    elapsed = time.monotonic() - started
    try:
        assert result.returncode != 0, f"deploy of an app that cannot fit succeeded:\n{result.stdout}"
        assert elapsed < 15, f"--timeout 3 took {elapsed:.1f} s"
        assert result.stderr.strip(), "no reason printed on stderr"
    finally:
        shared_agent.delete(f"/v2/apps{app_id}", params={"force": "true"})


def test_logs_of_an_app_show_stderr(shared_agent, app_ids):
    app_id = app_ids.new()
    shared_agent.create_app(app_definition(app_id, "echo oops >&2; echo fine; sleep 60"))
    shared_agent.wait_for_running(app_id, 1)

    def stderr_shown():
        result = shared_agent.cli("logs", app_id, "--stderr")
        return result if result.returncode == 0 and "oops" in result.stdout else None

    result = wait_until(stderr_shown, timeout=10, what=f"`flotilla logs {app_id} --stderr` to show 'oops'")
    assert "fine" not in result.stdout, "stdout lines in the --stderr output"
    shared_agent.delete(f"/v2/apps{app_id}", params={"force": "true"})


def test_logs_follow(shared_agent, app_ids):
    app_id = app_ids.new()
    shared_agent.create_app(
        app_definition(app_id, 'i=0; while true; do i=$((i+1)); echo "tick $i"; sleep 0.2; done')
    )
    task_id = shared_agent.wait_for_running(app_id, 1)[0]["id"]
    stdout_path = shared_agent.sandbox(task_id) / "stdout"
    wait_until(lambda: stdout_path.exists() and "tick" in stdout_path.read_text(), timeout=10)
    last_before = max(int(n) for n in re.findall(r"tick (\d+)", stdout_path.read_text()))

    follower = subprocess.Popen(
        shared_agent.cli_command("logs", "-f", task_id),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(line) for line in follower.stdout], daemon=True)
    reader.start()
    try:
        seen = []
        deadline = time.monotonic() + 10
        newest = 0
        while time.monotonic() < deadline and newest <= last_before + 3:
            try:
                line = lines.get(timeout=0.5)
            except queue.Empty:
                assert follower.poll() is None, f"logs -f exited early: {follower.stderr.read()}"
                continue
            seen.append(line)
            match = re.match(r"tick (\d+)", line)
            if match:
                newest = max(newest, int(match.group(1)))
        assert seen, "logs -f printed nothing"
        assert newest > last_before + 3, f"logs -f showed no new output; last lines: {seen[-5:]}"
        assert follower.poll() is None, "logs -f should keep following while the instance runs"
    finally:
        follower.terminate()
        try:
            follower.wait(timeout=5)
        except subprocess.TimeoutExpired:
            follower.kill()
            follower.wait()
            pytest.fail("flotilla logs -f ignored SIGTERM")
        shared_agent.delete(f"/v2/apps{app_id}", params={"force": "true"})


def deployments_of(agent, app_id):
    return [d for d in agent.deployments() if app_id in d["affectedApps"]]


def test_changes_follow_their_deployment_so_the_next_command_never_meets_409(shared_agent, app_ids, tmp_path):
    # The README's sequence, run back to back with no waiting in between: each command returns only
    # once its deployment has finished (drainSeconds makes the scale-down take a while).
    agent = shared_agent
    app_id = app_ids.new()
    definition = tmp_path / "app.yaml"
    definition.write_text(yaml_app(app_id, color="blue") + "drainSeconds: 1\n")
    succeeded(agent.cli("deploy", definition, "--timeout", "30"), "deploy")

    scaled = succeeded(agent.cli("scale", app_id, 3, "--timeout", "30"), "scale")
    assert "succeeded" in scaled.stdout and "ready" in scaled.stdout, scaled.stdout
    assert deployments_of(agent, app_id) == [], "scale returned before its deployment ended"
    restarted = succeeded(agent.cli("restart", app_id, "--timeout", "30"), "restart")
    assert "succeeded" in restarted.stdout, restarted.stdout
    down = json_of(agent, "scale", app_id, 1, "--timeout", "30")
    assert down["status"] == "succeeded" and down["deploymentId"], down
    assert len(agent.wait_for_running(app_id, 1)) == 1
    rolled = succeeded(agent.cli("rollback", app_id, "--timeout", "30"), "rollback")
    assert "succeeded" in rolled.stdout, rolled.stdout
    destroyed = succeeded(agent.cli("destroy", app_id, "--timeout", "30"), "destroy")
    assert "succeeded" in destroyed.stdout, destroyed.stdout
    assert not any(task["appId"] == app_id for task in agent.get("/v2/tasks").json()["tasks"]), \
        "destroy returned while instances were still running"


def test_detach_returns_at_once_and_force_overrides(shared_agent, app_ids, tmp_path):
    agent = shared_agent
    app_id = app_ids.new()
    definition = tmp_path / "app.yaml"
    definition.write_text(yaml_app(app_id, color="blue") + "drainSeconds: 5\n")
    succeeded(agent.cli("deploy", definition, "--timeout", "30"), "deploy")
    succeeded(agent.cli("scale", app_id, 2, "--timeout", "30"), "scale")

    detached = json_of(agent, "scale", app_id, 1, "--detach")
    assert detached["deploymentId"] and "status" not in detached, detached
    assert [d["id"] for d in deployments_of(agent, app_id)] == [detached["deploymentId"]], "the scale-down drains for 5 s"

    blocked = agent.cli("restart", app_id)
    assert blocked.returncode != 0 and "locked" in blocked.stderr, blocked.stderr
    forced = json_of(agent, "restart", app_id, "--force", "--detach")
    assert forced["deploymentId"] != detached["deploymentId"]
    succeeded(agent.cli("destroy", app_id, "--force", "--timeout", "30"), "destroy --force")
