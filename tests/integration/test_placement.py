"""Apps that cannot be placed wait in /v2/queue, saying why in Marathon's terms and in words."""

import time

from support.flotilla import app_definition, wait_until

SLEEP_CMD = "sleep 600"


def rejection(item: dict, reason: str) -> dict:
    summary = item["processedOffersSummary"]["rejectSummaryLastOffers"]
    return next((entry for entry in summary if entry["reason"] == reason), {"reason": reason, "declined": 0})


def wait_for_queue_item(agent, app_id, reason: str) -> dict:
    """The app's queue item, once it declares offers declined for `reason`."""

    def item_with_reason():
        item = agent.queue_item(app_id)
        return item if item is not None and rejection(item, reason)["declined"] > 0 else None

    return wait_until(item_with_reason, timeout=10, what=f"{app_id} queued with {reason}")


def test_constraints_and_capacity_keep_apps_queued(make_agent, app_ids):
    agent = make_agent(cpus=1, mem=512, extra_args=["--attribute", "rack=r1"])
    wrong_rack = app_ids.new("wrong-rack")
    unique = app_ids.new("unique")
    too_big = app_ids.new("too-big")
    agent.create_app(app_definition(wrong_rack, SLEEP_CMD, constraints=[["rack", "IS", "r2"]]))
    agent.create_app(app_definition(unique, SLEEP_CMD, instances=2, constraints=[["hostname", "UNIQUE"]]))
    agent.create_app(app_definition(too_big, SLEEP_CMD, cpus=2))

    item = wait_for_queue_item(agent, wrong_rack, "UnfulfilledConstraint")
    assert item["count"] == 1
    reason = item["processedOffersSummary"].get("reason")
    assert isinstance(reason, str) and "rack" in reason and "r2" in reason, reason

    agent.wait_for_running(unique, 1)
    item = wait_for_queue_item(agent, unique, "UnfulfilledConstraint")
    assert item["count"] == 1, "one of the two UNIQUE instances fits on the only node"
    assert "hostname" in item["processedOffersSummary"].get("reason", ""), item["processedOffersSummary"]

    item = wait_for_queue_item(agent, too_big, "InsufficientCpus")
    assert item["count"] == 1
    reason = item["processedOffersSummary"].get("reason")
    assert isinstance(reason, str) and "cpus" in reason, reason

    # They stay that way.
    time.sleep(1.5)
    assert agent.tasks(wrong_rack) == []
    assert agent.tasks(too_big) == []
    assert len(agent.tasks(unique)) == 1
    assert {item["app"]["id"] for item in agent.queue()} == {wrong_rack, unique, too_big}

    for app_id in (wrong_rack, unique, too_big):
        response = agent.delete(f"/v2/apps{app_id}", params={"force": "true"})
        assert response.status_code == 200, response.text
    wait_until(lambda: agent.queue() == [], timeout=10, what="the queue to empty once the apps are deleted")
