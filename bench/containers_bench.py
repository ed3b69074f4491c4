"""Drives bench/containers.sh: see there. Standard library only."""

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import time
import urllib.request

from benchlib import Agent, call, free_port, serves


def run(*command, **kwargs):
    return subprocess.run(command, check=True, capture_output=True, text=True, **kwargs).stdout


def build_image(layout, size_mb):
    """busybox with httpd and `size_mb` of random bytes (incompressible, like real binaries)."""
    run("umoci", "init", "--layout", layout)
    run("umoci", "new", "--image", f"{layout}:big")
    bundle = layout + "-bundle"
    run("umoci", "unpack", "--image", f"{layout}:big", bundle)
    rootfs = os.path.join(bundle, "rootfs")
    os.makedirs(os.path.join(rootfs, "bin"), exist_ok=True)
    shutil.copy2("/bin/busybox", os.path.join(rootfs, "bin", "busybox"))
    for tool in ("sh", "httpd"):
        os.symlink("busybox", os.path.join(rootfs, "bin", tool))
    os.makedirs(os.path.join(rootfs, "www"))
    with open(os.path.join(rootfs, "www", "index.html"), "w") as page:
        page.write("ok\n")
    with open(os.path.join(rootfs, "www", "payload"), "wb") as payload:
        payload.write(os.urandom(size_mb * 1_000_000))
    run("umoci", "repack", "--image", f"{layout}:big", bundle)
    run("umoci", "config", "--image", f"{layout}:big", "--config.cmd", "/bin/httpd", "--config.cmd", "-f")
    shutil.rmtree(bundle)


