"""A real rsyslog (Debian's `rsyslog`) on loopback, as the collector `--log-forward` sends to.

It runs in the foreground as the test's own process (`rsyslogd -n -f CONF -i PIDFILE`), with its
config, work directory and output in a temp directory, listening on one 127.0.0.1 port for both
UDP (imudp) and TCP (imtcp). Every message it receives is one line of `messages.log` with its
input, PRI, timestamp, hostname, APP-NAME, PROCID, structured data and text, tab-separated.
"""

import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from support.flotilla import free_tcp_and_udp_port, wait_until

TEMPLATE = "%inputname%\\t%pri%\\t%timereported:::date-rfc3339%\\t%hostname%\\t%app-name%\\t%procid%\\t%structured-data%\\t%msg%\\n"
SD_PARAM = re.compile(r'([^\s=\]]+)="((?:[^"\\]|\\.)*)"')


def rsyslogd() -> str:
    for candidate in (shutil.which("rsyslogd"), "/usr/sbin/rsyslogd"):
        if candidate and Path(candidate).exists():
            return candidate
    raise RuntimeError("rsyslogd not found: install Debian's rsyslog (scripts/test.sh does)")


class Message:
    def __init__(self, line: str):
        fields = line.rstrip("\n").split("\t", 7)
        if len(fields) != 8:
            raise AssertionError(f"not a line of the rsyslog template: {line!r}")
        self.input, pri, self.timestamp, self.hostname, self.app_name, self.procid, self.structured_data, self.text = fields
        self.pri = int(pri)
        self.sd = {
            name: re.sub(r"\\(.)", r"\1", value) for name, value in SD_PARAM.findall(self.structured_data)
        }

    def __repr__(self):
        return f"Message({self.input} <{self.pri}> {self.app_name} {self.structured_data} {self.text!r})"


class Rsyslog:
    def __init__(self, directory: Path, port: int = None):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = port or free_tcp_and_udp_port()
        self.output = self.directory / "messages.log"
        self.config = self.directory / "rsyslog.conf"
        self.pidfile = self.directory / "rsyslogd.pid"
        self.log = self.directory / "rsyslogd.log"
        self.process = None
        self.config.write_text(
            f'global(workDirectory="{self.directory}" maxMessageSize="64k")\n'
            'module(load="imudp")\n'
            'module(load="imtcp")\n'
            f'input(type="imudp" address="127.0.0.1" port="{self.port}")\n'
            f'input(type="imtcp" address="127.0.0.1" port="{self.port}")\n'
            f'template(name="flotillaTest" type="string" string="{TEMPLATE}")\n'
            f'action(type="omfile" file="{self.output}" template="flotillaTest" flushOnTXEnd="on" asyncWriting="off")\n'
        )

    def start(self) -> None:
        assert self.process is None, "rsyslog is running already"
        self.pidfile.unlink(missing_ok=True)
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [rsyslogd(), "-n", "-f", str(self.config), "-i", str(self.pidfile)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )

        def listening():
            if self.process.poll() is not None:
                raise AssertionError(f"rsyslogd exited with {self.process.returncode}: {self.log.read_text()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return True
            except OSError:
                return False

        wait_until(listening, timeout=15, interval=0.1, what=f"rsyslogd to listen on 127.0.0.1:{self.port}")

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None

    def messages(self) -> list:
        try:
            text = self.output.read_text(errors="replace")
        except FileNotFoundError:
            return []
        return [Message(line) for line in text.splitlines() if line]

    def wait_for(self, predicate, timeout=20, what="messages"):
        """Waits until `predicate(messages)` is truthy and returns the messages."""

        def check():
            messages = self.messages()
            return messages if predicate(messages) else None

        return wait_until(check, timeout=timeout, interval=0.2, what=what)
