"""What an instance sees (environment, ports) and what happens to its output (rotation)."""

import os
import pwd
from pathlib import Path

import pytest

from support.flotilla import app_definition, wait_until

MIB = 1024 * 1024


def test_environment_and_ports(agent, app_ids):
    app_id = app_ids.new()
    agent.create_app(
        app_definition(
            app_id,
            "env; sleep 60",
            portDefinitions=[{"port": 0, "name": "http"}, {"port": 0}],
            env={"GREETING": "hi"},
        )
    )
    task = agent.wait_for_running(app_id, 1)[0]

    def printed_environment():
        response = agent.get(f"/flotilla/v1/logs/{task['id']}", params={"stream": "stdout", "lines": 1000})
        if response.status_code != 200:
            return None
        environment = dict(line.split("=", 1) for line in response.text.splitlines() if "=" in line)
        return environment if "MESOS_TASK_ID" in environment else None

    environment = wait_until(printed_environment, timeout=10, what=f"the environment {task['id']} printed")

    ports = task["ports"]
    assert len(ports) == 2 and ports[0] != ports[1], ports
    assert all(port in agent.task_ports for port in ports), f"{ports} not in the agent's range"
    assert environment.get("PORT0") == str(ports[0])
    assert environment.get("PORT1") == str(ports[1])
    assert environment.get("PORT") == str(ports[0])
    assert environment.get("PORTS") == f"{ports[0]},{ports[1]}"
    assert environment.get("PORT_HTTP") == str(ports[0])
    assert environment.get("HOST") == task["host"] == "127.0.0.1"
    assert environment.get("MARATHON_APP_ID") == app_id
    assert environment.get("MESOS_TASK_ID") == task["id"]
    assert environment.get("GREETING") == "hi"
    # The agent's own environment (pytest's included) does not leak into instances.
    assert "PYTEST_CURRENT_TEST" not in environment


def test_output_is_rotated_past_the_size_limit(make_agent, app_ids):
    agent = make_agent(extra_args=["--log-max-mib", "1"])
    app_id = app_ids.new()
    # About 3 MiB of output at once, then quiet.
    cmd = r'''python3 -c "import sys,time; [sys.stdout.write('x'*1023+'\n') for _ in range(3000)]; sys.stdout.flush(); time.sleep(60)"'''
    agent.create_app(app_definition(app_id, cmd))
    task = agent.wait_for_running(app_id, 1)[0]
    sandbox = agent.sandbox(task["id"])

    def rotated():
        current, first = sandbox / "stdout", sandbox / "stdout.1"
        if first.exists() and current.exists() and current.stat().st_size < 1.5 * MIB:
            return {"stdout": current.stat().st_size, "stdout.1": first.stat().st_size}
        return None

    sizes = wait_until(rotated, timeout=10, what=f"{sandbox}/stdout to be rotated to stdout.1")
    assert sizes["stdout.1"] > MIB, f"stdout.1 holds {sizes['stdout.1']} bytes; a rotated file passed 1 MiB"


@pytest.mark.skipif(os.geteuid() != 0, reason="only an agent running as root can run instances as another user")
def test_user_runs_the_instance_as_that_user(agent, app_ids):
    app_id = app_ids.new()
    nobody = pwd.getpwnam("nobody")
    # The user must be able to reach its sandbox: the test's temporary directories are private.
    for directory in [agent.sandbox_root, *agent.sandbox_root.parents]:
        if directory == Path("/tmp"):
            break
        directory.chmod(directory.stat().st_mode | 0o011)
    agent.create_app(app_definition(app_id, "id -u; touch $MESOS_SANDBOX/written; sleep 60", user="nobody"))
    task = agent.wait_for_running(app_id, 1)[0]
    wait_until(lambda: (agent.sandbox(task["id"]) / "written").exists(), timeout=10, what="the instance to write its own sandbox")
    pid = agent.instance_leaders(app_id)[task["id"]]
    uid_line = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("Uid:"))
    assert uid_line.split()[1:3] == [str(nobody.pw_uid)] * 2, uid_line
    assert agent.app(app_id)["user"] == "nobody"


def test_user_that_does_not_exist_is_refused(agent, app_ids):
    response = agent.post("/v2/apps", json=app_definition(app_ids.new(), "sleep 60", user="no-such-user-here"))
    assert response.status_code == 422, response.text
    assert response.json()["details"][0]["path"] == "/user"
    assert "no-such-user-here" in response.text


def cgroup_file(pid, controller, v1_name, v2_name):
    """The text of a cgroup control file of the process (cgroup v1 or v2), or None."""
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        number, controllers, path = line.split(":", 2)
        if number == "0" and controllers == "":
            candidate = Path("/sys/fs/cgroup") / path.lstrip("/") / v2_name
        elif controller in controllers.split(","):
            candidate = Path("/sys/fs/cgroup") / controllers / path.lstrip("/") / v1_name
        else:
            continue
        if candidate.exists():
            return candidate.read_text().strip()
    return None


def test_resource_limits_set_the_cgroup_limits(agent, app_ids):
    app_id = app_ids.new()
    agent.create_app(app_definition(app_id, "sleep 60", mem=32, cpus=0.1, resourceLimits={"mem": 48, "cpus": 0.5}))
    task = agent.wait_for_running(app_id, 1)[0]
    pid = agent.instance_leaders(app_id)[task["id"]]
    memory = cgroup_file(pid, "memory", "memory.limit_in_bytes", "memory.max")
    if memory is None:
        pytest.skip("this agent runs without cgroups (no permission to create them)")
    assert int(memory) == 48 * 1024 * 1024, "resourceLimits.mem is the hard limit, above mem"
    quota = cgroup_file(pid, "cpu", "cpu.cfs_quota_us", "cpu.max")
    assert quota.split()[0] == "50000", f"resourceLimits.cpus 0.5 is a CFS quota of half a period: {quota}"
    assert agent.app(app_id)["resourceLimits"] == {"mem": 48, "cpus": 0.5}

    unlimited = app_ids.new()
    agent.create_app(app_definition(unlimited, "sleep 60", mem=32, resourceLimits={"mem": "unlimited"}))
    task = agent.wait_for_running(unlimited, 1)[0]
    pid = agent.instance_leaders(unlimited)[task["id"]]
    memory = cgroup_file(pid, "memory", "memory.limit_in_bytes", "memory.max")
    assert memory == "max" or int(memory) > 1 << 40, f"no memory limit: {memory}"
