"""Drives bench/cluster.sh: three agents sharing one etcd, all scheduler candidates.

Each agent is its own host on loopback (127.0.0.2-4) with its own ports and data directory.
Measured: the time from POST /v2/apps (300 instances) to 300 TASK_RUNNING, and the time from
kill -9 of the leader to a survivor leading and accepting a write.
"""

import argparse
import json
import os
import statistics
import subprocess
import time
import urllib.error
import urllib.request

from benchlib import free_port, stop_process, wait_for_ping
from registry_bench import Etcd


def request(base, method, path, body=None, timeout=10):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(base + path, data=data, method=method, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as response:
        return response.status, json.loads(response.read() or b"null")


class ClusterAgent:
    def __init__(self, binary, work, number, store):
        self.binary, self.work, self.number, self.store = binary, work, number, store
        self.bind = f"127.0.0.{number}"
        self.port = free_port()
        self.base = f"http://{self.bind}:{self.port}"
        self.start()

    def start(self):
        self.log = open(os.path.join(self.work, f"agent-{self.number}.log"), "a")
        first = 20000 + self.number * 1000
        self.process = subprocess.Popen(
            [self.binary, "agent", "--data-dir", os.path.join(self.work, f"data-{self.number}"), "--bind", self.bind,
             "--node-name", f"node-{self.number}", "--api-port", str(self.port), "--proxy-port", str(free_port()),
             "--dns-port", str(free_port()), "--ports", f"{first}-{first + 999}", "--cpus", "64", "--mem", "65536",
             "--store", self.store, "--etcd-prefix", "/bench-cluster", "--server", "--on-exit", "stop", "--log-level", "warning"],
            stdout=self.log, stderr=self.log)
        wait_for_ping(self.base, self.log.name)

    def leader(self):
        try:
            return request(self.base, "GET", "/v2/leader", timeout=2)[1]["leader"]
        except (OSError, urllib.error.HTTPError, KeyError):
            return None

    def stop(self):
        stop_process(self.process)


def agreed_leader(agents, timeout=30):
    deadline = time.time() + timeout
    while time.time() < deadline:
        names = {agent.leader() for agent in agents}
        if len(names) == 1 and None not in names:
            (address,) = names
            return next(agent for agent in agents if f"{agent.bind}:{agent.port}" == address)
        time.sleep(0.02)
    raise SystemExit("no leader agreed on")


def running(agent, app_id):
    _, body = request(agent.base, "GET", f"/v2/apps/{app_id}?embed=apps.counts")
    return body["app"]["tasksRunning"]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--binary", required=True)
    parser.add_argument("--work", required=True)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--instances", type=int, default=300)
    arguments = parser.parse_args()

    etcd = Etcd(arguments.work)
    store = f"etcd://127.0.0.1:{etcd.client_port}"
    agents = [ClusterAgent(arguments.binary, arguments.work, number, store) for number in (2, 3, 4)]
    deploy_seconds, failover_seconds = [], []
    try:
        leader = agreed_leader(agents)
        # The nodes' records are in: placement sees all three.
        deadline = time.time() + 30
        while len(request(leader.base, "GET", "/flotilla/v1/nodes")[1]) < 3 and time.time() < deadline:
            time.sleep(0.05)
        for run in range(arguments.runs):
            app_id = f"/bench/many-{run}"
            definition = {"id": app_id, "cmd": "exec sleep 100000", "instances": arguments.instances, "cpus": 0.01, "mem": 16,
                          "portDefinitions": [], "constraints": [["hostname", "GROUP_BY"]]}
            started = time.perf_counter()
            request(leader.base, "POST", "/v2/apps", definition)
            while running(leader, app_id) < arguments.instances:
                time.sleep(0.02)
            elapsed = time.perf_counter() - started
            deploy_seconds.append(elapsed)
            print(json.dumps({"run": run + 1, "instances": arguments.instances, "agents": 3, "seconds_to_all_running": round(elapsed, 3)}), flush=True)
            request(leader.base, "DELETE", f"/v2/apps/{app_id}?force=true")
            while request(leader.base, "GET", "/v2/deployments")[1]:
                time.sleep(0.05)

        for run in range(arguments.runs):
            leader = agreed_leader(agents)
            survivors = [agent for agent in agents if agent is not leader]
            started = time.perf_counter()
            leader.process.kill()
            leader.process.wait()
            while True:
                candidate = next((agent for agent in survivors if agent.leader() == f"{agent.bind}:{agent.port}"), None)
                if candidate is not None:
                    try:
                        app = {"id": f"/bench/after-failover-{run}", "cmd": "exec sleep 100000", "instances": 0, "portDefinitions": []}
                        status, _ = request(candidate.base, "POST", "/v2/apps", app, timeout=5)
                        if status == 201:
                            break
                    except (OSError, urllib.error.HTTPError):
                        pass
                time.sleep(0.02)
            elapsed = time.perf_counter() - started
            failover_seconds.append(elapsed)
            print(json.dumps({"run": run + 1, "failover_seconds_to_accepted_write": round(elapsed, 3)}), flush=True)
            leader.start()
    finally:
        for agent in agents:
            agent.stop()
        etcd.stop()

    print(f"| 3 agents on one etcd, {arguments.runs} runs | median | runs |")
    print("|---|---|---|")
    print(f"| {arguments.instances} instances: POST to all TASK_RUNNING | {statistics.median(deploy_seconds):.2f} s | "
          + ", ".join(f"{value:.2f}" for value in deploy_seconds) + " |")
    print(f"| leader kill -9 to a survivor accepting a write | {statistics.median(failover_seconds):.2f} s | "
          + ", ".join(f"{value:.2f}" for value in failover_seconds) + " |")


if __name__ == "__main__":
    main()
