"""Drives bench/acl.sh: see there. Standard library only."""

import argparse
import json
import os
import statistics
import subprocess
import urllib.request

from benchlib import Agent, wrk

POLICIES = 100


def request(base, method, path, body=None, token=None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(base + path, data=data, method=method, headers={"Content-Type": "application/json"})
    if token:
        req.add_header("X-Vault-Token", token)
    with urllib.request.urlopen(req, timeout=10) as response:
        text = response.read()
        return json.loads(text) if text else None


def populate(agent, token=None):
    for index in range(10):
        request(agent.base, "POST", "/v2/apps", {"id": f"/team-{index}/web", "cmd": "sleep 1000", "instances": 0, "cpus": 0.01, "mem": 8}, token)
    request(agent.base, "POST", "/v1/secret/data/team-0/db", {"data": {"password": "x" * 32}}, token)
    req = urllib.request.Request(agent.base + "/v1/kv/team-0/db", data=b"x" * 32, method="PUT")
    if token:
        req.add_header("X-Vault-Token", token)
    urllib.request.urlopen(req, timeout=10).read()


def median_of(runs, measure):
    results = [measure() for _ in range(runs)]
    def ms(text):
        return float(text[:-2]) / 1000 if text.endswith("us") else float(text[:-2]) if text.endswith("ms") else float(text[:-1]) * 1000
    return (statistics.median(ms(r["50%"]) for r in results), statistics.median(ms(r["99%"]) for r in results),
            statistics.median(r["rps"] for r in results))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--binary", required=True)
    parser.add_argument("--work", required=True)
    parser.add_argument("--runs", type=int, default=3)
    arguments = parser.parse_args()
    key = os.path.join(arguments.work, "secrets.key")
    with open(key, "w") as file:
        file.write(subprocess.run([arguments.binary, "secrets", "keygen"], capture_output=True, text=True, check=True).stdout)
    os.chmod(key, 0o600)
    rows = []
    for acl in ("allow", "default-deny"):
        agent = Agent(arguments.binary, arguments.work, extra_args=["--secrets-key-file", key, "--acl", acl])
        try:
            token = None
            if acl == "default-deny":
                root = request(agent.base, "PUT", "/v1/acl/bootstrap")["SecretID"]
                for index in range(POLICIES):
                    text = (f'path "secret/data/team-{index}/*" {{ capabilities = ["read"] }}\n'
                            f'path "marathon/apps/team-{index}/*" {{ capabilities = ["read", "update"] }}\n'
                            f'key_prefix "team-{index}/" {{ policy = "read" }}\n')
                    request(agent.base, "PUT", f"/v1/sys/policies/acl/team-{index}", {"policy": text}, root)
                request(agent.base, "PUT", "/v1/sys/policies/acl/list-apps", {"policy": 'path "marathon/apps" { capabilities = ["read"] }'}, root)
                names = [f"team-{index}" for index in range(POLICIES)] + ["list-apps"]
                token = request(agent.base, "POST", "/v1/auth/token/create", {"policies": names}, root)["auth"]["client_token"]
                populate(agent, root)
            else:
                populate(agent)
            for label, path in (("GET /v2/apps (10 apps)", "/v2/apps"), ("secret read", "/v1/secret/data/team-0/db"),
                                ("Consul KV read", "/v1/kv/team-0/db")):
                for connections in (1, 8):
                    headers = [f"X-Vault-Token: {token}"] if token else []
                    p50, p99, rps = median_of(arguments.runs, lambda: wrk(agent.base + path, connections, seconds=5, headers=headers))
                    rows.append((label, acl, connections, p50, p99, rps))
        finally:
            agent.stop()
    print(f"| request | --acl | connections | p50 | p99 | req/s (median of {arguments.runs}) |")
    print("|---|---|---|---|---|---|")
    for label, acl, connections, p50, p99, rps in rows:
        print(f"| {label} | {acl} | {connections} | {p50:.2f} ms | {p99:.2f} ms | {rps:,.0f} |")


if __name__ == "__main__":
    main()
