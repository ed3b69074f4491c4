"""Drives bench/proxy.sh: one backend, and wrk through Flotilla's proxy, HAProxy and nginx (same
thread count, upstream keep-alive on all three) and directly, in one run, all on loopback.

The backend is nginx answering a fixed 13-byte body on a keep-alive connection, so the proxies,
not the backend, are what differs. Besides requests per second it reports each proxy's CPU time
per request (user and system, from /proc, summed over its processes and threads): on a small
shared machine where wrk, the backend and the proxy compete for the same cores, that is the
steadier measure of what a proxy costs. A last row sends the same load through a Flotilla TCP
route to the same backend: a byte relay on the same event loops, the floor under its HTTP proxy. Flotilla routes to it through its registry: the backend is
registered through the Consul agent API with a `urlprefix-/` tag and a passing TTL check.
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import time
import urllib.request

from benchlib import Agent, cpu_times, free_port, rss_kib

THREADS = 2


def write(path, text):
    with open(path, "w") as handle:
        handle.write(text)


def wait_for(url, timeout=20):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"{url} did not answer")


def nginx(work, name, config_body):
    directory = os.path.join(work, name)
    os.makedirs(directory, exist_ok=True)
    config = os.path.join(directory, "nginx.conf")
    write(config, f"""
worker_processes {THREADS};
daemon off;
pid {directory}/nginx.pid;
error_log {directory}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {directory}/body;
    proxy_temp_path {directory}/proxy;
    fastcgi_temp_path {directory}/fastcgi;
    uwsgi_temp_path {directory}/uwsgi;
    scgi_temp_path {directory}/scgi;
    keepalive_requests 1000000;
    {config_body}
}}
""")
    return subprocess.Popen(["nginx", "-c", config, "-p", directory], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def haproxy(work, port, backend_port):
    config = os.path.join(work, "haproxy.cfg")
    write(config, f"""
global
    nbthread {THREADS}
    maxconn 4096
defaults
    mode http
    timeout connect 1s
    timeout client 60s
    timeout server 60s
    option http-keep-alive
    http-reuse always
frontend bench
    bind 127.0.0.1:{port}
    default_backend backend
backend backend
    server one 127.0.0.1:{backend_port}
