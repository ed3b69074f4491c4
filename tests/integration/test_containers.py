"""Containers end to end: images built with umoci, pushed with skopeo to a real docker-registry with
basic auth, pulled by the agent and run by runc; deployed through the Marathon client, health
checked, routed by the proxy, rolled forward and back with no failed request, adopted after
kill -9, OOM reported, and evil archives refused.

Needs root (namespaces, mounts, cgroups), runc, umoci, skopeo, docker-registry, htpasswd and
busybox-static: scripts/test.sh installs them.
"""

import collections
import collections.abc
import io
import json
import os
import shutil
import socket
import subprocess
import tarfile
import threading
import time

import pytest
import requests

from support.flotilla import wait_until
from support.images import Registry, TestBridge, build_httpd_image, container_leftovers, nft_table, run

# marathon-python 0.13 serialises nested models with collections.Iterable, which Python 3.10 moved
# to collections.abc; the alias lets the real client send container definitions unchanged.
if not hasattr(collections, "Iterable"):
    collections.Iterable = collections.abc.Iterable

from marathon import MarathonClient, MarathonApp  # noqa: E402
from marathon.models.container import MarathonContainer, MarathonContainerPortMapping, MarathonDockerContainer  # noqa: E402

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="containers need root")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """An OCI layout with tags 1 and 2 of the httpd image, and the registry they are pushed to."""
    base = tmp_path_factory.mktemp("images")
    layout = base / "layout"
    digests = {tag: build_httpd_image(layout, tag, f"served by tag {tag}\n") for tag in ("1", "2")}
    registry = Registry(base / "registry").start()
    try:
        references = {tag: registry.push(layout, tag, "shop/web") for tag in ("1", "2")}
        yield {"layout": layout, "digests": digests, "registry": registry, "references": references, "base": base}
    finally:
        registry.stop()


@pytest.fixture
def bridge():
    return TestBridge()


@pytest.fixture
def container_agent(make_agent, images, tmp_path, bridge):
    registry = images["registry"]
    auth = registry.auth_file(tmp_path / "auth.json")
    agent = make_agent(extra_args=["--insecure-registry", registry.host, "--registry-auth-file", str(auth), *bridge.arguments()])
    yield agent
    agent.stop()
    try:
        assert container_leftovers(agent) == []
    finally:
        bridge.remove(agent)


def bridged_app(app_id, image, instances=1, **fields):
    """The httpd image as it is, in its own network namespace: container port 8080 mapped to a host port."""
    definition = {
        "id": app_id,
        "instances": instances,
        "cpus": 0.1,
        "mem": 32,
        "networks": [{"mode": "container/bridge"}],
        "container": {
            "type": "DOCKER",
            "docker": {"image": image},
            "portMappings": [{"containerPort": 8080, "hostPort": 0, "name": "http"}],
        },
        "healthChecks": [{"protocol": "HTTP", "path": "/", "portIndex": 0, "intervalSeconds": 1, "gracePeriodSeconds": 10}],
        "backoffSeconds": 0.2,
        "backoffFactor": 1,
    }
    definition.update(fields)
    return definition


def container_app(app_id, image, instances=1, **fields):
    """The httpd image on the host network, listening on its PORT0, health checked over HTTP."""
    definition = {
        "id": app_id,
        "instances": instances,
        "cpus": 0.1,
        "mem": 32,
        "cmd": "ls / > /mnt/mesos/sandbox/root-listing; id -u > /mnt/mesos/sandbox/uid; exec httpd -f -p $PORT0 -h /www",
        "container": {"type": "DOCKER", "docker": {"image": image}},
        "portDefinitions": [{"port": 0, "name": "http"}],
        "healthChecks": [{"protocol": "HTTP", "path": "/", "portIndex": 0, "intervalSeconds": 1, "gracePeriodSeconds": 10}],
        "backoffSeconds": 0.2,
        "backoffFactor": 1,
    }
    definition.update(fields)
    return definition


