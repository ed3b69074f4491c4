"""Instance and node metrics: measured from real cgroups and /proc, shown by the stats API and
`flotilla top`, exposed on /metrics and scraped by a real Prometheus."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.parse

import pytest
import requests

from support.dns import dig
from support.flotilla import app_definition, free_tcp_port, wait_for_ready, wait_until

MIB = 1 << 20
# Busy in the shell: one core as long as it runs.
BURN = "while :; do :; done"
# Holds 48 MiB of anonymous memory, touched so that it is resident.
HOLD = "exec python3 -c 'import time; x = bytearray(48 << 20); time.sleep(600)'"


def app_stats(agent, app_id):
    reply = agent.get(f"/flotilla/v1/apps{app_id}/stats")
    assert reply.status_code == 200, reply.text
    return reply.json()


def series(text, name, **labels):
    """Values of one metric in Prometheus' text format whose labels include `labels`."""
    values = []
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        head, _, value = line.rpartition(" ")
        found = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', head))
        if all(found.get(key) == wanted for key, wanted in labels.items()):
            values.append(float(value))
    return values


@pytest.fixture
def metrics_agent(make_agent):
    return make_agent(extra_args=["--metrics-interval", "1"])


def test_stats_show_what_instances_use(metrics_agent, app_ids):
    agent = metrics_agent
    burn, hold = app_ids.new("burn"), app_ids.new("hold")
    agent.create_app(app_definition(burn, BURN, cpus=0.5, mem=64))
    agent.create_app(app_definition(hold, HOLD, cpus=0.1, mem=128))
    agent.wait_for_running(burn, 1)
    agent.wait_for_running(hold, 1)

    def busy():
        stats = app_stats(agent, burn)
        cores = [i.get("cpuCores") or 0 for i in stats["instances"]]
        return stats if cores and cores[0] > 0.5 else None

    stats = wait_until(busy, timeout=30, what="the burning instance to use more than half a core")
    assert stats["app"] == burn
    assert stats["summary"]["instances"] == 1
    assert stats["summary"]["cpuCores"] > 0.5
    instance = stats["instances"][0]
    assert instance["node"] == "test-node"
    assert instance["cpuSeconds"] > 0
    assert instance["memoryLimitBytes"] == 64 * MIB

    def resident():
        stats = app_stats(agent, hold)
        memory = [i.get("memoryBytes") or 0 for i in stats["instances"]]
        return stats if memory and memory[0] > 40 * MIB else None

    stats = wait_until(resident, timeout=30, what="the holding instance to have 40 MiB resident")
    instance = stats["instances"][0]
    assert instance["memoryBytes"] < 128 * MIB
    assert instance["memoryRSSBytes"] > 40 * MIB
    assert instance["memoryLimitBytes"] == 128 * MIB
    assert instance["processes"] >= 1
    assert instance["oomKills"] == 0

    everything = agent.get("/flotilla/v1/stats").json()
    (node,) = everything["nodes"]
    assert node["node"] == "test-node" and node["cpus"] >= 1
    assert node["memoryTotalBytes"] > node["memoryAvailableBytes"] > 0
    assert node["diskTotalBytes"] > 0 and node["instances"] >= 2
    apps = {summary["app"]: summary for summary in everything["apps"]}
    assert apps[burn]["cpuCores"] > 0.5 and apps[hold]["memoryBytes"] > 40 * MIB
    assert everything["unreachable"] == []
    only = agent.get("/flotilla/v1/stats", params={"app": hold}).json()
    assert [i["app"] for i in only["instances"]] == [hold]


def test_a_cpu_quota_shows_as_throttling(metrics_agent, app_ids):
    agent = metrics_agent
    app_id = app_ids.new()
    agent.create_app(app_definition(app_id, BURN, cpus=0.1, resourceLimits={"cpus": 0.2}))
    agent.wait_for_running(app_id, 1)

    def throttled():
        instances = app_stats(agent, app_id)["instances"]
        # Two samples at least: a rate needs them.
        return instances if instances and (instances[0].get("cpuThrottledSeconds") or 0) > 0.2 and "cpuCores" in instances[0] else None

    (instance,) = wait_until(throttled, timeout=30, what="throttling under a 0.2-CPU quota")
    assert instance["cpuThrottledPeriods"] > 0
    # Held to its quota (with room for a noisy machine's measurement).
    assert instance["cpuCores"] < 0.35


