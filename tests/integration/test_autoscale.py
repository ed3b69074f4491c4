"""Autoscaling: an app under wrk load through the proxy scales up by requests per instance, and
back down once the load has stayed off for its cool-down, never below `min`; each change is a
normal deployment and an `autoscale_event`."""

import shutil
import subprocess
import threading
import time

import pytest
import requests

from support.events import EventStream
from support.flotilla import app_definition, wait_until

BACKEND = """
import http.server, os
class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT0"])), Handler).serve_forever()
"""


class Counts:
    """Polls the app's `instances` on a thread; keeps every value seen."""

    def __init__(self, agent, app_id):
        self.agent, self.app_id = agent, app_id
        self.seen = []
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.poll, daemon=True)
        self.thread.start()

    def poll(self):
        while not self.stopping.is_set():
            app = self.agent.app(self.app_id)
            if app is not None:
                self.seen.append((time.monotonic(), app["instances"]))
            self.stopping.wait(0.25)

    def now(self):
        return self.seen[-1][1] if self.seen else None

    def stop(self):
        self.stopping.set()
        self.thread.join(timeout=5)


def test_load_scales_an_app_up_and_back_down(make_agent, app_ids, tmp_path):
    wrk = shutil.which("wrk")
    if wrk is None:
        pytest.fail("wrk is not installed (scripts/test.sh installs it)")
    agent = make_agent(extra_args=["--metrics-interval", "1"])
    script = tmp_path / "backend.py"
    script.write_text(BACKEND)
    app_id = app_ids.new("scaled")
    prefix = "/" + app_id.rsplit("/", 1)[1]
    policy = {"metric": "requestsPerSecond", "target": 5, "min": 1, "max": 4,
              "scaleUpCooldownSeconds": 2, "scaleDownCooldownSeconds": 8}
    agent.create_app(app_definition(
        app_id, f"exec python3 {script}", instances=1, portDefinitions=[{"port": 0}], autoscale=policy,
        labels={"SERVICE_TAGS": f"urlprefix-{prefix}"},
        healthChecks=[{"protocol": "HTTP", "path": "/", "portIndex": 0, "gracePeriodSeconds": 10,
                       "intervalSeconds": 1, "timeoutSeconds": 1, "maxConsecutiveFailures": 3}]))
    agent.wait_for_running(app_id, 1)
    wait_until(lambda: requests.get(f"{agent.proxy_url}{prefix}/", timeout=5).status_code == 200,
               timeout=30, what="the app to be routed")
    assert agent.app(app_id)["autoscale"]["max"] == 4

    counts = Counts(agent, app_id)
    try:
        with EventStream(agent) as events:
            load = subprocess.Popen([wrk, "-t1", "-c4", "-d60s", f"{agent.proxy_url}{prefix}/"],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                wait_until(lambda: (counts.now() or 0) >= 3, timeout=40, what="the app to scale to 3 or more")
                events.wait_for(lambda e: e.get("eventType") == "autoscale_event" and e["appId"] == app_id and e["to"] >= 3,
                                timeout=10, what="an autoscale_event to 3 or more")
                ups = [e for e in events.events("autoscale_event") if e["appId"] == app_id]
                assert ups[0]["from"] == 1, ups
                for up in ups:
                    assert up["to"] > up["from"], ups
                    assert up["metric"] == "requestsPerSecond" and up["value"] > 5 * 1.1 and up["target"] == 5, up
                    assert up["deploymentId"] and "per instance" in up["reason"], up
                wait_until(lambda: agent.app(app_id)["tasksRunning"] >= 3, timeout=30, what="the new instances to run")
            finally:
                load.terminate()
                load.wait(timeout=10)
            stopped = time.monotonic()

            wait_until(lambda: counts.now() == 1, timeout=60, what="the app to scale back down to 1")
            first_drop = next(at for at, count in counts.seen if at > stopped and count < max(c for _, c in counts.seen))
            # Scale-down waits out the cool-down of sustained low load (8 s), less a round or two.
            assert first_drop - stopped >= 5, f"scaled down {first_drop - stopped:.1f} s after the load stopped"
            down = [e for e in events.events("autoscale_event") if e["appId"] == app_id and e["to"] < e["from"]]
            assert down and down[-1]["to"] == 1, down
    finally:
        counts.stop()
    assert min(count for _, count in counts.seen) >= 1, counts.seen
    # A user's change still wins, and out-of-bounds counts come back inside once it is done.
    wait_until(lambda: not agent.app(app_id)["deployments"], timeout=30, what="the scale-down to finish")
    reply = agent.put(f"/v2/apps{app_id}", json={"instances": 7})
    assert reply.status_code == 200, reply.text
    wait_until(lambda: agent.app(app_id)["instances"] == 4 and not agent.app(app_id)["deployments"],
               timeout=60, what="the app to come back to max")


def test_autoscale_policies_are_checked(make_agent, app_ids):
    agent = make_agent()
    app_id = app_ids.new()
    for policy, expected in [
        ({"metric": "restarts", "target": 1, "max": 3}, "/autoscale/metric"),
        ({"metric": "cpu", "target": 0.5, "min": 0, "max": 3}, "/autoscale/min"),
        ({"metric": "cpu", "target": 0.5, "min": 4, "max": 3}, "/autoscale/max"),
        ({"metric": "cpu", "target": 0.5}, "max"),
    ]:
        reply = agent.post("/v2/apps", json=app_definition(app_id, "exec sleep 600", autoscale=policy))
        assert reply.status_code == 422, (policy, reply.status_code, reply.text)
        assert expected in reply.text, (policy, reply.text)
    assert agent.get(f"/v2/apps{app_id}").status_code == 404