def wait_healthy(agent, app_id, count, timeout=60):
    def healthy():
        app = agent.app(app_id)
        if app["tasksHealthy"] == count and app["tasksRunning"] == count and len(agent.tasks(app_id)) == count:
            return agent.tasks(app_id)
        return None

    return wait_until(healthy, timeout=timeout, what=f"{count} healthy instances of {app_id}")


def create_with_marathon_client(agent, client, app_id, app):
    """Creates the app with marathon-python, adds an HTTP health check, waits for it to be healthy."""
    client.create_app(app_id, app)
    # Health checks as raw JSON: marathon-python 0.13 cannot serialise them on this Python.
    response = agent.put(
        f"/v2/apps{app_id}?force=true",
        json={"healthChecks": [{"protocol": "HTTP", "path": "/", "portIndex": 0, "intervalSeconds": 1, "gracePeriodSeconds": 10}]},
    )
    assert response.status_code == 200, response.text
    return wait_healthy(agent, app_id, app.instances)


def runc_containers(agent) -> list:
    out = run("runc", "--root", str(agent.state_dir / "containers" / ".state"), "list", "--format", "json")
    return json.loads(out) or []


def test_pull_shows_progress_and_the_store_lists_the_image(container_agent, images):
    reference = images["references"]["1"]
    result = container_agent.cli("image", "pull", reference)
    assert result.returncode == 0, result.stderr
    assert "MB" in result.stderr and f"pulling {reference}" in result.stderr, result.stderr
    listed = json.loads(container_agent.cli("images", "--json").stdout)
    stored = [image for image in listed if reference in image["references"]]
    assert len(stored) == 1, listed
    # The registry and skopeo agree on the manifest digest; so must the store.
    assert stored[0]["id"] == images["digests"]["1"]
    # A second pull finds every blob there and downloads nothing new.
    again = container_agent.cli("image", "pull", "--json", reference)
    assert again.returncode == 0 and json.loads(again.stdout)["id"] == images["digests"]["1"]


def test_a_registry_without_credentials_is_refused_clearly(make_agent, images):
    registry = images["registry"]
    agent = make_agent(extra_args=["--insecure-registry", registry.host])
    result = agent.cli("image", "pull", images["references"]["1"])
    assert result.returncode != 0
    assert "registry-auth-file" in result.stderr or "credentials" in result.stderr, result.stderr


def test_container_deploys_through_marathon_client_healthy_routed_and_isolated(container_agent, images, app_ids):
    app_id = app_ids.new()
    client = MarathonClient(container_agent.url, timeout=10)
    app = MarathonApp(
        instances=1,
        cpus=0.1,
        mem=32,
        cmd=container_app(app_id, "")["cmd"],
        container=MarathonContainer(type="DOCKER", docker=MarathonDockerContainer(image=images["references"]["1"], force_pull_image=False)),
        labels={"SERVICE_TAGS": "urlprefix-/shop strip=/shop"},
        port_definitions=[{"port": 0, "name": "http", "protocol": "tcp"}],
    )
    tasks = create_with_marathon_client(container_agent, client, app_id, app)
    fetched = client.get_app(app_id)
    assert fetched.container.docker.image == images["references"]["1"]
    assert fetched.container.type == "DOCKER"

    body = wait_until(
        lambda: (lambda r: r.text if r.status_code == 200 else None)(requests.get(f"{container_agent.proxy_url}/shop/", timeout=5)),
        timeout=20, what="the proxy to route /shop to the container",
    )
    assert body == "served by tag 1\n"
    sandbox = container_agent.sandbox(tasks[0]["id"])
    listing = (sandbox / "root-listing").read_text().split()
    # The image's filesystem and what the runtime mounts, nothing of the node's.
    assert "only-in-image" in listing and "www" in listing, listing
    assert "work" not in listing and "opt" not in listing and "usr" not in listing, listing
    assert (sandbox / "uid").read_text().strip() == "0"
    # The instance the health check's config change replaced goes once it has stopped.
    wait_until(lambda: [c["id"] for c in runc_containers(container_agent)] == [tasks[0]["id"]] or None, timeout=30,
               what="only the healthy instance's container to be left")


