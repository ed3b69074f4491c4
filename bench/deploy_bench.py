"""Drives bench/deploy.sh: starts a release agent on loopback and measures it.

Prints a Markdown table ready for BENCHMARKS.md.
"""

import argparse
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from benchlib import Agent, call, rss_kib, serves, wrk

INSTANCES = 100


def deploy_once(agent, server, run):
    app_id = f"/bench/web-{run}"
    started = time.perf_counter()
    call(agent.base, "POST", "/v2/apps", {
        "id": app_id, "cmd": f"exec {server} $PORT0", "instances": INSTANCES, "cpus": 0.01, "mem": 8,
        "portDefinitions": [{"port": 0}]})
    running_at = serving_at = None
    pending_ports = None
    while serving_at is None and time.perf_counter() - started < 60:
        tasks = call(agent.base, "GET", f"/v2/apps{app_id}/tasks")["tasks"]
        running = [task for task in tasks if task["state"] == "TASK_RUNNING"]
        if running_at is None and len(running) == INSTANCES:
            running_at = time.perf_counter()
            pending_ports = {task["ports"][0] for task in running}
        if pending_ports is not None:
            with ThreadPoolExecutor(16) as pool:
                answered = dict(zip(pending_ports, pool.map(serves, pending_ports)))
            pending_ports = {port for port, ok in answered.items() if not ok}
            if not pending_ports:
                serving_at = time.perf_counter()
        else:
            time.sleep(0.01)
    rss = rss_kib(agent.process.pid)
    call(agent.base, "DELETE", f"/v2/apps{app_id}")
    deadline = time.time() + 30
    while time.time() < deadline and call(agent.base, "GET", "/v2/tasks")["tasks"]:
        time.sleep(0.1)
    if running_at is None or serving_at is None:
        raise SystemExit(f"run {run}: {INSTANCES} instances did not come up within 60 s")
    return running_at - started, serving_at - started, rss


def wrk_latency(url, connections, seconds=10):
    return wrk(url, connections, seconds)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--binary", required=True)
    parser.add_argument("--server", required=True)
    parser.add_argument("--work", required=True)
    parser.add_argument("--runs", type=int, default=5)
    arguments = parser.parse_args()

    agent = Agent(arguments.binary, arguments.work)
    try:
        time.sleep(2)
        idle_rss = rss_kib(agent.process.pid)
        results = [deploy_once(agent, arguments.server, run) for run in range(arguments.runs)]
        for run, (running, serving, rss) in enumerate(results):
            print(f"run {run}: all {INSTANCES} TASK_RUNNING after {running:.3f} s, all serving after {serving:.3f} s, agent RSS {rss / 1024:.1f} MiB",
                  file=sys.stderr)

        for index in range(INSTANCES):
            call(agent.base, "POST", "/v2/apps", {"id": f"/bench/apps/app-{index}", "cmd": "sleep 1000", "instances": 0,
                                                   "labels": {"team": "bench"}, "env": {"INDEX": str(index)}})
        time.sleep(1)
        single = wrk_latency(agent.base + "/v2/apps", connections=1)
        loaded = wrk_latency(agent.base + "/v2/apps", connections=8)
        apps_rss = rss_kib(agent.process.pid)
    finally:
        agent.stop()

    running = statistics.median(result[0] for result in results)
    serving = statistics.median(result[1] for result in results)
    rss_loaded = statistics.median(result[2] for result in results)
    print(f"| figure | value (median of {arguments.runs} runs) | target |")
    print("|---|---|---|")
    print(f"| API call → {INSTANCES} instances TASK_RUNNING | {running:.2f} s | < 2 s |")
    print(f"| API call → {INSTANCES} instances answering HTTP | {serving:.2f} s | |")
    print(f"| agent RSS, idle | {idle_rss / 1024:.1f} MiB | < 30 MB |")
    print(f"| agent RSS, {INSTANCES} instances running | {rss_loaded / 1024:.1f} MiB | |")
    print(f"| agent RSS, {INSTANCES} apps defined | {apps_rss / 1024:.1f} MiB | |")
    print(f"| GET /v2/apps, {INSTANCES} apps, 1 connection: p50 / p99 | {single.get('50%')} / {single.get('99%')} ({single.get('rps', 0):.0f} req/s) | p99 < 5 ms |")
    print(f"| GET /v2/apps, {INSTANCES} apps, 8 connections: p50 / p99 | {loaded.get('50%')} / {loaded.get('99%')} ({loaded.get('rps', 0):.0f} req/s) | |")


if __name__ == "__main__":
    main()