def start_registry(work):
    port = free_port()
    config = os.path.join(work, "registry.yml")
    with open(config, "w") as file:
        file.write(f"version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {work}/registry\nhttp:\n  addr: 127.0.0.1:{port}\n")
    process = subprocess.Popen(["docker-registry", "serve", config], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(100):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/", timeout=1).read()
            return process, f"127.0.0.1:{port}"
        except OSError:
            time.sleep(0.1)
    raise SystemExit("the registry did not start")


def flotilla_pull(binary, work, registry, reference, index):
    """Seconds to pull into an empty store: until downloaded and verified, and until unpacked too."""
    agent = Agent(binary, work, extra_args=["--insecure-registry", registry])
    try:
        began = time.monotonic()
        process = subprocess.Popen(
            [binary, "image", "pull", reference, "--api", agent.base], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        downloaded = None
        for line in process.stderr:
            if "unpacking" in line and downloaded is None:
                downloaded = time.monotonic() - began
        process.wait()
        total = time.monotonic() - began
        if process.returncode != 0:
            raise SystemExit(f"flotilla image pull failed: {process.stdout.read()}")
        return downloaded or total, total
    finally:
        agent.stop()


def skopeo_pull(work, reference, index):
    target = os.path.join(work, f"skopeo-{index}")
    began = time.monotonic()
    run("skopeo", "--insecure-policy", "copy", "--quiet", "--src-tls-verify=false", f"docker://{reference}", f"oci:{target}:big")
    return time.monotonic() - began


def wait_serving(port, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if serves(port):
            return
        time.sleep(0.005)
    raise SystemExit(f"nothing answered on port {port}")


def flotilla_start(agent, reference, index):
    port = free_port()
    app = f"/bench/start-{index}"
    began = time.monotonic()
    call(agent.base, "POST", "/v2/apps", {
        "id": app, "instances": 1, "cpus": 0.01, "mem": 32, "cmd": f"exec httpd -f -p {port} -h /www",
        "container": {"type": "DOCKER", "docker": {"image": reference}},
        "portDefinitions": [{"port": port}], "requirePorts": True,
    })
    wait_serving(port)
    elapsed = time.monotonic() - began
    call(agent.base, "DELETE", f"/v2/apps{app}?force=true")
    return elapsed


# podman as this machine allows it: no systemd (cgroupfs, file events), and no raised rlimits
# (Flotilla's containers keep the agent's; podman's defaults ask for more than the host lets it set).
PODMAN = ["podman", "--cgroup-manager", "cgroupfs", "--events-backend", "file"]


def podman_environment(work):
    path = os.path.join(work, "containers.conf")
    with open(path, "w") as conf:
        conf.write("[containers]\ndefault_ulimits = []\n")
    os.environ["CONTAINERS_CONF"] = path


def podman_start(reference, index):
    port = free_port()
    name = f"flotilla-bench-{os.getpid()}-{index}"
    began = time.monotonic()
    run(*PODMAN, "run", "--rm", "-d", "--name", name, "--network", "host", "--runtime", "runc", "--tls-verify=false", reference,
        "/bin/httpd", "-f", "-p", str(port), "-h", "/www")
    wait_serving(port)
    elapsed = time.monotonic() - began
    subprocess.run([*PODMAN, "rm", "-f", "-t", "0", name], capture_output=True)
    return elapsed


def fifty_at_once(agent, reference, count=50):
    first = free_port()
    app = "/bench/fifty"
    began = time.monotonic()
    result = call(agent.base, "POST", "/v2/apps", {
        "id": app, "instances": count, "cpus": 0.01, "mem": 16, "cmd": "exec httpd -f -p $PORT0 -h /www",
        "container": {"type": "DOCKER", "docker": {"image": reference}},
        "healthChecks": [{"protocol": "TCP", "portIndex": 0, "intervalSeconds": 1, "gracePeriodSeconds": 30}],
    })
    status, reason = agent.wait_for_deployment(result["deployments"][0]["id"], timeout=300)
    elapsed = time.monotonic() - began
    if status != "succeeded":
        raise SystemExit(f"50 containers: deployment {status}: {reason}")
    call(agent.base, "DELETE", f"/v2/apps{app}?force=true")
    time.sleep(3)
    return elapsed


def nft_table(data_dir):
    """The agent's nft table: "flt" and the first 8 hex digits of its data directory's FNV-1a hash."""
    value = 0xCBF29CE484222325
    for byte in data_dir.encode():
        value = ((value ^ byte) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return "flt" + format(value, "x")[:8]


def download_speed(port):
    """MB/s of one GET of the 50 MB payload (curl, to /dev/null)."""
    out = run("curl", "-sS", "-o", "/dev/null", "-w", "%{speed_download}", f"http://127.0.0.1:{port}/payload")
    return float(out) / 1_000_000


def throughput(agent, reference, bridged, bridge_runs):
    app = "/bench/bridged" if bridged else "/bench/hosted"
    definition = {"id": app, "instances": 1, "cpus": 0.5, "mem": 64,
                  "container": {"type": "DOCKER", "docker": {"image": reference}},
                  "healthChecks": [{"protocol": "TCP", "portIndex": 0, "intervalSeconds": 1}]}
    if bridged:
        definition["networks"] = [{"mode": "container/bridge"}]
        definition["container"]["portMappings"] = [{"containerPort": 8080, "hostPort": 0}]
        definition["cmd"] = "exec httpd -f -p 8080 -h /www"
    else:
        definition["cmd"] = "exec httpd -f -p $PORT0 -h /www"
    result = call(agent.base, "POST", "/v2/apps", definition)
    agent.wait_for_deployment(result["deployments"][0]["id"])
    port = call(agent.base, "GET", f"/v2/apps{app}/tasks")["tasks"][0]["ports"][0]
    wait_serving(port)
    speeds = [download_speed(port) for _ in range(bridge_runs)]
    call(agent.base, "DELETE", f"/v2/apps{app}?force=true")
    time.sleep(3)
    return statistics.median(speeds)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--binary", required=True)
    parser.add_argument("--work", required=True)
    parser.add_argument("--runs", type=int, default=5)
    arguments = parser.parse_args()
    work = arguments.work
    layout = os.path.join(work, "layout")
    build_image(layout, 50)
    registry, host = start_registry(work)
    try:
        reference = f"{host}/bench/big:1"
        run("skopeo", "--insecure-policy", "copy", "--quiet", "--dest-tls-verify=false", f"oci:{layout}:big", f"docker://{reference}")
        pulls, unpacked, skopeos = [], [], []
        for index in range(arguments.runs):
            downloaded, total = flotilla_pull(arguments.binary, work, host, reference, index)
            pulls.append(downloaded)
            unpacked.append(total)
            skopeos.append(skopeo_pull(work, reference, index))
        print(f"pull 50 MB image: flotilla {statistics.median(pulls):.2f} s (with unpacking {statistics.median(unpacked):.2f} s), "
              f"skopeo copy {statistics.median(skopeos):.2f} s, ratio {statistics.median(pulls) / statistics.median(skopeos):.2f}")

        podman_environment(work)
        run(*PODMAN, "pull", "--quiet", "--tls-verify=false", reference)
        bridge = f"fltb{os.getpid() % 100000}"
        agent = Agent(arguments.binary, work, extra_args=["--insecure-registry", host, "--bridge-name", bridge, "--bridge-cidr", "10.250.77.0/24"])
        try:
            run(arguments.binary, "image", "pull", reference, "--api", agent.base)
            starts, podmans = [], []
            for index in range(arguments.runs):
                starts.append(flotilla_start(agent, reference, index))
                podmans.append(podman_start(reference, index))
                time.sleep(1)
            print(f"start to listening: flotilla {statistics.median(starts) * 1000:.0f} ms, podman run {statistics.median(podmans) * 1000:.0f} ms, "
                  f"ratio {statistics.median(starts) / statistics.median(podmans):.2f}")
            fifty = [fifty_at_once(agent, reference) for _ in range(max(1, arguments.runs // 2))]
            print(f"50 containers of one image at once, to all passing a TCP check: {statistics.median(fifty):.2f} s")
            hosted = throughput(agent, reference, False, arguments.runs)
            bridged = throughput(agent, reference, True, arguments.runs)
            print(f"50 MB over HTTP from a container: host network {hosted:.0f} MB/s, bridge port mapping {bridged:.0f} MB/s, "
                  f"ratio {bridged / hosted:.2f}")
        finally:
            agent.stop()
            subprocess.run(["ip", "link", "delete", bridge], capture_output=True)
            subprocess.run(["nft", "delete", "table", "ip", nft_table(os.path.realpath(os.path.join(work, f"data-{agent.port}")))], capture_output=True)
        subprocess.run([*PODMAN, "rmi", "-f", reference], capture_output=True)
    finally:
        registry.send_signal(signal.SIGTERM)
        registry.wait()


if __name__ == "__main__":
    main()
