"""Helpers shared by the benchmark drivers: a release agent on loopback and small HTTP calls.

Only the standard library, so the benchmarks run before any virtualenv exists.
"""

import json
import os
import random
import signal
import socket
import subprocess
import time
import urllib.request


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def call(base, method, path, body=None):
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(base + path, data=data, method=method, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read() or b"null")


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def cpu_times(pid, children=False):
    """User and system CPU seconds of a process (all its threads), and with `children` of the
    processes it started too (nginx's workers)."""
    tick = os.sysconf("SC_CLK_TCK")
    user = system = 0
    for entry in os.listdir("/proc") if children else [str(pid)]:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(entry) == pid or int(fields[1]) == pid:
            user += int(fields[11])
            system += int(fields[12])
    return user / tick, system / tick


def cpu_seconds(pid):
    """User plus system CPU time the process has used."""
    return sum(cpu_times(pid))


def serves(port):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
            sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
            return sock.recv(64).startswith(b"HTTP/1.1 200")
    except OSError:
        return False


def stop_process(process, timeout=30):
    """SIGTERM, then SIGKILL if it has not exited within `timeout` seconds."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def wait_for_ping(base, log_name, timeout=30):
    """Waits for an agent's /ping; exits naming its log when it does not answer."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            urllib.request.urlopen(base + "/ping", timeout=1).read()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"the agent at {base} did not start; see {log_name}")


class Agent:
    """A release `flotilla agent` with its own data directory, API port and host-port range."""

    def __init__(self, binary, work, log_level="warning", extra_args=()):
        self.port = free_port()
        self.proxy_port = free_port()
        self.dns_port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        # Below the kernel's ephemeral range (32768 and up), where outgoing connections take ports.
        first = random.randint(20000, 30000)
        self.log = open(os.path.join(work, f"agent-{self.port}.log"), "w")
        self.process = subprocess.Popen(
            [binary, "agent", "--data-dir", os.path.join(work, f"data-{self.port}"), "--api-port", str(self.port),
             "--ports", f"{first}-{first + 999}", "--cpus", "64", "--mem", "65536", "--on-exit", "stop",
             "--proxy-port", str(self.proxy_port), "--dns-port", str(self.dns_port),
             "--log-level", log_level, *extra_args],
            stdout=self.log, stderr=self.log)
        wait_for_ping(self.base, self.log.name)

    def stop(self):
        stop_process(self.process)

    def wait_for_deployment(self, deployment_id, timeout=120):
        """Polls Flotilla's deployment status until it ends; returns (status, reason)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            state = call(self.base, "GET", f"/flotilla/v1/deployments/{deployment_id}")
            if state["status"] != "running":
                return state["status"], state.get("reason")
            time.sleep(0.02)
        raise SystemExit(f"deployment {deployment_id} still running after {timeout} s")


def wrk(url, connections, seconds=10, headers=()):
    """wrk's p50, p99 (as it prints them) and requests/s for `url`; refuses non-2xx answers."""
    command = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency"]
    for header in headers:
        command += ["-H", header]
    output = subprocess.run(command + [url], capture_output=True, text=True, check=True).stdout
    figures = {}
    for line in output.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] in ("50%", "99%"):
            figures[parts[0]] = parts[1]
        if line.startswith("Requests/sec:"):
            figures["rps"] = float(line.split()[1])
        if "Non-2xx" in line:
            raise SystemExit(f"{url}: {line.strip()}")
    return figures
