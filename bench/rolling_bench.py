"""Drives bench/rolling.sh: rolling restarts of 20 health-checked instances on a release agent.

The minimum a restart can take follows from the strategy. With (minimumHealthCapacity 1,
maximumOverCapacity 1) all new instances start at once, pass their first check, then the old ones
drain for `drainSeconds` and stop: one drain. With (0.5, 0) there is no headroom: half the old
instances drain and stop before their replacements may start (an instance on its way out still
counts), the new half passes a check, then the other half drains: two drains. The first check of
an instance can pass at once, so the minimum counts the drains alone; the check interval is the
part of the gap a restart may spend waiting for checks.
"""

import argparse
import statistics
import time

from benchlib import Agent, call, cpu_seconds

INSTANCES = 20
INTERVAL = 1.0
DRAIN = 2.0

# (name, strategy, drains the restart must wait for one after the other)
STRATEGIES = [
    ("minimumHealthCapacity 1, maximumOverCapacity 1", {"minimumHealthCapacity": 1, "maximumOverCapacity": 1}, 1),
    ("minimumHealthCapacity 0.5, maximumOverCapacity 0", {"minimumHealthCapacity": 0.5, "maximumOverCapacity": 0}, 2),
]


def definition(app_id, server, strategy):
    return {
        "id": app_id, "cmd": f"exec {server} $PORT0", "instances": INSTANCES, "cpus": 0.01, "mem": 8,
        "portDefinitions": [{"port": 0}], "drainSeconds": DRAIN, "upgradeStrategy": strategy,
        "healthChecks": [{"protocol": "HTTP", "path": "/", "intervalSeconds": INTERVAL, "timeoutSeconds": 0.5,
                          "gracePeriodSeconds": 10, "maxConsecutiveFailures": 3}],
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--binary", required=True)
    parser.add_argument("--server", required=True)
    parser.add_argument("--work", required=True)
    parser.add_argument("--runs", type=int, default=3)
    arguments = parser.parse_args()

    agent = Agent(arguments.binary, arguments.work)
    rows = []
    try:
        for index, (name, strategy, drains) in enumerate(STRATEGIES):
            app_id = f"/bench/rolling-{index}"
            created = call(agent.base, "POST", "/v2/apps", definition(app_id, arguments.server, strategy))
            status, reason = agent.wait_for_deployment(created["deployments"][0]["id"])
            if status != "succeeded":
                raise SystemExit(f"initial deployment of {app_id} {status}: {reason}")
            durations, cpu_shares = [], []
            for _ in range(arguments.runs):
                cpu_before = cpu_seconds(agent.process.pid)
                started = time.perf_counter()
                restart = call(agent.base, "POST", f"/v2/apps{app_id}/restart")
                status, reason = agent.wait_for_deployment(restart["deploymentId"])
                elapsed = time.perf_counter() - started
                if status != "succeeded":
                    raise SystemExit(f"restart of {app_id} {status}: {reason}")
                durations.append(elapsed)
                cpu_shares.append((cpu_seconds(agent.process.pid) - cpu_before) / elapsed)
            minimum = drains * DRAIN
            median = statistics.median(durations)
            rows.append((name, median, minimum, statistics.median(cpu_shares), durations))
            call(agent.base, "DELETE", f"/v2/apps{app_id}?force=true")
    finally:
        agent.stop()

    print(f"| strategy ({INSTANCES} instances, HTTP check every {INTERVAL:g} s, drain {DRAIN:g} s) | restart (median of {arguments.runs}) | minimum (drains) | ratio | agent CPU during it |")
    print("|---|---|---|---|---|")
    for name, median, minimum, cpu, durations in rows:
        print(f"| {name} | {median:.2f} s | {minimum:.1f} s | {median / minimum:.2f}× | {cpu * 100:.0f}% of one core |")


if __name__ == "__main__":
    main()
