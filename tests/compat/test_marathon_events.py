"""Marathon's event bus beyond the stream: HTTP callback subscriptions (through the `marathon`
client), delivery with retries, and the event types clients wait for."""

import json
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from support.events import EventStream
from support.flotilla import wait_until
from test_marathon import SLEEP_CMD, TASK_RESOURCES, wait_for_running_tasks


@pytest.fixture
def callback():
    """An HTTP server that records each event POSTed to it; it fails the first `fail_first`."""
    received = []
    state = {"fail_first": 0, "failed": 0}

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if state["failed"] < state["fail_first"]:
                state["failed"] += 1
                self.send_response(500)
            else:
                received.append((self.headers.get("Content-Type"), json.loads(body)))
                self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/callback", received, state
    server.shutdown()
    server.server_close()


def events_of(received, event_type):
    return [event for _, event in received if event.get("eventType") == event_type]


def test_http_callbacks_receive_every_event(client, agent, app_ids, callback):
    url, received, _ = callback
    subscribed = client.create_event_subscription(url)
    assert subscribed["eventType"] == "subscribe_event" and subscribed["callbackUrl"] == url
    assert url in client.list_event_subscriptions()
    assert client.get_info().event_subscriber.type == "http_callback"
    try:
        app_id = app_ids.new()
        agent.post("/v2/apps", json={"id": app_id, "cmd": SLEEP_CMD, **TASK_RESOURCES})
        wait_for_running_tasks(client, app_id, 1)
        wait_until(lambda: [e for e in events_of(received, "deployment_success")], timeout=10, what="deployment_success at the callback")
        assert [e for e in events_of(received, "api_post_event") if e["appDefinition"]["id"] == app_id]
        assert [e for e in events_of(received, "status_update_event") if e["appId"] == app_id and e["taskStatus"] == "TASK_RUNNING"]
        assert all(content_type.startswith("application/json") for content_type, _ in received)
    finally:
        unsubscribed = client.delete_event_subscription(url)
    assert unsubscribed["eventType"] == "unsubscribe_event"
    assert url not in client.list_event_subscriptions()


def test_a_failed_callback_is_retried(client, agent, app_ids, callback):
    url, received, state = callback
    state["fail_first"] = 2
    client.create_event_subscription(url)
    try:
        app_id = app_ids.new()
        agent.post("/v2/apps", json={"id": app_id, "cmd": SLEEP_CMD, "instances": 0, **TASK_RESOURCES})
        wait_until(lambda: [e for e in events_of(received, "api_post_event") if e["appDefinition"]["id"] == app_id],
                   timeout=10, what="the event delivered on its third attempt")
        assert state["failed"] == 2
    finally:
        client.delete_event_subscription(url)


def test_bad_callback_urls_are_refused(agent):
    reply = agent.post("/v2/eventSubscriptions", params={"callbackUrl": "ftp://example/x"})
    assert reply.status_code == 422, reply.text
    assert agent.post("/v2/eventSubscriptions").status_code == 422


def test_deployment_steps_groups_health_and_termination_events(client, agent, app_ids):
    group = f"/events-{uuid.uuid4().hex[:8]}"
    health = {"protocol": "COMMAND", "command": {"value": "test -f $MESOS_SANDBOX/ok"}, "gracePeriodSeconds": 0, "intervalSeconds": 1,
              "timeoutSeconds": 1, "maxConsecutiveFailures": 0}
    with EventStream(agent) as events:
        other = EventStream(agent)
        other.start()
        other.close()
        # A closed stream is noticed at the next write: a heartbeat comes every 5 s.
        events.wait_for(lambda e: e["eventType"] == "event_stream_detached", timeout=20, what="event_stream_detached of the other stream")

        reply = agent.post("/v2/groups", json={"id": group, "apps": [
            {"id": "db", "cmd": "touch $MESOS_SANDBOX/ok; sleep 600", **TASK_RESOURCES, "healthChecks": [health]},
            {"id": "web", "cmd": SLEEP_CMD, **TASK_RESOURCES, "dependencies": ["db"]}]})
        assert reply.status_code == 201, reply.text
        deployment = reply.json()["deploymentId"]
        events.wait_for(lambda e: e["eventType"] == "group_change_success" and e["groupId"] == group, what="group_change_success")
        steps = [e for e in [events.wait_for(lambda e: e["eventType"] == "deployment_step_success" and e["plan"]["id"] == deployment,
                                             timeout=20, what="deployment_step_success")]]
        assert steps[0]["currentStep"]["actions"], "the step's actions"
        healthy = events.wait_for(lambda e: e["eventType"] == "instance_health_changed_event" and e["runSpecId"] == f"{group}/db",
                                  timeout=20, what="instance_health_changed_event")
        assert healthy["healthy"] is True
        events.wait_for(lambda e: e["eventType"] == "deployment_success" and e["id"] == deployment, timeout=30, what="deployment_success")

        client.delete_group(group, force=True)
        events.wait_for(lambda e: e["eventType"] == "app_terminated_event" and e["appId"] == f"{group}/web", timeout=20,
                        what="app_terminated_event")