""")
    return subprocess.Popen(["haproxy", "-f", config, "-db"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def wrk(url, seconds, connections, headers=()):
    extra = [argument for header in headers for argument in ("-H", header)]
    output = subprocess.run(
        ["wrk", f"-t{THREADS}", f"-c{connections}", f"-d{seconds}s", "--latency", *extra, url], capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))
    p50 = re.search(r"^\s+50%\s+(\S+)", output, re.M).group(1)
    p99 = re.search(r"^\s+99%\s+(\S+)", output, re.M).group(1)
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    sockets = re.search(r"Socket errors: (.*)", output)
    total = int(re.search(r"(\d+) requests in", output).group(1))
    return {"rps": rps, "p50": p50, "p99": p99, "non2xx": int(errors.group(1)) if errors else 0,
            "socket": sockets.group(1).strip() if sockets else "none", "requests": total}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--binary", required=True)
    parser.add_argument("--work", required=True)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--million", type=int, default=1_000_000, help="requests for the RSS check")
    arguments = parser.parse_args()

    backend_port, haproxy_port, nginx_proxy_port, tcp_route_port = free_port(), free_port(), free_port(), free_port()
    processes = []
    agent = None
    try:
        processes.append(nginx(arguments.work, "backend", f"""
    server {{ listen 127.0.0.1:{backend_port}; location / {{ return 200 "hello, world\\n"; }} }}"""))
        processes.append(nginx(arguments.work, "proxy", f"""
    upstream backend {{ server 127.0.0.1:{backend_port}; keepalive 64; }}
    server {{ listen 127.0.0.1:{nginx_proxy_port};
        location / {{ proxy_pass http://backend; proxy_http_version 1.1; proxy_set_header Connection ""; }} }}"""))
        processes.append(haproxy(arguments.work, haproxy_port, backend_port))
        agent = Agent(arguments.binary, arguments.work)
        proxy_port = agent.proxy_port
        body = json.dumps({"Name": "bench-backend", "Address": "127.0.0.1", "Port": backend_port, "Tags": ["urlprefix-/", f"urlprefix-:{tcp_route_port} proto=tcp"],
                           "Check": {"TTL": "600s", "Status": "passing"}}).encode()
        urllib.request.urlopen(urllib.request.Request(agent.base + "/v1/agent/service/register", data=body, method="PUT"), timeout=10).read()
        targets = {
            "direct": f"http://127.0.0.1:{backend_port}/",
            "Flotilla": f"http://127.0.0.1:{proxy_port}/",
            "HAProxy": f"http://127.0.0.1:{haproxy_port}/",
            "nginx": f"http://127.0.0.1:{nginx_proxy_port}/",
            # The same agent relaying TCP (no HTTP parsing, one upstream connection per client
            # connection): the floor under Flotilla's HTTP proxy on this event-loop stack.
            "Flotilla TCP route": f"http://127.0.0.1:{tcp_route_port}/",
        }
        pids = {"Flotilla": agent.process.pid, "HAProxy": processes[2].pid, "nginx": processes[1].pid, "Flotilla TCP route": agent.process.pid}
        for url in targets.values():
            wait_for(url)
        results = {name: [] for name in targets}
        # Rounds interleave the contenders so the machine's noise falls on all of them alike.
        for _ in range(arguments.rounds):
            for name, url in targets.items():
                before = cpu_times(pids[name], children=True) if name in pids else (0, 0)
                run = wrk(url, arguments.seconds, arguments.connections)
                after = cpu_times(pids[name], children=True) if name in pids else (0, 0)
                run["user_us"] = 1e6 * (after[0] - before[0]) / run["requests"]
                run["sys_us"] = 1e6 * (after[1] - before[1]) / run["requests"]
                results[name].append(run)

        rss_before = rss_kib(agent.process.pid)
        sent = 0
        while sent < arguments.million:
            sent += wrk(targets["Flotilla"], 10, arguments.connections)["requests"]
        rss_after = rss_kib(agent.process.pid)
    finally:
        if agent:
            agent.stop()
        for process in processes:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()

    haproxy_rps = statistics.median(run["rps"] for run in results["HAProxy"])
    haproxy_cpu = statistics.median(run["user_us"] + run["sys_us"] for run in results["HAProxy"])
    print(f"| {THREADS} threads each, wrk -t{THREADS} -c{arguments.connections}, {arguments.seconds} s × {arguments.rounds} rounds | requests/s (median) | p50 | p99 | vs HAProxy | proxy CPU per request, user + system (median) | errors |")
    print("|---|---|---|---|---|---|---|")
    for name, runs in results.items():
        rps = statistics.median(run["rps"] for run in runs)
        middle = sorted(runs, key=lambda run: run["rps"])[len(runs) // 2]
        errors = sum(run["non2xx"] for run in runs)
        sockets = ", ".join(sorted({run["socket"] for run in runs}))
        if name in pids:
            user = statistics.median(run["user_us"] for run in runs)
            system = statistics.median(run["sys_us"] for run in runs)
            total = statistics.median(run["user_us"] + run["sys_us"] for run in runs)
            cpu = f"{user:.1f} + {system:.1f} µs ({haproxy_cpu / total:.2f}× HAProxy's efficiency)"
        else:
            cpu = "—"
        print(f"| {name} | {rps:,.0f} | {middle['p50']} | {middle['p99']} | {rps / haproxy_rps:.2f}× | {cpu} | {errors} non-2xx; socket errors: {sockets} |")
    print(f"\nFlotilla agent RSS before {arguments.million:,} more requests through its proxy: {rss_before / 1024:.1f} MiB; after ({sent:,} sent): {rss_after / 1024:.1f} MiB")


if __name__ == "__main__":
    main()
