"""Drives bench/proxy_tls.sh: HTTPS termination through Flotilla (--proxy-https-port), HAProxy
(`bind … ssl crt`) and nginx (`listen … ssl`), each with two threads, the same ECDSA P-256
certificate and a keep-alive upstream to one nginx backend, all on loopback.

Two loads: wrk over kept-alive TLS connections (the cost of encrypting a request and its
response), and wrk with `Connection: close` (a full TLS handshake per request). Each row gives
the median requests/s, p50/p99, and the proxy's CPU time per request from /proc."""

import argparse
import json
import os
import ssl
import statistics
import subprocess
import time
import urllib.request

from benchlib import Agent, cpu_times, free_port
from proxy_bench import THREADS, haproxy, nginx, wait_for, write, wrk


def certificate(work):
    """A self-signed ECDSA P-256 certificate for localhost: (chain+key PEM, cert, key)."""
    key, cert = os.path.join(work, "bench.key"), os.path.join(work, "bench.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-keyout", key, "-out", cert, "-days", "2", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost"],
                   check=True, capture_output=True)
    combined = os.path.join(work, "combined.pem")
    write(combined, open(cert).read() + open(key).read())
    return combined, cert, key


def haproxy_tls(work, port, backend_port, combined):
    config = os.path.join(work, "haproxy-tls.cfg")
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
    bind 127.0.0.1:{port} ssl crt {combined} alpn http/1.1
    default_backend backend
backend backend
    server one 127.0.0.1:{backend_port}
""")
    return subprocess.Popen(["haproxy", "-f", config, "-db"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--binary", required=True)
    parser.add_argument("--work", required=True)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    arguments = parser.parse_args()

    combined, cert, key = certificate(arguments.work)
    certs = os.path.join(arguments.work, "certs")
    os.makedirs(certs)
    write(os.path.join(certs, "default.pem"), open(cert).read())
    write(os.path.join(certs, "default.key"), open(key).read())
    backend_port, haproxy_port, nginx_port, https_port = free_port(), free_port(), free_port(), free_port()
    processes = []
    agent = None
    try:
        processes.append(nginx(arguments.work, "backend", f"""
    server {{ listen 127.0.0.1:{backend_port}; location / {{ return 200 "hello, world\\n"; }} }}"""))
        processes.append(nginx(arguments.work, "proxy", f"""
    upstream backend {{ server 127.0.0.1:{backend_port}; keepalive 64; }}
    server {{ listen 127.0.0.1:{nginx_port} ssl; ssl_certificate {cert}; ssl_certificate_key {key};
        ssl_session_cache off; ssl_session_tickets off;
        location / {{ proxy_pass http://backend; proxy_http_version 1.1; proxy_set_header Connection ""; }} }}"""))
        processes.append(haproxy_tls(arguments.work, haproxy_port, backend_port, combined))
        agent = Agent(arguments.binary, arguments.work, extra_args=["--proxy-https-port", str(https_port), "--proxy-cert-dir", certs])
        body = json.dumps({"Name": "bench-backend", "Address": "127.0.0.1", "Port": backend_port, "Tags": ["urlprefix-/"],
                           "Check": {"TTL": "600s", "Status": "passing"}}).encode()
        urllib.request.urlopen(urllib.request.Request(agent.base + "/v1/agent/service/register", data=body, method="PUT"), timeout=10).read()
        targets = {
            "Flotilla": f"https://localhost:{https_port}/",
            "HAProxy": f"https://localhost:{haproxy_port}/",
            "nginx": f"https://localhost:{nginx_port}/",
        }
        pids = {"Flotilla": agent.process.pid, "HAProxy": processes[2].pid, "nginx": processes[1].pid}
        wait_for(f"http://127.0.0.1:{backend_port}/")
        unverified = ssl._create_unverified_context()
        for url in targets.values():
            for _ in range(200):
                try:
                    if urllib.request.urlopen(url, timeout=1, context=unverified).status == 200:
                        break
                except OSError:
                    time.sleep(0.1)
        loads = {"kept alive": [], "new connection per request": ["Connection: close"]}
        results = {(load, name): [] for load in loads for name in targets}
        for _ in range(arguments.rounds):
            for load, headers in loads.items():
                for name, url in targets.items():
                    before = cpu_times(pids[name], children=True)
                    run = wrk(url, arguments.seconds, arguments.connections if not headers else 16, headers)
                    after = cpu_times(pids[name], children=True)
                    run["cpu_us"] = 1e6 * ((after[0] - before[0]) + (after[1] - before[1])) / max(1, run["requests"])
                    results[(load, name)].append(run)
    finally:
        if agent:
            agent.stop()
        for process in processes:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()

    print(f"| HTTPS, {THREADS} threads each, wrk -t{THREADS}, {arguments.seconds} s × {arguments.rounds} rounds | requests/s (median) | p50 | p99 | vs HAProxy | proxy CPU per request (median) | errors |")
    print("|---|---|---|---|---|---|---|")
    for load in loads:
        reference = statistics.median(run["rps"] for run in results[(load, "HAProxy")])
        for name in targets:
            runs = results[(load, name)]
            rps = statistics.median(run["rps"] for run in runs)
            middle = sorted(runs, key=lambda run: run["rps"])[len(runs) // 2]
            cpu = statistics.median(run["cpu_us"] for run in runs)
            errors = sum(run["non2xx"] for run in runs)
            sockets = ", ".join(sorted({run["socket"] for run in runs}))
            print(f"| {load}: {name} | {rps:,.0f} | {middle['p50']} | {middle['p99']} | {rps / reference:.2f}× | {cpu:.1f} µs | {errors} non-2xx; socket errors: {sockets} |")


if __name__ == "__main__":
    main()