def test_metrics_carry_app_instance_and_node_labels_and_go_with_the_instance(metrics_agent, app_ids):
    agent = metrics_agent
    app_id = app_ids.new()
    agent.create_app(app_definition(app_id, HOLD, mem=128))
    (task,) = agent.wait_for_running(app_id, 1)

    def exposed():
        text = agent.get("/metrics").text
        return text if series(text, "flotilla_instance_memory_bytes", app=app_id, instance=task["id"], node="test-node") else None

    text = wait_until(exposed, timeout=20, what="the instance's memory on /metrics")
    assert series(text, "flotilla_instance_memory_limit_bytes", app=app_id) == [128 * MIB]
    assert series(text, "flotilla_instance_cpu_seconds_total", app=app_id)[0] >= 0
    assert "# TYPE flotilla_instance_cpu_seconds_total counter" in text
    assert series(text, "flotilla_node_memory_total_bytes", node="test-node")[0] > 0
    assert len(series(text, "flotilla_node_cpu_seconds_total", node="test-node")) == 8
    assert series(text, "flotilla_metrics_collection_seconds", node="test-node")

    assert agent.delete(f"/v2/apps{app_id}").status_code == 200
    wait_until(
        lambda: not series(agent.get("/metrics").text, "flotilla_instance_memory_bytes", app=app_id),
        timeout=20, what="the destroyed app's series to leave /metrics")


def test_stats_refuse_what_they_cannot_answer(metrics_agent):
    assert metrics_agent.get("/flotilla/v1/apps/no/such/app/stats").status_code == 404
    reply = metrics_agent.get("/flotilla/v1/stats", params={"app": "bad id!"})
    assert reply.status_code == 400 and "app id" in reply.json()["message"]
    assert metrics_agent.get("/flotilla/v1/stats", params={"local": "maybe"}).status_code == 400


def test_metrics_can_be_turned_off(make_agent, app_ids):
    agent = make_agent(extra_args=["--metrics-interval", "0"])
    app_id = app_ids.new()
    agent.create_app(app_definition(app_id, "exec sleep 600"))
    agent.wait_for_running(app_id, 1)
    time.sleep(1.5)
    assert app_stats(agent, app_id)["instances"] == []
    assert "flotilla_instance_" not in agent.get("/metrics").text
    bad = subprocess.run(
        [str(agent.binary), "agent", "--metrics-interval", "0.1", "--data-dir", str(agent.data_dir / "other")],
        capture_output=True, text=True, timeout=30)
    assert bad.returncode != 0 and "--metrics-interval" in bad.stderr


def test_top_prints_apps_and_json(metrics_agent, app_ids):
    agent = metrics_agent
    app_id = app_ids.new()
    agent.create_app(app_definition(app_id, BURN, cpus=0.5, instances=2))
    agent.wait_for_running(app_id, 2)

    def measured():
        result = agent.cli("top", "--json")
        assert result.returncode == 0, result.stderr
        rows = {row["app"]: row for row in json.loads(result.stdout)["apps"]}
        row = rows.get(app_id)
        return row if row and row["instances"] == 2 and row["cpuCores"] > 0.5 else None

    row = wait_until(measured, timeout=30, what="flotilla top --json to show the app busy")
    assert row["memoryBytes"] > 0
    table = agent.cli("top", "--once")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split()[:4] == ["APP", "INSTANCES", "CPU", "MEMORY"]
    (line,) = [line for line in lines if line.startswith(app_id + " ")]
    assert line.split()[1] == "2"


