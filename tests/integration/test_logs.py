"""An app's logs merged across its instances (GET /flotilla/v1/logs?app=), their filters, a
follower across a rolling restart, and retention of ended instances' logs."""

import json
import os
import re
import signal
import threading
import time
from datetime import datetime, timedelta, timezone

import requests

from support.flotilla import app_definition, wait_until

LINE = re.compile(r"^(\S+) (\S+) (.*)$")


def parse_time(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def rfc3339(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def app_logs(agent, app_id, **params):
    params.setdefault("lines", 100000)
    return agent.get("/flotilla/v1/logs", params={"app": app_id, **params})


def json_lines(response) -> list:
    assert response.status_code == 200, f"{response.status_code} {response.text}"
    assert response.headers["Content-Type"].startswith("application/x-ndjson")
    return [json.loads(line) for line in response.text.splitlines() if line]


def test_merged_logs_have_every_line_with_its_instance_and_time(agent, app_ids):
    app_id = app_ids.new()
    started = datetime.now(timezone.utc) - timedelta(seconds=1)
    # Numbered lines over a couple of seconds, so samples date them at different times.
    agent.create_app(
        app_definition(app_id, 'for i in $(seq 1 20); do echo "line $i"; sleep 0.1; done; sleep 60', instances=3)
    )
    tasks = agent.wait_for_running(app_id, 3)
    ids = {task["id"] for task in tasks}

    def all_lines():
        response = app_logs(agent, app_id, stream="stdout")
        assert response.status_code == 200, f"{response.status_code} {response.text}"
        lines = response.text.splitlines()
        return lines if len(lines) == 60 else None

    lines = wait_until(all_lines, timeout=20, what="60 merged lines of 3 instances")
    seen = {instance: [] for instance in ids}
    times = []
    for text in lines:
        match = LINE.match(text)
        assert match, f"not 'time instance line': {text!r}"
        moment, instance, line = match.groups()
        assert instance in ids, f"{instance} is not one of {ids}"
        times.append(parse_time(moment))
        seen[instance].append(line)
    for instance, printed in seen.items():
        assert printed == [f"line {i}" for i in range(1, 21)], f"{instance}: {printed}"
    assert times == sorted(times), "merged lines are not in time order"
    assert started <= times[0] and times[-1] <= datetime.now(timezone.utc) + timedelta(seconds=1), (times[0], times[-1])

    # NDJSON: one object per line with its time, instance, app, node and stream.
    objects = json_lines(app_logs(agent, app_id, stream="stdout", format="json"))
    assert len(objects) == 60
    for item in objects:
        assert set(item) == {"time", "instance", "app", "node", "stream", "line"}, item
        assert item["app"] == app_id and item["instance"] in ids and item["stream"] == "stdout"
        assert item["node"] == agent.node_name
        parse_time(item["time"])
    # lines= keeps the newest of the merged lines.
    newest = json_lines(app_logs(agent, app_id, stream="stdout", format="json", lines=5))
    assert [item["line"] for item in newest] == [item["line"] for item in objects[-5:]]


def test_since_until_grep_and_stream_filter(agent, app_ids):
    app_id = app_ids.new()
    agent.create_app(
        app_definition(
            app_id,
            "for i in 1 2 3; do echo early $i; echo oops $i >&2; done; sleep 4; for i in 1 2 3; do echo late $i; done; sleep 60",
        )
    )
    agent.wait_for_running(app_id, 1)

    def everything():
        objects = json_lines(app_logs(agent, app_id, format="json"))
        return objects if sum(item["line"].startswith("late") for item in objects) == 3 else None

    objects = wait_until(everything, timeout=20, what="the late lines")
    assert {item["stream"] for item in objects} == {"stdout", "stderr"}, "stream=both is the default"
    early = max(parse_time(item["time"]) for item in objects if item["line"].startswith("early"))
    late = min(parse_time(item["time"]) for item in objects if item["line"].startswith("late"))
    assert late - early > timedelta(seconds=2), f"early lines dated up to {early}, late ones from {late}"
    middle = rfc3339(early + (late - early) / 2)

    def lines(**params):
        return [item["line"] for item in json_lines(app_logs(agent, app_id, format="json", **params))]

    assert lines(since=middle, stream="stdout") == ["late 1", "late 2", "late 3"]
    assert lines(until=middle, stream="stdout") == ["early 1", "early 2", "early 3"]
    # A duration back from now: everything is younger than an hour.
    assert len(lines(since="1h")) == 9
    assert lines(since="1h", stream="stderr") == ["oops 1", "oops 2", "oops 3"]
    assert lines(grep="late 2") == ["late 2"]
    assert lines(grep="^(early|late) [13]$", regex="true") == ["early 1", "early 3", "late 1", "late 3"]
    # Without regex=true the pattern is plain text.
    assert lines(grep="^(early|late) [13]$") == []
    # Text form with both streams names the stream after the instance.
    text = app_logs(agent, app_id, grep="oops 1").text.splitlines()
    assert len(text) == 1 and LINE.match(text[0]).group(2).endswith(":stderr"), text


def test_bad_input_is_400_and_an_unknown_app_404(agent, app_ids):
    app_id = app_ids.new()
    agent.create_app(app_definition(app_id, "echo hi; sleep 60"))
    agent.wait_for_running(app_id, 1)
    for params in [
        {"stream": "stdin"},
        {"since": "yesterday"},
        {"until": "10 minutes"},
        {"grep": "(", "regex": "true"},
        {"lines": "many"},
        {"format": "xml"},
    ]:
        response = app_logs(agent, app_id, **params)
        assert response.status_code == 400, f"{params}: {response.status_code} {response.text}"
        assert response.json()["message"], params
    assert agent.get("/flotilla/v1/logs").status_code == 400
    missing = app_logs(agent, app_ids.new("missing"))
    assert missing.status_code == 404, missing.text


def test_follow_across_a_rolling_restart_loses_no_line(agent, app_ids):
    app_id = app_ids.new()
    agent.create_app(
        app_definition(
            app_id,
            'i=0; while true; do i=$((i+1)); echo "$MESOS_TASK_ID $i"; sleep 0.05; done',
            instances=3,
        )
    )
    old = {task["id"] for task in agent.wait_for_running(app_id, 3)}
    received = []
    stop = threading.Event()
    response = requests.get(
        agent.url + "/flotilla/v1/logs",
        params={"app": app_id, "follow": "true", "format": "json", "stream": "stdout", "lines": 1000000},
        stream=True,
        timeout=60,
    )
    assert response.status_code == 200, response.text

    def read():
        try:
            for line in response.iter_lines():
                if stop.is_set():
                    break
                if line:
                    received.append(json.loads(line))
        except (requests.exceptions.ConnectionError, requests.exceptions.ChunkedEncodingError, AttributeError):
            pass

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        wait_until(lambda: {item["instance"] for item in received} >= old, timeout=10, what="lines of the old instances")
        restart = agent.post(f"/v2/apps{app_id}/restart")
        assert restart.status_code == 200, restart.text

        def replaced():
            tasks = agent.running_tasks(app_id, 3)
            return tasks if tasks and not ({task["id"] for task in tasks} & old) else None

        new = {task["id"] for task in wait_until(replaced, timeout=60, what="3 new instances")}
        wait_until(lambda: not agent.deployments(), timeout=30, what="the restart's deployment to end")
        wait_until(
            lambda: {item["instance"] for item in received} >= new, timeout=10, what="lines of the new instances in the follow"
        )
        time.sleep(2)
    finally:
        stop.set()
        response.close()
        reader.join(timeout=5)

    by_instance = {}
    for item in list(received):
        instance, number = item["line"].split(" ")
        assert instance == item["instance"], item
        by_instance.setdefault(instance, []).append(int(number))
    assert set(by_instance) == old | new, f"followed {set(by_instance)}, expected {old | new}"
    for instance, numbers in by_instance.items():
        assert numbers == list(range(1, len(numbers) + 1)), f"{instance}: lines lost or out of order: {numbers}"
        written = (agent.sandbox(instance) / "stdout").read_text().splitlines()
        if instance in old:
            # Ended: the follower got every line it wrote.
            assert len(numbers) == len(written), f"{instance} wrote {len(written)} lines, the follower got {len(numbers)}"
        else:
            assert numbers, f"no line of the new instance {instance}"


def test_ended_instance_logs_stay_until_retention(make_agent, app_ids):
    agent = make_agent(extra_args=["--log-retention", "10s"])
    app_id = app_ids.new()
    agent.create_app(app_definition(app_id, 'echo "hello from $MESOS_TASK_ID"; sleep 60'))
    task_id = agent.wait_for_running(app_id, 1)[0]["id"]
    wait_until(lambda: "hello" in agent.get(f"/flotilla/v1/logs/{task_id}").text, timeout=10)
    assert agent.delete(f"/v2/apps{app_id}", params={"force": "true"}).status_code == 200
    wait_until(lambda: not agent.instance_leaders(app_id), timeout=20, what="the instance to end")
    wait_until(lambda: agent.app(app_id) is None, timeout=10)

    # Gone from the store, its logs are still read by its id, and with its app's.
    answer = agent.get(f"/flotilla/v1/logs/{task_id}")
    assert answer.status_code == 200 and f"hello from {task_id}" in answer.text, answer.text
    merged = app_logs(agent, app_id, stream="stdout")
    assert merged.status_code == 200 and f"hello from {task_id}" in merged.text, merged.text

    sandbox = agent.sandbox(task_id)
    wait_until(lambda: not (sandbox / "stdout").exists(), timeout=40, what="retention to remove the ended instance's log")
    assert agent.get(f"/flotilla/v1/logs/{task_id}").status_code == 404


def test_retention_by_size_removes_rotated_files(make_agent, app_ids):
    # The age (20 s) only sets how often retention runs (every 5 s): the size removes the file first.
    agent = make_agent(extra_args=["--log-max-mib", "1", "--log-retention", "20s,1MiB"])
    app_id = app_ids.new()
    cmd = r'''python3 -c "import sys,time; [sys.stdout.write('x'*1023+'\n') for _ in range(3000)]; sys.stdout.flush(); time.sleep(60)"'''
    agent.create_app(app_definition(app_id, cmd))
    task_id = agent.wait_for_running(app_id, 1)[0]["id"]
    sandbox = agent.sandbox(task_id)

    def rotated_and_removed():
        current = sandbox / "stdout"
        rotated = [path for path in sandbox.iterdir() if re.fullmatch(r"std(out|err)\.\d+(\.times)?", path.name)]
        return current.exists() and current.stat().st_size < 1024 * 1024 and not rotated

    wait_until(rotated_and_removed, timeout=14, what="stdout rotated and its rotated copy removed by the 1 MiB budget")
    assert agent.is_running()


def test_cli_logs_of_an_app(agent, app_ids):
    app_id = app_ids.new()
    agent.create_app(app_definition(app_id, 'echo "ERROR from $MESOS_TASK_ID"; echo fine; sleep 60', instances=2))
    ids = {task["id"] for task in agent.wait_for_running(app_id, 2)}

    def printed():
        result = agent.cli("logs", app_id, "--grep", "ERROR", "--since", "10m")
        return result if result.returncode == 0 and len(result.stdout.splitlines()) == 2 else None

    result = wait_until(printed, timeout=15, what="`flotilla logs APP --grep ERROR` to print both instances' lines")
    instances = set()
    for line in result.stdout.splitlines():
        match = LINE.match(line)
        assert match and "\x1b[" not in line, f"not a plain 'time instance line': {line!r}"
        instances.add(match.group(2).split(":")[0])
        assert match.group(3).startswith("ERROR from")
    assert instances == ids
    as_json = agent.cli("logs", app_id, "--grep", "ERROR", "--json")
    assert as_json.returncode == 0, as_json.stderr
    objects = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert {item["instance"] for item in objects} == ids and all(item["line"].startswith("ERROR") for item in objects)
    bad = agent.cli("logs", app_id, "--since", "soon")
    assert bad.returncode != 0 and "since" in bad.stderr, bad.stderr


def test_a_cluster_merges_every_node_and_names_one_that_is_down(etcd, make_agent, app_ids):
    agents = [
        make_agent(bind=f"127.0.0.{number}", node_name=f"node-{number}", extra_args=["--store", etcd.store_url, "--server"])
        for number in (2, 3)
    ]
    asked, other = agents
    app_id = app_ids.new()
    asked.create_app(
        app_definition(
            app_id, 'echo "hello from $MESOS_TASK_ID"; sleep 120', instances=2, constraints=[["hostname", "GROUP_BY"]],
            unreachableStrategy={"inactiveAfterSeconds": 600, "expungeAfterSeconds": 600},
        )
    )

    def both_nodes():
        response = app_logs(asked, app_id, format="json", stream="stdout")
        if response.status_code != 200:
            return None
        objects = json_lines(response)
        return objects if {item["node"] for item in objects} == {"node-2", "node-3"} else None

    objects = wait_until(both_nodes, timeout=45, what="lines of both nodes' instances through node-2")
    assert all(item["line"] == f"hello from {item['instance']}" for item in objects), objects
    assert "X-Flotilla-Missing-Nodes" not in app_logs(asked, app_id).headers

    os.kill(other.process.pid, signal.SIGSTOP)
    try:
        def down():
            nodes = {node["name"]: node for node in asked.get("/flotilla/v1/nodes").json()}
            return nodes.get("node-3", {}).get("status") == "down"

        wait_until(down, timeout=30, what="node-3 shown down")
        response = app_logs(asked, app_id, stream="stdout")
        assert response.status_code == 200, response.text
        assert response.headers.get("X-Flotilla-Missing-Nodes") == "node-3", dict(response.headers)
        assert response.text.startswith("# node node-3: "), response.text
        assert "hello from" in response.text, "node-2's lines are still there"
        notices = [item for item in json_lines(app_logs(asked, app_id, format="json")) if "error" in item]
        assert [notice["node"] for notice in notices] == ["node-3"], notices
    finally:
        os.kill(other.process.pid, signal.SIGCONT)
