"""Instances that fail: killed for exceeding their memory, or crashing in a loop under backoff."""

import time

import pytest

from support.flotilla import app_definition, wait_until

NO_CGROUPS_LOG_LINE = "running instances without resource limits"


def test_oom_killed_instance_is_reported_as_failed(agent, app_ids):
    if NO_CGROUPS_LOG_LINE in agent.log_text():
        pytest.skip("cgroups are unavailable here: the agent runs instances without memory limits")
    app_id = app_ids.new()
    agent.create_app(
        app_definition(
            app_id,
            'python3 -c "b=bytearray(300*1024*1024); import time; time.sleep(60)"',
            mem=32,
        )
    )
    failure = wait_until(
        lambda: agent.app(app_id).get("lastTaskFailure"),
        timeout=30,
        what=f"a lastTaskFailure for {app_id}",
    )
    assert failure["state"] == "TASK_FAILED", failure
    assert "OOM" in failure["message"], failure
    assert failure["appId"] == app_id


def test_crashing_app_is_relaunched_with_backoff(agent, app_ids):
    app_id = app_ids.new()
    agent.create_app(app_definition(app_id, "sh -c 'exit 3'", backoffSeconds=1, backoffFactor=2))

    failed_task_ids = set()
    failures = []
    delays = []
    started = time.monotonic()
    while time.monotonic() - started < 6.5:
        failure = agent.app(app_id).get("lastTaskFailure")
        if failure and failure["taskId"] not in failed_task_ids:
            failed_task_ids.add(failure["taskId"])
            failures.append(failure)
        item = agent.queue_item(app_id)
        if item is not None:
            delays.append(item["delay"]["timeLeftSeconds"])
        time.sleep(0.1)

    assert failures, f"{app_id} never reported a failure"
    for failure in failures:
        assert failure["state"] == "TASK_FAILED", failure
        assert "exited with status 3" in failure["message"], failure
    assert any(delay > 0 for delay in delays), (
        f"/v2/queue never showed {app_id} waiting out a backoff delay; delays seen: {delays}"
    )
    # Delays of 1, 2, 4 s: about 3 launches in 6.5 s; without backoff there would be dozens.
    assert 2 <= len(failed_task_ids) <= 5, (
        f"{len(failed_task_ids)} launches of {app_id} in 6.5 s: {sorted(failed_task_ids)}"
    )
