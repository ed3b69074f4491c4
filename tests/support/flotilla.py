"""Run a real `flotilla agent` from tests, and look at what it runs.

The binary comes from $FLOTILLA_BIN (scripts/test.sh sets it), falling back to the debug build.
Every agent gets its own data directory, a free API port, a free DNS port (UDP and TCP), a free
load-balancer port and a random task port range, so several test runs can share a machine.

Instances are found through /proc: the agent gives each instance's processes the environment
variables FLOTILLA_SANDBOX (``<data dir>/sandboxes/<instance id>``), FLOTILLA_INSTANCE_ID and
FLOTILLA_APP_ID, and makes each instance the leader of its own session.
"""

import os
import random
import resource
import signal
import socket
import subprocess
import time
import warnings
from pathlib import Path

import pytest
import requests

REPO_ROOT = Path(__file__).resolve().parents[2]

READY_TIMEOUT_SECONDS = 30
STOP_TIMEOUT_SECONDS = 10
TASK_PORT_COUNT = 200
TASK_PORT_LOWEST = 20000
TASK_PORT_HIGHEST = 29000
LOG_TAIL_LINES = 80
HTTP_TIMEOUT_SECONDS = 10
CLI_TIMEOUT_SECONDS = 60

# Pytest stash key under which tests record the agents they started, so a failing test's report
# can show each agent's log (see tests/conftest.py).
AGENTS_KEY = pytest.StashKey[list]()


def flotilla_binary() -> Path:
    configured = os.environ.get("FLOTILLA_BIN")
    binary = Path(configured) if configured else REPO_ROOT / ".build" / "debug" / "flotilla"
    if not (binary.is_file() and os.access(binary, os.X_OK)):
        pytest.fail(
            f"flotilla binary not found at {binary}: run `swift build` or set FLOTILLA_BIN",
            pytrace=False,
        )
    return binary


# Ports this process has handed out: never twice, even once their probe sockets are closed.
_HANDED_OUT_PORTS = set()


def free_tcp_port() -> int:
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port not in _HANDED_OUT_PORTS:
            _HANDED_OUT_PORTS.add(port)
            return port


def free_tcp_and_udp_port(attempts=100) -> int:
    """A loopback port free for both TCP and UDP (the agent's DNS server binds both).

    The probe sockets do not set SO_REUSEADDR, so a port another process holds (even with
    SO_REUSEADDR, as the agent's DNS sockets do) is seen as taken.
    """
    for _ in range(attempts):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            tcp.bind(("127.0.0.1", 0))
            port = tcp.getsockname()[1]
            if port in _HANDED_OUT_PORTS:
                continue
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                try:
                    udp.bind(("127.0.0.1", port))
                except OSError:
                    continue
        _HANDED_OUT_PORTS.add(port)
        return port
    raise RuntimeError(f"no loopback port free for both TCP and UDP after {attempts} attempts")


def wait_until(predicate, timeout=20, interval=0.2, what=None):
    """Call `predicate` until it returns something truthy, and return that.

    Exceptions from `predicate` propagate: an answer that cannot be parsed is a failure, not
    something to retry.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() >= deadline:
            description = what or getattr(predicate, "__name__", "condition")
            raise AssertionError(
                f"timed out after {timeout}s waiting for {description}; last value: {result!r}"
            )
        time.sleep(interval)


def wait_for_ready(url: str, what: str, timeout=30):
    """Waits until `url + "/-/ready"` answers 200 (Prometheus' and Alertmanager's readiness)."""

    def ready():
        try:
            return requests.get(url + "/-/ready", timeout=1).status_code == 200
        except requests.RequestException:
            return False

    wait_until(ready, timeout=timeout, what=f"{what} to be ready")


# Small enough that many instances fit on a test agent's 4 cpus / 4096 MiB.
SMALL_RESOURCES = {"cpus": 0.1, "mem": 64}


def app_definition(app_id: str, cmd: str, **fields) -> dict:
    """A Marathon app definition with small resources; `fields` override or add to it."""
    return {"id": app_id, "cmd": cmd, **SMALL_RESOURCES, **fields}


# --- processes, through /proc ---------------------------------------------------------------


def process_environment(pid: int) -> dict:
    """The environment `pid` started with; empty when it is gone, a zombie or unreadable."""
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    environment = {}
    for entry in raw.split(b"\0"):
        name, sep, value = entry.partition(b"=")
        if sep:
            environment[name.decode(errors="replace")] = value.decode(errors="replace")
    return environment


def process_stat(pid: int):
    """(state, session id) of `pid` from /proc/<pid>/stat, or None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()
    return fields[0], int(fields[3])


