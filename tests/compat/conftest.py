"""Fixtures that run a real `flotilla agent` for the Marathon client compatibility tests.

The binary comes from $FLOTILLA_BIN (scripts/test.sh sets it), falling back to the debug build.
Each test module gets its own agent, with its own data directory, API port and task port range,
so several test runs can share a machine.
"""

import os
import random
import re
import signal
import socket
import subprocess
import time
import uuid
import warnings
from pathlib import Path

import pytest
import requests
from marathon import MarathonClient
from marathon.exceptions import NotFoundError

REPO_ROOT = Path(__file__).resolve().parents[2]

READY_TIMEOUT_SECONDS = 30
STOP_TIMEOUT_SECONDS = 10
TASK_PORT_COUNT = 200
TASK_PORT_LOWEST = 20000
TASK_PORT_HIGHEST = 29000
LOG_TAIL_LINES = 80


def flotilla_binary() -> Path:
    configured = os.environ.get("FLOTILLA_BIN")
    binary = Path(configured) if configured else REPO_ROOT / ".build" / "debug" / "flotilla"
    if not (binary.is_file() and os.access(binary, os.X_OK)):
        pytest.fail(
            f"flotilla binary not found at {binary}: run `swift build` or set FLOTILLA_BIN",
            pytrace=False,
        )
    return binary


def free_tcp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Agent:
    """One `flotilla agent` process listening on 127.0.0.1."""

    def __init__(self, binary: Path, data_dir: Path):
        self.binary = binary
        self.data_dir = data_dir
        self.log_path = data_dir / "agent.log"
        self.api_port = free_tcp_port()
        first_port = random.randint(TASK_PORT_LOWEST, TASK_PORT_HIGHEST - TASK_PORT_COUNT)
        self.task_ports = range(first_port, first_port + TASK_PORT_COUNT)
        self.process = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def command(self) -> list:
        return [
            str(self.binary), "agent",
            "--data-dir", str(self.data_dir / "data"),
            "--bind", "127.0.0.1",
            "--api-port", str(self.api_port),
            "--ports", f"{self.task_ports[0]}-{self.task_ports[-1]}",
            "--node-name", "test-node",
            "--cpus", "4",
            "--mem", "4096",
            # Tests leave nothing behind: instances stop with the agent.
            "--on-exit", "stop",
        ]

    def start(self) -> None:
        (self.data_dir / "data").mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.data_dir,
                start_new_session=True,  # a Ctrl-C in the terminal reaches pytest, not the agent
            )

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

    def stop(self) -> None:
        """SIGTERM the agent (only its PID), then SIGKILL it if it is still there after 10 s."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=STOP_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            warnings.warn(
                f"flotilla agent ignored SIGTERM for {STOP_TIMEOUT_SECONDS}s and was killed; "
                f"log: {self.log_path}"
            )

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError as error:
            return f"(no agent log: {error})"
        if not text.strip():
            return f"(the agent wrote nothing to {self.log_path})"
        tail = "\n".join(text.splitlines()[-lines:])
        return f"--- last {lines} lines of {self.log_path} ---\n{tail}"


@pytest.fixture(scope="module")
def agent(tmp_path_factory):
    agent = Agent(flotilla_binary(), tmp_path_factory.mktemp("flotilla-agent"))
    agent.start()
    try:
        agent.wait_until_ready()
        yield agent
    finally:
        agent.stop()


@pytest.fixture(scope="module")
def client(agent):
    return MarathonClient(agent.url, timeout=10)


class AppIds:
    """Hands out unique app ids under /compat and remembers them for cleanup."""

    def __init__(self, test_name: str):
        slug = re.sub(r"[^a-z0-9]+", "-", test_name.lower()).strip("-")
        self.default_name = slug.removeprefix("test-") or "app"
        self.issued = []

    def new(self, name: str = None) -> str:
        """An id like /compat/<name or test name>-<random>; `name` may contain '/' to nest."""
        app_id = f"/compat/{name or self.default_name}-{uuid.uuid4().hex[:8]}"
        self.issued.append(app_id)
        return app_id


@pytest.fixture
def app_ids(request, client):
    """Unique app ids for one test; every app created under them is deleted afterwards."""
    ids = AppIds(request.node.name)
    yield ids
    for app_id in ids.issued:
        try:
            client.delete_app(app_id, force=True)
        except NotFoundError:
            pass


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Attach the tail of the agent's log to every failing test's report."""
    outcome = yield
    report = outcome.get_result()
    agent = item.funcargs.get("agent") if hasattr(item, "funcargs") else None
    if report.failed and isinstance(agent, Agent):
        report.sections.append(("flotilla agent log", agent.log_tail()))