def test_the_control_plane_store_registry_and_dns_are_measured(metrics_agent, app_ids):
    agent = metrics_agent
    app_id = app_ids.new()
    agent.create_app(app_definition(app_id, "exec sleep 600", instances=2))
    agent.wait_for_running(app_id, 2)
    answer = dig(agent.dns_port, "no-such-service.service.flotilla")
    assert answer.status == "NXDOMAIN"

    def measured():
        text = agent.get("/metrics").text
        ready = (series(text, "flotilla_deployments_total", result="succeeded") or [0])[0] >= 1
        return text if ready and re.search(r"^flotilla_apps [1-9]", text, re.M) else None

    text = wait_until(measured, timeout=20, what="the deployment and the app on /metrics")
    assert re.search(r"^flotilla_store_commit_seconds_count(\{\})? [1-9]", text, re.M), text
    assert re.search(r"^flotilla_scheduler_placements_total(\{\})? [2-9]", text, re.M)
    assert re.search(r"^flotilla_instances(\{\})? 2(\.0)?$", text, re.M)
    assert series(text, "flotilla_deployment_duration_seconds_count", result="succeeded")[0] >= 1
    assert series(text, "flotilla_dns_responses_total", transport="udp", rcode="NXDOMAIN")[0] >= 1
    assert "# TYPE flotilla_store_watch_lag_seconds histogram" in text


# --- requests through the proxy --------------------------------------------------------------

# Answers /fail with 500, anything else with 200 after `delay` seconds (`?delay=`).
BACKEND = """
import http.server, os, time, urllib.parse
class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        url = urllib.parse.urlparse(self.path)
        delay = float(urllib.parse.parse_qs(url.query).get("delay", ["0"])[0])
        time.sleep(delay)
        status = 500 if url.path == "/fail" else 200
        body = b"ok"
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT0"])), Handler).serve_forever()
"""


def test_requests_per_app_rates_errors_and_p99(metrics_agent, app_ids, tmp_path):
    agent = metrics_agent
    script = tmp_path / "backend.py"
    script.write_text(BACKEND)
    app_id = app_ids.new("web")
    prefix = "/" + app_id.rsplit("/", 1)[1]
    agent.create_app(app_definition(
        app_id, f"exec python3 {script}", instances=2, portDefinitions=[{"port": 0}],
        labels={"SERVICE_TAGS": f"urlprefix-{prefix} strip={prefix}"},
        healthChecks=[{"protocol": "HTTP", "path": "/health", "portIndex": 0, "gracePeriodSeconds": 10,
                       "intervalSeconds": 1, "timeoutSeconds": 1, "maxConsecutiveFailures": 3}]))
    agent.wait_for_running(app_id, 2)

    def routed():
        reply = requests.get(f"{agent.proxy_url}{prefix}/ok", timeout=5)
        return reply.status_code == 200

    wait_until(routed, timeout=30, what="the app to be routed")
    # Until the instances pass their checks the route answers 503, counted on the app too.
    before = agent.get("/metrics").text
    ok_before = series(before, "flotilla_app_requests_total", app=app_id, code="2xx")[0]
    failed_before = series(before, "flotilla_app_requests_total", app=app_id, code="5xx")[0]
    route_failed_before = series(before, "flotilla_proxy_requests_total", route=prefix, code="5xx")[0]
    observed_before = series(before, "flotilla_app_upstream_latency_seconds_bucket", app=app_id, le="+Inf")[0]
    with requests.Session() as session:
        for _ in range(40):
            assert session.get(f"{agent.proxy_url}{prefix}/ok", params={"delay": "0.02"}, timeout=5).status_code == 200
        for _ in range(10):
            assert session.get(f"{agent.proxy_url}{prefix}/fail", timeout=5).status_code == 500

    text = agent.get("/metrics").text
    assert series(text, "flotilla_app_requests_total", app=app_id, code="2xx") == [ok_before + 40], text
    assert series(text, "flotilla_app_requests_total", app=app_id, code="5xx") == [failed_before + 10]
    assert series(text, "flotilla_app_upstream_latency_seconds_bucket", app=app_id, le="+Inf") == [observed_before + 50]
    assert series(text, "flotilla_proxy_requests_total", route=prefix, code="5xx") == [route_failed_before + 10]
    # A client connection held open shows in the gauge.
    with socket.create_connection(("127.0.0.1", agent.proxy_port), timeout=5):
        def open_connections():
            match = re.search(r"^flotilla_proxy_open_connections (\d+)$", agent.get("/metrics").text, re.M)
            return match and int(match.group(1)) >= 1
        wait_until(open_connections, timeout=5, what="flotilla_proxy_open_connections to count the open connection")

    # The figures for people cover the last interval (1 s here): the traffic must fall in one.
    def figures():
        summary = app_stats(agent, app_id)["summary"]
        return summary if summary.get("requestsPerSecond") else None

    stop = time.monotonic() + 20
    found = None
    with requests.Session() as session:
        while time.monotonic() < stop and found is None:
            for number in range(20):
                path = "/fail" if number % 5 == 0 else "/ok"
                session.get(f"{agent.proxy_url}{prefix}{path}", params={"delay": "0.02"}, timeout=5)
            found = figures()
            if found and (found.get("errorRate") is None or found.get("p99Seconds") is None):
                found = None
    assert found, "no request figures in the app's stats"
    assert found["requestsPerSecond"] > 1
    assert 0.05 < found["errorRate"] < 0.5
    assert 0.01 <= found["p99Seconds"] <= 1

    result = agent.cli("top", "--json", "--app", app_id)
    assert result.returncode == 0, result.stderr
    (row,) = json.loads(result.stdout)["apps"]
    assert row["app"] == app_id and "requestsPerSecond" in row


