"""Real OCI images and a real registry for the container tests.

Images are built with umoci from busybox-static (its `httpd` serves a file that names the tag),
pushed with skopeo to Debian's docker-registry on 127.0.0.1 with htpasswd basic auth. Nothing
here imitates a registry or an image: the agent talks to the same programs a user would.
"""

import base64
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import requests

from support.flotilla import free_tcp_port, wait_until

BUSYBOX = "/bin/busybox"
BUSYBOX_TOOLS = ["sh", "httpd", "echo", "cat", "ls", "sleep", "head", "tail", "id", "wc", "dd", "env", "hostname", "true", "false",
                 "touch", "grep", "unshare"]
REGISTRY_USER = "flotilla"
REGISTRY_PASSWORD = "s3cret-registry-pass"


def run(*command, cwd=None):
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"{' '.join(map(str, command))} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    return result.stdout


def build_httpd_image(layout: Path, tag: str, body: str, extra_files=None) -> str:
    """Adds `tag` to the OCI layout at `layout`: busybox with `httpd -f -p 8080 -h /www`, whose
    /www/index.html holds `body`. Returns the manifest digest."""
    if not (layout / "index.json").exists():
        run("umoci", "init", "--layout", str(layout))
    run("umoci", "new", "--image", f"{layout}:{tag}")
    bundle = layout.parent / f"bundle-{tag}"
    if bundle.exists():
        shutil.rmtree(bundle)
    run("umoci", "unpack", "--image", f"{layout}:{tag}", str(bundle))
    rootfs = bundle / "rootfs"
    (rootfs / "bin").mkdir(parents=True, exist_ok=True)
    shutil.copy2(BUSYBOX, rootfs / "bin" / "busybox")
    for tool in BUSYBOX_TOOLS:
        os.symlink("busybox", rootfs / "bin" / tool)
    (rootfs / "www").mkdir()
    (rootfs / "www" / "index.html").write_text(body)
    (rootfs / "etc").mkdir(exist_ok=True)
    (rootfs / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\nwww:x:1000:1000:www:/www:/bin/sh\n")
    (rootfs / "etc" / "group").write_text("root:x:0:\nwww:x:1000:\n")
    (rootfs / "only-in-image").write_text(tag)
    for name, content in (extra_files or {}).items():
        path = rootfs / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)
    run("umoci", "repack", "--image", f"{layout}:{tag}", str(bundle))
    run(
        "umoci", "config", "--image", f"{layout}:{tag}",
        "--config.cmd", "/bin/httpd", "--config.cmd", "-f", "--config.cmd", "-p", "--config.cmd", "8080",
        "--config.cmd", "-h", "--config.cmd", "/www",
        "--config.exposedports", "8080/tcp", "--config.env", f"IMAGE_TAG={tag}",
    )
    shutil.rmtree(bundle)
    index = json.loads((layout / "index.json").read_text())
    for manifest in index["manifests"]:
        if manifest.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag:
            return manifest["digest"]
    raise AssertionError(f"umoci wrote no manifest for {tag}: {index}")


class Registry:
    """Debian's docker-registry on 127.0.0.1 with htpasswd basic auth, in a directory of its own."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.port = free_tcp_port()
        self.process = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self):
        self.directory.mkdir(parents=True, exist_ok=True)
        htpasswd = run("htpasswd", "-Bbn", REGISTRY_USER, REGISTRY_PASSWORD)
        (self.directory / "htpasswd").write_text(htpasswd)
        config = self.directory / "config.yml"
        config.write_text(
            "version: 0.1\n"
            "log:\n  level: warn\n"
            f"storage:\n  filesystem:\n    rootdirectory: {self.directory / 'storage'}\n  delete:\n    enabled: true\n"
            f"http:\n  addr: {self.host}\n"
            f"auth:\n  htpasswd:\n    realm: flotilla-test\n    path: {self.directory / 'htpasswd'}\n"
        )
        log = open(self.directory / "registry.log", "wb")
        self.process = subprocess.Popen(
            ["docker-registry", "serve", str(config)], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )

        def answers():
            assert self.process.poll() is None, (self.directory / "registry.log").read_text()
            try:
                return requests.get(f"http://{self.host}/v2/", timeout=1).status_code == 401
            except requests.RequestException:
                return False

        wait_until(answers, timeout=20, what="the registry to answer")
        return self

    def stop(self):
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()

    def push(self, layout: Path, tag: str, repository: str) -> str:
        """Pushes `layout:tag` as `repository:tag`; returns the reference."""
        reference = f"{self.host}/{repository}:{tag}"
        run(
            "skopeo", "--insecure-policy", "copy", "--quiet", "--dest-tls-verify=false",
            "--dest-creds", f"{REGISTRY_USER}:{REGISTRY_PASSWORD}", f"oci:{layout}:{tag}", f"docker://{reference}",
        )
        return reference

    def auth_file(self, path: Path) -> Path:
        """Docker's config.json with this registry's credentials."""
        token = base64.b64encode(f"{REGISTRY_USER}:{REGISTRY_PASSWORD}".encode()).decode()
        path.write_text(json.dumps({"auths": {self.host: {"auth": token}}}))
        return path


class TestBridge:
    """A bridge of one test's own: a unique name and a /24 in 10.200-254.x no host route covers,
    removed (with its nft table) when the test ends."""

    def __init__(self):
        import random
        routes = subprocess.run(["ip", "-4", "route", "show"], capture_output=True, text=True).stdout
        while True:
            self.name = "flt" + os.urandom(3).hex()
            self.cidr = f"10.{random.randint(200, 254)}.{random.randint(0, 255)}.0/24"
            if self.cidr.rsplit(".", 1)[0] + "." not in routes:
                break

    def arguments(self):
        return ["--bridge-name", self.name, "--bridge-cidr", self.cidr]

    def remove(self, agent):
        subprocess.run(["ip", "link", "delete", self.name], capture_output=True)
        subprocess.run(["nft", "delete", "table", "ip", nft_table(agent)], capture_output=True)


def nft_table(agent) -> str:
    """The agent's nft table: "flt" and the first 8 hex digits of its data directory's FNV-1a hash."""
    value = 0xCBF29CE484222325
    for byte in str(agent.state_dir).encode():
        value = ((value ^ byte) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return "flt" + format(value, "x")[:8]


def container_leftovers(agent) -> list:
    """What an agent's containers left on the node: runtime records and mounts under its data dir."""
    left = []
    state = agent.state_dir / "containers" / ".state"
    if state.exists():
        left += [f"runc container {entry.name}" for entry in state.iterdir()]
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    prefix = nft_table(agent) + "-"
    left += [f"network namespace {line.split()[0]}" for line in namespaces.splitlines() if line.startswith(prefix)]
    for port_map in ("tcp_ports", "udp_ports"):
        mappings = subprocess.run(["nft", "list", "map", "ip", nft_table(agent), port_map], capture_output=True, text=True).stdout
        if "elements" in mappings:
            left.append(f"port mappings {mappings.strip()}")
    with open("/proc/self/mountinfo") as mounts:
        for line in mounts:
            mount_point = line.split()[4]
            if mount_point.startswith(str(agent.state_dir)):
                left.append(f"mount {mount_point}")
    return left