def test_bridged_container_through_marathon_client_is_healthy_routed_and_reachable(container_agent, images, app_ids):
    app_id = app_ids.new()
    client = MarathonClient(container_agent.url, timeout=10)
    app = MarathonApp(
        instances=2,
        cpus=0.1,
        mem=32,
        networks=[{"mode": "container/bridge"}],
        container=MarathonContainer(
            type="DOCKER",
            docker=MarathonDockerContainer(image=images["references"]["1"]),
            port_mappings=[MarathonContainerPortMapping(container_port=8080, host_port=0, name="http")],
        ),
        labels={"SERVICE_TAGS": "urlprefix-/bridged strip=/bridged"},
    )
    tasks = create_with_marathon_client(container_agent, client, app_id, app)
    fetched = client.get_app(app_id)
    assert fetched.container.port_mappings[0].container_port == 8080
    assert container_agent.app(app_id)["networks"] == [{"mode": "container/bridge"}]
    addresses = {task["ipAddresses"][0]["ipAddress"] for task in tasks}
    assert len(addresses) == 2 and all(address.startswith(container_agent_bridge_prefix(tasks)) for address in addresses), tasks
    for task in tasks:
        # The host port maps to the container's 8080, on loopback too; the container's own address answers on 8080.
        assert requests.get(f"http://127.0.0.1:{task['ports'][0]}/", timeout=5).text == "served by tag 1\n"
        assert requests.get(f"http://{task['ipAddresses'][0]['ipAddress']}:8080/", timeout=5).text == "served by tag 1\n"
        assert task["ports"][0] in container_agent.task_ports
    body = wait_until(
        lambda: (lambda r: r.text if r.status_code == 200 else None)(requests.get(f"{container_agent.proxy_url}/bridged/", timeout=5)),
        timeout=20, what="the proxy to route /bridged")
    assert body == "served by tag 1\n"
    # Consul's view: the service at the host port.
    service = container_agent.get(f"/v1/catalog/service/{app_id.strip('/').replace('/', '-')}").json()
    assert sorted(entry["ServicePort"] for entry in service) == sorted(task["ports"][0] for task in tasks)


UDP_ECHO = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[1])))
while True:
    data, peer = s.recvfrom(2048)
    s.sendto(b"echo:" + data, peer)
