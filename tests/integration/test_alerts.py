"""Alerts: rules in an app's definition evaluated on real measurements, their changes as events,
on `GET /flotilla/v1/alerts` and `flotilla alerts`, POSTed to a webhook (retried) and sent to a
real Alertmanager (Debian's prometheus-alertmanager)."""

import http.server
import json
import os
import shutil
import signal
import subprocess
import threading
import time

import pytest
import requests

from support.events import EventStream
from support.flotilla import app_definition, free_tcp_port, wait_for_ready, wait_until

# A quarter of a core for `CALM` seconds, then two cores flat out.
RAMP = """
import multiprocessing, os, time
def burn():
    while True:
        pass
calm = float(os.environ["CALM"])
start = time.monotonic()
while time.monotonic() - start < calm:
    t = time.monotonic()
    while time.monotonic() - t < 0.025:
        pass
    time.sleep(0.075)
workers = [multiprocessing.Process(target=burn) for _ in range(2)]
for worker in workers:
    worker.start()
for worker in workers:
    worker.join()
"""


class Webhook:
    """A receiver on 127.0.0.1 that answers its first POST with 500 and the rest with 200."""

    def __init__(self):
        self.bodies = []
        self.attempts = 0
        self.lock = threading.Lock()
        hook = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                with hook.lock:
                    hook.attempts += 1
                    failing = hook.attempts == 1
                    if not failing:
                        hook.bodies.append(json.loads(body))
                self.send_response(500 if failing else 200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def received(self):
        with self.lock:
            return list(self.bodies)

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def webhook():
    hook = Webhook()
    yield hook
    hook.close()


@pytest.fixture
def alertmanager(tmp_path):
    binary = shutil.which("prometheus-alertmanager") or "/usr/bin/prometheus-alertmanager"
    if not os.path.exists(binary):
        pytest.fail("prometheus-alertmanager is not installed (scripts/test.sh installs it)")
    port = free_tcp_port()
    config = tmp_path / "alertmanager.yml"
    config.write_text("route:\n  receiver: quiet\n  group_wait: 1s\nreceivers:\n  - name: quiet\n")
    process = subprocess.Popen(
        [binary, f"--config.file={config}", f"--storage.path={tmp_path / 'am-data'}",
         f"--web.listen-address=127.0.0.1:{port}", "--cluster.listen-address="],
        stdout=open(tmp_path / "alertmanager.log", "wb"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_ready(url, "alertmanager")
        yield url
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def alerts_of(url, app_id):
    reply = requests.get(url + "/api/v2/alerts", timeout=5)
    assert reply.status_code == 200, reply.text
    return [alert for alert in reply.json() if alert["labels"].get("app") == app_id]


def test_a_busy_app_goes_warning_then_critical_and_everyone_hears(make_agent, app_ids, tmp_path, webhook, alertmanager):
    agent = make_agent(extra_args=[
        "--metrics-interval", "1", "--alert-webhook", webhook.url, "--alertmanager", alertmanager])
    script = tmp_path / "ramp.py"
    script.write_text(RAMP)
    app_id = app_ids.new("ramp")
    rule = {"name": "hot", "metric": "cpu", "window": "2s", "warning": 0.08, "critical": 0.6, "forSeconds": 1}

    with EventStream(agent) as events:
        definition = app_definition(app_id, f"exec python3 {script}", cpus=2, mem=128, alerts=[rule])
        definition["env"] = {"CALM": "8"}
        agent.create_app(definition)
        assert agent.app(app_id)["alerts"][0]["window"] == "2s"

        warning = events.wait_for(
            lambda e: e.get("eventType") == "alert_state_changed_event" and e.get("appId") == app_id and e["state"] == "warning", timeout=40, what="the alert at warning")
        assert warning["previous"] == "ok" and warning["alert"] == "hot" and warning["metric"] == "cpu"
        assert warning["value"] >= 0.08 and warning["warning"] == 0.08
        critical = events.wait_for(
            lambda e: e.get("eventType") == "alert_state_changed_event" and e.get("appId") == app_id and e["state"] == "critical", timeout=40, what="the alert at critical")
        assert critical["previous"] == "warning" and critical["value"] >= 0.6

    listed = agent.get("/flotilla/v1/alerts", params={"app": app_id}).json()["alerts"]
    assert [(a["alert"], a["state"]) for a in listed] == [("hot", "critical")], listed
    assert agent.get("/flotilla/v1/alerts", params={"state": "bogus"}).status_code == 400
    assert agent.get("/flotilla/v1/alerts", params={"app": "/no/such/app"}).status_code == 404

    result = agent.cli("alerts", "--firing", "--json")
    assert result.returncode == 3, (result.returncode, result.stdout, result.stderr)
    assert any(a["app"] == app_id and a["state"] == "critical" for a in json.loads(result.stdout)["alerts"])
    table = agent.cli("alerts")
    assert table.returncode == 0 and "CRITICAL" in table.stdout

    # The webhook got both changes in order, the first after a retry (its first answer was 500).
    def both():
        states = [body["state"] for body in webhook.received() if body["app"] == app_id]
        return states if states[:2] == ["warning", "critical"] else None

    wait_until(both, timeout=30, what="the webhook to receive warning then critical")
    assert webhook.attempts >= 3
    first = webhook.received()[0]
    assert first["previous"] == "ok" and first["threshold"] == 0.08 and first["agent"] == "test-node" and first["scope"] == "app"

    # Alertmanager holds the critical alert (and the warning one ended when it went critical).
    def critical_in_alertmanager():
        found = alerts_of(alertmanager, app_id)
        active = [a for a in found if a["status"]["state"] == "active"]
        return active if [a["labels"]["severity"] for a in active] == ["critical"] else None

    (alert,) = wait_until(critical_in_alertmanager, timeout=30, what="Alertmanager to hold the critical alert alone")
    assert alert["labels"]["alertname"] == "hot" and alert["labels"]["metric"] == "cpu"
    assert alert["generatorURL"].startswith(agent.url + "/flotilla/v1/alerts")

    # The app goes: its alert ends everywhere.
    assert agent.delete(f"/v2/apps{app_id}").status_code == 200
    wait_until(lambda: not [a for a in alerts_of(alertmanager, app_id) if a["status"]["state"] == "active"],
               timeout=30, what="Alertmanager to see the alert end")
    wait_until(lambda: [b["state"] for b in webhook.received() if b["app"] == app_id][-1] == "ok",
               timeout=30, what="the webhook to hear the alert end")
    assert agent.get("/flotilla/v1/alerts", params={"state": "firing"}).json()["alerts"] == []


def test_alert_rules_are_checked(make_agent, app_ids):
    agent = make_agent()
    app_id = app_ids.new()
    bad = [
        ({"name": "a", "metric": "load avg", "warning": 1}, "/alerts/0/metric"),
        ({"name": "a", "metric": "cpu"}, "give warning, critical or both"),
        ({"name": "a", "metric": "errorRate", "critical": 3}, "share from 0 to 1"),
        ({"name": "a", "metric": "cpu", "warning": 1, "window": "later"}, "/alerts/0/window"),
        ({"name": "a", "metric": "cpu", "warning": 1, "severity": "page"}, "/alerts/0/severity"),
    ]
    for rule, expected in bad:
        reply = agent.post("/v2/apps", json=app_definition(app_id, "exec sleep 600", alerts=[rule]))
        assert reply.status_code == 422, (rule, reply.status_code, reply.text)
        assert expected in reply.text, (rule, reply.text)
    assert agent.get(f"/v2/apps{app_id}").status_code == 404
    ok = agent.post("/v2/apps", json=app_definition(
        app_id, "exec sleep 600", alerts=[{"name": "mem", "metric": "memory", "warning": 0.8, "critical": 0.95}]))
    assert ok.status_code == 201, ok.text

    def listed():
        alerts = agent.get("/flotilla/v1/alerts", params={"app": app_id}).json()["alerts"]
        return alerts or None

    (alert,) = wait_until(listed, timeout=20, what="the rule to be evaluated")
    # A fraction of `mem` (64 MiB by default here) is given in bytes.
    mem = agent.app(app_id)["mem"]
    assert alert["warning"] == pytest.approx(0.8 * mem * 1024 * 1024)
    assert alert["state"] == "ok"
    bad_flag = subprocess.run(
        [str(agent.binary), "agent", "--alertmanager", "not-a-url", "--data-dir", str(agent.data_dir / "other")],
        capture_output=True, text=True, timeout=30)
    assert bad_flag.returncode != 0 and "--alertmanager" in bad_flag.stderr, bad_flag.stderr


def test_node_and_cluster_rules_from_a_rules_file(make_agent, tmp_path):
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        "rules:\n"
        "  - {name: memory-in-use, scope: node, metric: memory, window: 2s, warning: 0.0001, critical: 0.99}\n"
        "  - {name: nodes-lost, scope: cluster, metric: nodesDown, critical: 1}\n"
        "  - {name: disk, metric: disk, warning: 0.99}\n")
    agent = make_agent(extra_args=["--metrics-interval", "1", "--alert-rules", str(rules)])

    def evaluated():
        alerts = agent.get("/flotilla/v1/alerts").json()["alerts"]
        by_name = {alert["alert"]: alert for alert in alerts}
        memory = by_name.get("memory-in-use")
        return by_name if memory and memory["state"] == "warning" else None

    by_name = wait_until(evaluated, timeout=30, what="the node memory rule at warning")
    memory = by_name["memory-in-use"]
    assert memory["scope"] == "node" and memory["node"] == "test-node" and "app" not in memory
    assert 0 < memory["value"] < 1
    cluster = by_name["nodes-lost"]
    assert cluster["scope"] == "cluster" and cluster["state"] == "ok" and cluster["value"] == 0
    assert by_name["disk"]["scope"] == "node"
    table = agent.cli("alerts", "--firing")
    assert table.returncode == 2, (table.stdout, table.stderr)
    assert "node/test-node" in table.stdout and "WARNING" in table.stdout

    bad = tmp_path / "bad.yaml"
    for text, expected in [
        ("rules:\n  - {name: x, scope: node, metric: memory, warning: 5}\n", "/rules/0/warning"),
        ("rules:\n  - {name: x, scope: app, metric: cpu, warning: 1}\n", "/rules/0/scope"),
        ("rules:\n  - {name: x, metric: cpu, warning: 0.5}\n  - {name: x, metric: disk, warning: 0.5}\n", "/rules/1/name"),
        ("rules:\n  - {name: x, scope: cluster, node: a, metric: cpu, warning: 0.5}\n", "/rules/0/node"),
    ]:
        bad.write_text(text)
        refused = subprocess.run(
            [str(agent.binary), "agent", "--alert-rules", str(bad), "--data-dir", str(tmp_path / "other")],
            capture_output=True, text=True, timeout=30)
        assert refused.returncode != 0 and expected in refused.stderr, (text, refused.stderr)