# --- a real Prometheus ----------------------------------------------------------------------


@pytest.fixture
def prometheus(tmp_path):
    binary = shutil.which("prometheus") or "/usr/bin/prometheus"
    if not os.path.exists(binary):
        pytest.fail("prometheus is not installed (scripts/test.sh installs Debian's 'prometheus')")

    started = []

    def start(target):
        port = free_tcp_port()
        config = tmp_path / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            "scrape_configs:\n  - job_name: flotilla\n    honor_labels: true\n    static_configs:\n"
            f"      - targets: ['{target}']\n")
        process = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}"],
            stdout=open(tmp_path / "prometheus.log", "wb"), stderr=subprocess.STDOUT)
        started.append(process)
        url = f"http://127.0.0.1:{port}"
        wait_for_ready(url, "prometheus")
        return url

    yield start
    for process in started:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def test_prometheus_scrapes_an_instances_memory(metrics_agent, app_ids, prometheus):
    agent = metrics_agent
    app_id = app_ids.new()
    agent.create_app(app_definition(app_id, HOLD, mem=128))
    (task,) = agent.wait_for_running(app_id, 1)
    url = prometheus(f"127.0.0.1:{agent.api_port}")
    query = f'flotilla_instance_memory_bytes{{app="{app_id}"}}'

    def answered():
        reply = requests.get(url + "/api/v1/query", params={"query": query}, timeout=5).json()
        assert reply["status"] == "success", reply
        results = reply["data"]["result"]
        return results if results and float(results[0]["value"][1]) > 40 * MIB else None

    (result,) = wait_until(answered, timeout=60, interval=1, what="prometheus to have the instance's memory")
    assert result["metric"]["instance"] == task["id"]
    assert result["metric"]["node"] == "test-node"
    # The scrape itself is healthy, and CPU is there as a rate Prometheus can compute.
    up = requests.get(url + "/api/v1/query", params={"query": "up"}, timeout=5).json()["data"]["result"]
    assert [float(r["value"][1]) for r in up] == [1.0]
    rate = urllib.parse.quote(f'rate(flotilla_instance_cpu_seconds_total{{app="{app_id}"}}[10s])')
    wait_until(
        lambda: requests.get(f"{url}/api/v1/query?query={rate}", timeout=5).json()["data"]["result"],
        timeout=30, interval=1, what="a CPU rate from prometheus")