def is_alive(pid: int) -> bool:
    """Whether `pid` exists and is not a zombie."""
    stat = process_stat(pid)
    return stat is not None and stat[0] != "Z"


def all_pids():
    return [int(entry) for entry in os.listdir("/proc") if entry.isdigit()]


class Agent:
    """One `flotilla agent` process listening on 127.0.0.1.

    `restart()` starts it again with the same data directory, API port, DNS port and task port
    range. DNS (UDP and TCP) listens on 127.0.0.1:`dns_port`, the load balancer (HTTP) on
    127.0.0.1:`proxy_port` (`proxy_url`).
    """

    def __init__(
        self,
        binary: Path,
        data_dir: Path,
        *,
        cpus=4,
        mem=4096,
        on_exit="stop",
        extra_args=(),
        node_name="test-node",
        open_files=None,
        bind="127.0.0.1",
    ):
        self.binary = Path(binary)
        # Several agents of one cluster test listen on 127.0.0.2, .3, …: one loopback host each.
        self.bind = bind
        # The agent records sandbox paths as given; resolve symlinks so /proc comparisons hold.
        self.data_dir = Path(os.path.realpath(data_dir))
        self.log_path = self.data_dir / "agent.log"
        self.api_port = free_tcp_port()
        self.dns_port = free_tcp_and_udp_port()
        self.proxy_port = free_tcp_port()
        first_port = random.randint(TASK_PORT_LOWEST, TASK_PORT_HIGHEST - TASK_PORT_COUNT)
        self.task_ports = range(first_port, first_port + TASK_PORT_COUNT)
        self.cpus = cpus
        self.mem = mem
        self.on_exit = on_exit
        self.extra_args = list(extra_args)
        self.node_name = node_name
        # The agent's open-file limit (RLIMIT_NOFILE), when a test needs it low.
        self.open_files = open_files
        self.process = None
        # Set by kill9() until the next start: the agent could not stop its instances.
        self.killed = False

    # --- lifecycle ---

    @property
    def url(self) -> str:
        return f"http://{self.bind}:{self.api_port}"

    @property
    def proxy_url(self) -> str:
        """The load balancer's base URL."""
        return f"http://{self.bind}:{self.proxy_port}"

    @property
    def state_dir(self) -> Path:
        """The agent's --data-dir."""
        return self.data_dir / "data"

    @property
    def sandbox_root(self) -> Path:
        return self.state_dir / "sandboxes"

    def sandbox(self, task_id: str) -> Path:
        return self.sandbox_root / task_id

    def command(self) -> list:
        return [
            str(self.binary), "agent",
            "--data-dir", str(self.state_dir),
            "--bind", self.bind,
            "--api-port", str(self.api_port),
            "--dns-port", str(self.dns_port),
            "--proxy-port", str(self.proxy_port),
            "--ports", f"{self.task_ports[0]}-{self.task_ports[-1]}",
            "--node-name", self.node_name,
            "--cpus", str(self.cpus),
            "--mem", str(self.mem),
            # Tests leave nothing behind: by default instances stop with the agent.
            "--on-exit", self.on_exit,
            *self.extra_args,
        ]

    def start(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.killed = False
        # Appended to, so the log of an agent before a restart stays readable.
        with open(self.log_path, "ab") as log:
            log.write(f"=== test harness: {' '.join(self.command())}\n".encode())
            log.flush()
            self.process = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.data_dir,
                start_new_session=True,  # a Ctrl-C in the terminal reaches pytest, not the agent
                preexec_fn=self._limit_open_files if self.open_files else None,
            )

    def _limit_open_files(self) -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (self.open_files, self.open_files))

    def wait_until_ready(self) -> None:
        """Poll GET /ping until it answers 200 "pong"; fail with the agent's log otherwise."""
        deadline = time.monotonic() + READY_TIMEOUT_SECONDS
        last_answer = "no answer"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(
                    f"flotilla agent exited with code {self.process.returncode} before it was ready\n"
                    f"command: {' '.join(self.command())}\n{self.log_tail()}",
                    pytrace=False,
                )
            try:
                response = requests.get(f"{self.url}/ping", timeout=2)
                if response.status_code == 200 and response.text.strip() == "pong":
                    return
                last_answer = f"HTTP {response.status_code}: {response.text[:200]!r}"
            except requests.RequestException as error:
                last_answer = str(error)
            time.sleep(0.1)
        pytest.fail(
            f"flotilla agent not ready after {READY_TIMEOUT_SECONDS}s (last answer: {last_answer})\n"
            f"command: {' '.join(self.command())}\n{self.log_tail()}",
            pytrace=False,
        )

    def is_running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout=STOP_TIMEOUT_SECONDS) -> bool:
        """SIGTERM the agent (only its PID), then SIGKILL it if it is still there after `timeout`.

        Returns True when the agent ended by itself after SIGTERM (or was not running).
        """
        if not self.is_running():
            return True
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=timeout)
            return True
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            warnings.warn(
                f"flotilla agent ignored SIGTERM for {timeout}s and was killed; log: {self.log_path}"
            )
            return False

    def kill9(self) -> None:
        """SIGKILL the agent process only; its instances run in their own sessions and survive."""
        assert self.is_running(), "kill9() needs a running agent"
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()
        self.killed = True

    def restart(self, on_exit=None) -> None:
        """Start the agent again on the same data directory, API and DNS ports and task port range.

        The previous process must have ended (stop() or kill9()). `on_exit` changes the
        --on-exit policy from now on.
        """
        assert not self.is_running(), "restart() needs the previous agent process to have ended"
        if on_exit is not None:
            self.on_exit = on_exit
        self.start()
        self.wait_until_ready()

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError as error:
            return f"(no agent log: {error})"
        if not text.strip():
            return f"(the agent wrote nothing to {self.log_path})"
        tail = "\n".join(text.splitlines()[-lines:])
        return f"--- last {lines} lines of {self.log_path} ---\n{tail}"

    # --- HTTP ---

    def request(self, method: str, path: str, **kwargs) -> requests.Response:
        kwargs.setdefault("timeout", HTTP_TIMEOUT_SECONDS)
        return requests.request(method, self.url + path, **kwargs)

    def get(self, path, **kwargs):
        return self.request("GET", path, **kwargs)

    def post(self, path, **kwargs):
        return self.request("POST", path, **kwargs)

    def put(self, path, **kwargs):
        return self.request("PUT", path, **kwargs)

    def delete(self, path, **kwargs):
        return self.request("DELETE", path, **kwargs)

    def app(self, app_id: str):
        """GET /v2/apps/<id>: the app object, or None on 404."""
        response = self.get(f"/v2/apps{app_id}")
        if response.status_code == 404:
            return None
        assert response.status_code == 200, f"GET /v2/apps{app_id}: {response.status_code} {response.text}"
        return response.json()["app"]

    def tasks(self, app_id: str) -> list:
        response = self.get(f"/v2/apps{app_id}/tasks")
        assert response.status_code == 200, f"GET /v2/apps{app_id}/tasks: {response.status_code} {response.text}"
        return response.json()["tasks"]

    def queue(self) -> list:
        response = self.get("/v2/queue")
        assert response.status_code == 200, f"GET /v2/queue: {response.status_code} {response.text}"
        return response.json()["queue"]

    def queue_item(self, app_id: str):
        return next((item for item in self.queue() if item["app"]["id"] == app_id), None)

    def deployments(self) -> list:
        response = self.get("/v2/deployments")
        assert response.status_code == 200, f"GET /v2/deployments: {response.status_code} {response.text}"
        return response.json()

    def create_app(self, definition: dict) -> dict:
        """POST /v2/apps, expecting 201; returns the app the agent answered with."""
        response = self.post("/v2/apps", json=definition)
        assert response.status_code == 201, f"POST /v2/apps: {response.status_code} {response.text}"
        return response.json()

    def running_tasks(self, app_id: str, count: int):
        """The app's tasks if exactly `count`, all TASK_RUNNING; otherwise None."""
        tasks = self.tasks(app_id)
        if len(tasks) == count and all(task["state"] == "TASK_RUNNING" for task in tasks):
            return tasks
        return None

    def wait_for_running(self, app_id: str, count: int, timeout=20) -> list:
        try:
            return wait_until(
                lambda: self.running_tasks(app_id, count),
                timeout=timeout,
                what=f"exactly {count} TASK_RUNNING tasks of {app_id}",
            )
        except AssertionError as timed_out:
            now = [(task["id"], task["state"]) for task in self.tasks(app_id)]
            raise AssertionError(f"{timed_out}\ntasks now: {now}") from None

    # --- CLI ---

    def cli_command(self, *args) -> list:
        return [str(self.binary), *map(str, args), "--api", self.url]

    def cli(self, *args, timeout=CLI_TIMEOUT_SECONDS, input=None) -> subprocess.CompletedProcess:
        """Run `flotilla <args> --api <url>` and return what it did (text output)."""
        return subprocess.run(
            self.cli_command(*args),
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=self.data_dir,
        )

    # --- instance processes ---

    def instance_processes(self) -> dict:
        """Every live process started from this agent's sandboxes: {pid: environment}."""
        prefix = str(self.sandbox_root) + "/"
        found = {}
        for pid in all_pids():
            environment = process_environment(pid)
            if environment.get("FLOTILLA_SANDBOX", "").startswith(prefix) and is_alive(pid):
                found[pid] = environment
        return found

    def instance_leaders(self, app_id: str = None) -> dict:
        """{instance id: pid} of the session leaders of this agent's instances (of one app)."""
        leaders = {}
        for pid, environment in self.instance_processes().items():
            if app_id is not None and environment.get("FLOTILLA_APP_ID") != app_id:
                continue
            stat = process_stat(pid)
            if stat is not None and stat[1] == pid:
                instance = environment.get("FLOTILLA_INSTANCE_ID", "")
                assert instance not in leaders, (
                    f"two session leaders for instance {instance}: {leaders[instance]} and {pid}"
                )
                leaders[instance] = pid
        return leaders

    def assert_no_leftovers(self, timeout=5) -> None:
        """Fail (after killing them) if processes started from this agent's sandboxes remain."""
        deadline = time.monotonic() + timeout
        left = self.instance_processes()
        while left and time.monotonic() < deadline:
            time.sleep(0.1)
            left = self.instance_processes()
        if not left:
            return
        description = {pid: environment.get("FLOTILLA_INSTANCE_ID") for pid, environment in left.items()}
        for pid in left:  # processes this test run started; do not leak them
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        raise AssertionError(
            f"processes of agent {self.data_dir} outlived it (killed now): {description}"
        )


def start_agent(binary, data_dir, **options) -> Agent:
    agent = Agent(binary, data_dir, **options)
    agent.start()
    try:
        agent.wait_until_ready()
    except BaseException:
        agent.stop()
        raise
    return agent