"""


def test_udp_port_mapping_reaches_the_container(container_agent, images, app_ids):
    """A udp mapping (Marathon's protocol "udp") forwards datagrams from the host port to the
    container's namespace; "udp,tcp" gives one host port both transports."""
    app_id = app_ids.new()
    definition = bridged_app(app_id, images["references"]["1"])
    definition["container"]["portMappings"] = [
        {"containerPort": 8080, "hostPort": 0, "name": "http"},
        {"containerPort": 5353, "hostPort": 0, "protocol": "udp", "name": "dns"},
        {"containerPort": 7000, "hostPort": 0, "protocol": "udp,tcp", "name": "both"},
    ]
    container_agent.create_app(definition)
    [task] = wait_healthy(container_agent, app_id, 1)
    assert [m["protocol"] for m in container_agent.app(app_id)["container"]["portMappings"]] == ["tcp", "udp", "udp,tcp"]
    namespaces = [line.split()[0] for line in run("ip", "netns", "list").splitlines()
                  if line.startswith(nft_table(container_agent) + "-")]
    assert len(namespaces) == 1, namespaces
    # The image has no UDP server; the host's Python serves inside the container's own namespace.
    servers = [subprocess.Popen(["ip", "netns", "exec", namespaces[0], "python3", "-c", UDP_ECHO, str(port)])
               for port in (5353, 7000)]
    try:
        for host_port, message in ((task["ports"][1], b"ping"), (task["ports"][2], b"both")):
            def exchange():
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
                    client.settimeout(0.5)
                    client.sendto(message, ("127.0.0.1", host_port))
                    try:
                        return client.recv(2048)
                    except (socket.timeout, ConnectionRefusedError):
                        return None
            assert wait_until(exchange, timeout=15, what=f"an answer through udp {host_port}") == b"echo:" + message
        table = run("nft", "list", "map", "ip", nft_table(container_agent), "udp_ports")
        assert str(task["ports"][1]) in table and str(task["ports"][2]) in table
        tcp = run("nft", "list", "map", "ip", nft_table(container_agent), "tcp_ports")
        assert str(task["ports"][0]) in tcp and str(task["ports"][2]) in tcp and str(task["ports"][1]) not in tcp
    finally:
        for server in servers:
            server.kill()
            server.wait()
    container_agent.delete(f"/v2/apps{app_id}?force=true")
    wait_until(lambda: "elements" not in run("nft", "list", "map", "ip", nft_table(container_agent), "udp_ports") or None,
               timeout=20, what="the udp mappings to go")


def container_agent_bridge_prefix(tasks):
    first = tasks[0]["ipAddresses"][0]["ipAddress"]
    return first.rsplit(".", 1)[0] + "."


def test_roll_to_a_new_tag_and_back_without_a_failed_request(container_agent, images, app_ids):
    app_id = app_ids.new()
    definition = bridged_app(
        app_id, images["references"]["1"], instances=2, labels={"SERVICE_TAGS": "urlprefix-/roll strip=/roll"}, drainSeconds=1,
        upgradeStrategy={"minimumHealthCapacity": 1, "maximumOverCapacity": 1},
    )
    container_agent.create_app(definition)
    wait_healthy(container_agent, app_id, 2)
    url = f"{container_agent.proxy_url}/roll/"
    wait_until(lambda: requests.get(url, timeout=5).status_code == 200, timeout=20, what="the route")
    first_version = container_agent.app(app_id)["version"]

    failures, bodies, stop = [], collections.Counter(), threading.Event()

    def load():
        with requests.Session() as session:
            while not stop.is_set():
                try:
                    response = session.get(url, timeout=5)
                    if response.status_code != 200:
                        failures.append(response.status_code)
                    else:
                        bodies[response.text.strip()] += 1
                except requests.RequestException as error:
                    failures.append(repr(error))

    def roll(body, expect):
        threads = [threading.Thread(target=load, daemon=True) for _ in range(3)]
        stop.clear()
        for thread in threads:
            thread.start()
        try:
            response = container_agent.put(f"/v2/apps{app_id}", json=body)
            assert response.status_code == 200, response.text
            deployment = response.json()["deploymentId"]

            def done():
                status = container_agent.get(f"/flotilla/v1/deployments/{deployment}").json()
                return status if status["status"] != "running" else None

            status = wait_until(done, timeout=90, what="the deployment")
            assert status["status"] == "succeeded", status
            wait_until(lambda: requests.get(url, timeout=5).text.strip() == expect, timeout=20, what=f"only {expect} served")
            time.sleep(1)
        finally:
            stop.set()
            for thread in threads:
                thread.join(timeout=10)

    roll({"container": {**definition["container"], "docker": {"image": images["references"]["2"]}}}, "served by tag 2")
    assert not failures, f"{len(failures)} failed requests while rolling to tag 2: {failures[:5]}"
    assert bodies["served by tag 1"] > 0 and bodies["served by tag 2"] > 0, bodies
    assert sum(bodies.values()) >= 100, bodies

    bodies.clear()
    roll({"version": first_version}, "served by tag 1")
    assert not failures, f"{len(failures)} failed requests while rolling back: {failures[:5]}"
    assert bodies["served by tag 1"] > 0, bodies
    assert len(runc_containers(container_agent)) == 2


def test_kill_9_of_the_agent_adopts_the_containers(make_agent, images, tmp_path, app_ids, bridge):
    registry = images["registry"]
    auth = registry.auth_file(tmp_path / "auth.json")
    agent = make_agent(
        on_exit="keep", extra_args=["--insecure-registry", registry.host, "--registry-auth-file", str(auth), *bridge.arguments()])
    app_id = app_ids.new()
    agent.create_app(bridged_app(app_id, images["references"]["1"], instances=2))
    tasks = wait_healthy(agent, app_id, 2)
    before = sorted(task["id"] for task in tasks)
    ports = sorted(task["ports"][0] for task in tasks)
    containers = sorted(container["id"] for container in runc_containers(agent))
    assert containers == before
    agent.kill9()
    # The containers outlive the agent.
    assert sorted(container["id"] for container in runc_containers(agent) if container["status"] == "running") == before
    agent.restart()
    after_tasks = wait_healthy(agent, app_id, 2)
    after = sorted(task["id"] for task in after_tasks)
    assert after == before
    # The port mappings survived too.
    assert sorted(task["ports"][0] for task in after_tasks) == ports
    for port in ports:
        assert requests.get(f"http://127.0.0.1:{port}/", timeout=5).text == "served by tag 1\n"
    assert "adopted" in agent.log_text()
    time.sleep(2)
    assert sorted(container["id"] for container in runc_containers(agent)) == before, "a container was duplicated or lost"
    agent.delete(f"/v2/apps{app_id}?force=true")
    wait_until(lambda: runc_containers(agent) == [], timeout=30, what="the containers to be removed")
    agent.stop()
    agent.restart(on_exit="stop")
    try:
        assert container_leftovers(agent) == []
    finally:
        agent.stop()
        bridge.remove(agent)


def test_an_oom_kill_inside_a_container_is_reported(container_agent, images, app_ids):
    app_id = app_ids.new()
    # tail keeps the whole newline-free stream in memory: far past 16 MiB.
    container_agent.create_app(
        container_app(app_id, images["references"]["1"], mem=16, cmd="head -c 200000000 /dev/zero | tail", healthChecks=[], portDefinitions=[])
    )

    def failure():
        response = container_agent.get(f"/v2/apps{app_id}")
        return response.json()["app"].get("lastTaskFailure")

    last = wait_until(failure, timeout=60, what="the instance to fail")
    assert "OOM" in last["message"], last


def test_a_missing_image_fails_the_instance_with_the_registrys_answer(container_agent, images, app_ids):
    app_id = app_ids.new()
    container_agent.create_app(container_app(app_id, f"{images['registry'].host}/shop/none:404", healthChecks=[]))

    def failure():
        return container_agent.get(f"/v2/apps{app_id}").json()["app"].get("lastTaskFailure")

    last = wait_until(failure, timeout=60, what="the instance to fail")
    assert "not found" in last["message"], last


def evil_archive(path, layer_entries):
    """A `docker save` archive whose one layer holds `layer_entries` [(name, kind, target)]."""
    layer = io.BytesIO()
    with tarfile.open(fileobj=layer, mode="w") as tar:
        for name, kind, target in layer_entries:
            info = tarfile.TarInfo(name)
            if kind == "file":
                info.size = len(b"evil\n")
                tar.addfile(info, io.BytesIO(b"evil\n"))
            elif kind == "symlink":
                info.type, info.linkname = tarfile.SYMTYPE, target
                tar.addfile(info)
    config = json.dumps({"architecture": "amd64", "os": "linux", "config": {"Cmd": ["/bin/sh"]}, "rootfs": {"type": "layers", "diff_ids": []}})
    manifest = json.dumps([{"Config": "config.json", "RepoTags": ["evil/image:1"], "Layers": ["layer/layer.tar"]}])
    with tarfile.open(path, mode="w") as tar:
        for name, data in (("config.json", config.encode()), ("manifest.json", manifest.encode()), ("layer/layer.tar", layer.getvalue())):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize(
    "entries, what",
    [
        ([("../../../../tmp/flotilla-evil-dotdot", "file", None)], "climbs"),
        ([("/tmp/flotilla-evil-absolute", "file", None)], "absolute"),
        ([("escape", "symlink", "/tmp"), ("escape/flotilla-evil-through-link", "file", None)], "symlink"),
    ],
)
def test_evil_layers_are_refused(container_agent, tmp_path, entries, what):
    archive = tmp_path / "evil.tar"
    evil_archive(archive, entries)
    result = container_agent.cli("image", "import", str(archive))
    assert result.returncode != 0
    assert "refusing layer entry" in result.stderr, result.stderr
    for leftover in ("/tmp/flotilla-evil-dotdot", "/tmp/flotilla-evil-absolute", "/tmp/flotilla-evil-through-link"):
        assert not os.path.exists(leftover)
    listed = json.loads(container_agent.cli("images", "--json").stdout)
    assert not [image for image in listed if any("evil" in reference for reference in image["references"])]


def test_import_of_an_oci_layout_runs_without_a_registry(make_agent, images, app_ids):
    agent = make_agent()
    result = agent.cli("image", "import", str(images["layout"]), "--name", "localhost/imported/web:2")
    assert result.returncode == 0, result.stderr
    app_id = app_ids.new()
    agent.create_app(container_app(app_id, "localhost/imported/web:2"))
    tasks = wait_healthy(agent, app_id, 1)
    port = tasks[0]["ports"][0]
    assert requests.get(f"http://127.0.0.1:{port}/", timeout=5).text == "served by tag 2\n"
    # Both tags of the layout came in under the given name.
    listed = json.loads(agent.cli("images", "--json").stdout)
    assert sorted(reference for image in listed for reference in image["references"]) == [
        "localhost/imported/web:1", "localhost/imported/web:2"]
    # Prune keeps what an app uses; once the app is gone, its image goes too.
    pruned = json.loads(agent.cli("image", "prune", "--json").stdout)
    assert [image["references"] for image in pruned["removed"]] == [["localhost/imported/web:1"]]
    agent.delete(f"/v2/apps{app_id}?force=true")
    wait_until(lambda: agent.get(f"/v2/apps{app_id}").status_code == 404 and runc_containers(agent) == [], timeout=30,
               what="the app and its container to be gone")
    # The app's versions are gone with it, so nothing references the image once the control plane
    # has seen its last instance end (the agent's status write can trail the container's exit).
    def prune_removes_something():
        pruned = json.loads(agent.cli("image", "prune", "--json").stdout)
        return pruned if pruned["removed"] else None

    pruned = wait_until(prune_removes_something, timeout=20, what="prune to remove the deleted app's image")
    assert [image["references"] for image in pruned["removed"]] == [["localhost/imported/web:2"]]
    assert pruned["bytesFreed"] > 0


def test_read_only_root_filesystem_and_parameters(container_agent, images, app_ids):
    app_id = app_ids.new()
    container_agent.create_app(container_app(
        app_id, images["references"]["1"],
        cmd="(touch /written-to-root 2>/dev/null && echo root-writable || echo root-read-only) > /mnt/mesos/sandbox/root;"
            " echo \"$GREETING $(id -u) $(pwd)\" > /mnt/mesos/sandbox/params; exec httpd -f -p $PORT0 -h /www",
        container={"type": "DOCKER", "docker": {"image": images["references"]["1"], "parameters": [
            {"key": "read-only", "value": "true"}, {"key": "env", "value": "GREETING=hello"},
            {"key": "user", "value": "www"}, {"key": "workdir", "value": "/www"}]}},
    ))
    task = wait_healthy(container_agent, app_id, 1)[0]
    sandbox = container_agent.sandbox(task["id"])
    wait_until(lambda: (sandbox / "params").exists(), timeout=20, what="the container to write its sandbox")
    assert (sandbox / "root").read_text() == "root-read-only\n"
    # env, user (resolved in the image's /etc/passwd: www is 1000) and workdir parameters
    assert (sandbox / "params").read_text() == "hello 1000 /www\n"


def seccomp_probe(container_agent, app_id, image, **container_fields):
    """Runs the image with a command that records its seccomp mode and whether it may make a user
    namespace; returns (the Seccomp line of /proc/self/status, unshare's output and status)."""
    container_agent.create_app(container_app(
        app_id, image,
        cmd="grep '^Seccomp:' /proc/self/status > /mnt/mesos/sandbox/seccomp;"
            " unshare -U true > /mnt/mesos/sandbox/unshare 2>&1; echo \"status $?\" >> /mnt/mesos/sandbox/unshare;"
            " exec httpd -f -p $PORT0 -h /www",
        container={"type": "DOCKER", "docker": {"image": image}, **container_fields},
    ))
    task = wait_healthy(container_agent, app_id, 1)[0]
    sandbox = container_agent.sandbox(task["id"])
    wait_until(lambda: "status" in ((sandbox / "unshare").read_text() if (sandbox / "unshare").exists() else ""),
               timeout=20, what="the container to write its sandbox")
    return (sandbox / "seccomp").read_text().split(), (sandbox / "unshare").read_text()


def test_containers_run_under_the_default_seccomp_filter(container_agent, images, app_ids):
    """Seccomp mode 2 (a filter) by default, and a new user namespace (which needs no capability,
    and would give the container every capability inside it) is refused with EPERM."""
    seccomp, unshare = seccomp_probe(container_agent, app_ids.new(), images["references"]["1"])
    assert seccomp == ["Seccomp:", "2"]
    assert "Operation not permitted" in unshare and "status 0" not in unshare, unshare


def test_an_unconfined_container_runs_without_a_filter(container_agent, images, app_ids):
    seccomp, unshare = seccomp_probe(container_agent, app_ids.new(), images["references"]["1"],
                                     linuxInfo={"seccomp": {"unconfined": True}})
    assert seccomp == ["Seccomp:", "0"]
    # Without the filter only the kernel decides; Debian's kernels may forbid user namespaces to
    # processes without CAP_SYS_ADMIN (kernel.unprivileged_userns_clone=0).
    setting = "/proc/sys/kernel/unprivileged_userns_clone"
    if not os.path.exists(setting) or open(setting).read().strip() == "1":
        assert "status 0" in unshare, unshare


def test_copied_root_filesystems_where_overlayfs_is_not_wanted(make_agent, images, app_ids):
    """--container-rootfs copy: each instance gets a copy of the image's layers, not an overlay
    mount; it runs, sees its image's files, and writes to its own copy only."""
    agent = make_agent(extra_args=["--container-rootfs", "copy"])
    result = agent.cli("image", "import", str(images["layout"]), "--name", "localhost/copied/web:2")
    assert result.returncode == 0, result.stderr
    app_id = app_ids.new()
    agent.create_app(container_app(
        app_id, "localhost/copied/web:2", instances=2,
        cmd="cat /only-in-image > /mnt/mesos/sandbox/seen; echo mine > /written-by-me; exec httpd -f -p $PORT0 -h /www"))
    tasks = wait_healthy(agent, app_id, 2)
    for task in tasks:
        assert requests.get(f"http://127.0.0.1:{task['ports'][0]}/", timeout=5).text == "served by tag 2\n"
    instances = {entry["id"]: entry for entry in agent.get("/flotilla/v1/instances").json()["instances"]}
    assert [instances[task["id"]]["driverState"]["rootfs"] for task in tasks] == ["copy", "copy"]
    with open("/proc/self/mountinfo") as mounts:
        overlays = [line for line in mounts if " - overlay " in line and str(agent.state_dir) in line]
    assert overlays == []
    for task in tasks:
        sandbox = agent.sandbox(task["id"])
        wait_until(lambda: (sandbox / "seen").exists(), timeout=20, what="the container to write its sandbox")
        assert (sandbox / "seen").read_text() == "2"
    # Each copy is the instance's own: what one wrote is not in the image's layers.
    layers = agent.state_dir / "images" / "layers"
    assert not any(path.name == "written-by-me" for path in layers.rglob("written-by-me"))
    agent.delete(f"/v2/apps{app_id}?force=true")
    wait_until(lambda: runc_containers(agent) == [] and not any((agent.state_dir / "containers").glob("*/rootfs")),
               timeout=30, what="the containers and their copies to be gone")


def test_an_unknown_rootfs_mode_is_refused_at_start(binary, tmp_path):
    result = subprocess.run([binary, "agent", "--data-dir", str(tmp_path), "--container-rootfs", "tmpfs"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode != 0
    assert "--container-rootfs must be one of auto, overlay, copy, got 'tmpfs'" in result.stderr


@pytest.mark.parametrize("runtime", ["runc", "crun"])
def test_each_runtime_runs_containers_with_command_checks_inside(make_agent, images, app_ids, runtime):
    """runc and crun take the same bundle: the container serves, its COMMAND health check runs
    inside it (only the image has /only-in-image), it is filtered by seccomp, and it goes away."""
    if shutil.which(runtime) is None:
        pytest.skip(f"{runtime} is not installed (scripts/test.sh installs it)")
    agent = make_agent(extra_args=["--oci-runtime", runtime])
    result = agent.cli("image", "import", str(images["layout"]), "--name", f"localhost/{runtime}/web:2")
    assert result.returncode == 0, result.stderr
    app_id = app_ids.new()
    agent.create_app(container_app(
        app_id, f"localhost/{runtime}/web:2",
        cmd="grep '^Seccomp:' /proc/self/status > /mnt/mesos/sandbox/seccomp; exec httpd -f -p $PORT0 -h /www",
        healthChecks=[{"protocol": "COMMAND", "command": {"value": "test -f /only-in-image"}, "intervalSeconds": 1, "gracePeriodSeconds": 10}],
    ))
    def healthy_or_refused():
        failure = agent.get(f"/v2/apps{app_id}").json()["app"].get("lastTaskFailure")
        if failure and "hybrid mode not supported" in failure["message"]:
            return failure["message"]
        app = agent.app(app_id)
        return agent.tasks(app_id) if app["tasksHealthy"] == 1 else None

    outcome = wait_until(healthy_or_refused, timeout=60, what=f"a healthy instance under {runtime}")
    if isinstance(outcome, str):
        # crun 1.8 refuses hosts whose cgroup2 mount has controllers beside cgroup v1 ones.
        agent.delete(f"/v2/apps{app_id}?force=true")
        pytest.skip(f"{runtime} cannot run containers on this host: {outcome}")
    [task] = outcome
    assert requests.get(f"http://127.0.0.1:{task['ports'][0]}/", timeout=5).text == "served by tag 2\n"
    assert (agent.sandbox(task["id"]) / "seccomp").read_text().split() == ["Seccomp:", "2"]
    state_root = agent.state_dir / "containers" / ".state"
    listed = json.loads(run(runtime, "--root", str(state_root), "list", "--format", "json") or "[]") or []
    assert [entry["id"] for entry in listed] == [task["id"]]
    agent.delete(f"/v2/apps{app_id}?force=true")
    wait_until(lambda: not json.loads(run(runtime, "--root", str(state_root), "list", "--format", "json") or "[]"),
               timeout=30, what=f"{runtime}'s container to be gone")
    # An OOM kill is reported whatever the runtime does with the container's own cgroup.
    hungry = app_ids.new()
    agent.create_app(container_app(hungry, f"localhost/{runtime}/web:2", mem=16, cmd="head -c 200000000 /dev/zero | tail",
                                   healthChecks=[], portDefinitions=[]))
    last = wait_until(lambda: agent.get(f"/v2/apps{hungry}").json()["app"].get("lastTaskFailure"), timeout=60, what="the instance to fail")
    assert "OOM" in last["message"], last
