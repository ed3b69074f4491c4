"""A real etcd (Debian's etcd-server) for tests: one member or several, on 127.0.0.1 with
ephemeral ports and temporary data directories, stopped and removed afterwards."""

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from support.flotilla import free_tcp_port, wait_until


def etcd_binary() -> str:
    found = shutil.which("etcd") or ("/usr/bin/etcd" if os.path.exists("/usr/bin/etcd") else None)
    if not found:
        raise RuntimeError("etcd is not installed: apt-get install etcd-server (scripts/test.sh does)")
    return found


class EtcdMember:
    def __init__(self, name: str, data_dir: Path):
        self.name = name
        self.data_dir = data_dir
        self.client_port = free_tcp_port()
        self.peer_port = free_tcp_port()
        self.process = None
        self.paused = False

    scheme = "http"

    @property
    def client_url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"


class EtcdCluster:
    """`EtcdCluster(tmp_path, members=3)`; `.endpoints` is the comma list for `--store etcd://`.

    With `tls=True` clients must speak TLS and show a certificate: a test CA (trustme) signs the
    members' certificate (for 127.0.0.1) and a client's; `.ca_file`, `.client_cert_file` and
    `.client_key_file` are the PEM files for `--etcd-ca/--etcd-cert/--etcd-key`.
    """

    def __init__(self, directory: Path, members: int = 1, tls: bool = False):
        self.directory = Path(directory)
        self.tls = tls
        self.members = [EtcdMember(f"m{number}", self.directory / f"m{number}") for number in range(members)]
        if tls:
            import trustme

            self.directory.mkdir(parents=True, exist_ok=True)
            authority = trustme.CA()
            server = authority.issue_cert("127.0.0.1", "localhost")
            client = authority.issue_cert("flotilla-agent")
            self.ca_file = str(self.directory / "ca.pem")
            self.server_cert_file, self.server_key_file = str(self.directory / "server.pem"), str(self.directory / "server-key.pem")
            self.client_cert_file, self.client_key_file = str(self.directory / "client.pem"), str(self.directory / "client-key.pem")
            authority.cert_pem.write_to_path(self.ca_file)
            server.cert_chain_pems[0].write_to_path(self.server_cert_file)
            server.private_key_pem.write_to_path(self.server_key_file)
            client.cert_chain_pems[0].write_to_path(self.client_cert_file)
            client.private_key_pem.write_to_path(self.client_key_file)
            for member in self.members:
                member.scheme = "https"
        initial = ",".join(f"{member.name}={member.peer_url}" for member in self.members)
        for member in self.members:
            self._start(member, initial)
        wait_until(self.healthy, timeout=30, what="etcd answering")

    def _start(self, member: EtcdMember, initial: str = None) -> None:
        member.data_dir.mkdir(parents=True, exist_ok=True)
        initial = initial or ",".join(f"{m.name}={m.peer_url}" for m in self.members)
        command = [
            etcd_binary(), "--name", member.name, "--data-dir", str(member.data_dir / "data"),
            "--listen-client-urls", member.client_url, "--advertise-client-urls", member.client_url,
            "--listen-peer-urls", member.peer_url, "--initial-advertise-peer-urls", member.peer_url,
            "--initial-cluster", initial, "--initial-cluster-token", f"t{os.getpid()}-{id(self)}",
            "--initial-cluster-state", "new",
        ]
        if self.tls:
            command += [
                "--cert-file", self.server_cert_file, "--key-file", self.server_key_file, "--trusted-ca-file", self.ca_file,
                "--client-cert-auth",
            ]
        log = open(member.data_dir / "etcd.log", "ab")
        member.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        log.close()

    @property
    def endpoints(self) -> str:
        return ",".join(f"127.0.0.1:{member.client_port}" for member in self.members)

    @property
    def store_url(self) -> str:
        return "etcd://" + self.endpoints

    def etcdctl(self, *args, timeout=15) -> subprocess.CompletedProcess:
        endpoints = ",".join(member.client_url for member in self.members)
        tls = ["--cacert", self.ca_file, "--cert", self.client_cert_file, "--key", self.client_key_file] if self.tls else []
        return subprocess.run(
            ["etcdctl", "--endpoints", endpoints, *tls, *args], capture_output=True, text=True, timeout=timeout,
            env={**os.environ, "ETCDCTL_API": "3"},
        )

    def healthy(self) -> bool:
        try:
            return self.etcdctl("endpoint", "health", timeout=10).returncode == 0
        except subprocess.TimeoutExpired:
            return False

    def keys(self, prefix: str) -> list:
        result = self.etcdctl("get", "--prefix", "--keys-only", prefix)
        assert result.returncode == 0, result.stderr
        return [line for line in result.stdout.splitlines() if line]

    def pause(self) -> None:
        """SIGSTOP every member: etcd unreachable, as in an outage (connections hang)."""
        for member in self.members:
            member.process.send_signal(signal.SIGSTOP)
            member.paused = True

    def resume(self) -> None:
        for member in self.members:
            if member.paused:
                member.process.send_signal(signal.SIGCONT)
                member.paused = False

    def stop(self) -> None:
        self.resume()
        for member in self.members:
            if member.process and member.process.poll() is None:
                member.process.terminate()
        for member in self.members:
            if member.process:
                try:
                    member.process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    member.process.kill()
                    member.process.wait()
        shutil.rmtree(self.directory, ignore_errors=True)
