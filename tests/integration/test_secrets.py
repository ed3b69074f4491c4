"""Marathon's `secrets` end to end: a value written through Vault's API (with hvac) reaches an
instance's environment and, in a container, a read-only file; it appears on no other surface, in
no log and nowhere in the agent's state on disk; a missing secret fails the instance naming the
secret, and an agent without a secrets key refuses apps that use them."""

import json
import os
import stat
import subprocess
import uuid

import hvac
import pytest
import requests

from support.flotilla import wait_until
from support.images import build_httpd_image


@pytest.fixture
def key_file(binary, tmp_path):
    path = tmp_path / "secrets.key"
    path.write_text(subprocess.run([str(binary), "secrets", "keygen"], capture_output=True, text=True, check=True).stdout)
    path.chmod(0o600)
    return path


@pytest.fixture
def secret_agent(make_agent, key_file):
    return make_agent(extra_args=["--secrets-key-file", str(key_file)])


def write_secret(agent, path, data):
    hvac.Client(url=agent.url).secrets.kv.v2.create_or_update_secret(path=path, secret=data)


def first_task(agent, app_id):
    def running():
        tasks = agent.tasks(app_id)
        return tasks if tasks and tasks[0]["state"] == "TASK_RUNNING" else None

    return wait_until(running, timeout=30, what=f"{app_id} to run")[0]


def surfaces(agent, app_id):
    """Everything the agent shows about an app and its instances, and its own log."""
    texts = []
    for path in (f"/v2/apps{app_id}", f"/v2/apps{app_id}/versions", "/v2/apps?embed=apps.tasks", "/v2/tasks", "/v2/deployments",
                 "/v2/queue", "/flotilla/v1/instances", "/v1/catalog/services", "/metrics", "/v1/kv/?recurse=true"):
        texts.append(requests.get(agent.url + path, timeout=5).text)
    versions = requests.get(f"{agent.url}/v2/apps{app_id}/versions", timeout=5).json()["versions"]
    for version in versions:
        texts.append(requests.get(f"{agent.url}/v2/apps{app_id}/versions/{version}", timeout=5).text)
    texts.append(agent.log_text())
    return texts


def files_holding(root, needle, skip=()):
    found = []
    for path in root.rglob("*"):
        if path.is_file() and not any(part in path.parts for part in skip) and needle.encode() in path.read_bytes():
            found.append(str(path))
    return found


def test_a_secret_reaches_the_instance_env_and_nowhere_else(secret_agent, app_ids):
    planted = f"planted-{uuid.uuid4().hex}"
    path = f"shop/db-{uuid.uuid4().hex[:6]}"
    write_secret(secret_agent, path, {"password": planted, "user": "cart"})
    app_id = app_ids.new()
    secret_agent.create_app({
        "id": app_id, "instances": 1, "cpus": 0.05, "mem": 32,
        "cmd": 'echo "$DB_PASSWORD" > "$MESOS_SANDBOX/seen"; echo "$DB_USER" >> "$MESOS_SANDBOX/seen"; exec sleep 300',
        "env": {"DB_PASSWORD": {"secret": "db"}, "DB_USER": {"secret": "user"}, "PLAIN": "x"},
        "secrets": {"db": {"source": f"{path}@password"}, "user": {"source": f"{path}@user"}},
    })
    task = first_task(secret_agent, app_id)
    seen = secret_agent.sandbox(task["id"]) / "seen"
    wait_until(lambda: seen.exists() and seen.read_text().count("\n") == 2, timeout=20, what="the instance to write its env")
    assert seen.read_text() == f"{planted}\ncart\n"
    # The app's definition shows the reference, never the value.
    app = secret_agent.app(app_id)
    assert app["env"]["DB_PASSWORD"] == {"secret": "db"} and app["secrets"]["db"] == {"source": f"{path}@password"}
    for text in surfaces(secret_agent, app_id):
        assert planted not in text
    # Only the instance's own sandbox (where the app itself wrote it) holds it.
    assert files_holding(secret_agent.data_dir, planted, skip=("sandboxes",)) == []


def test_a_missing_secret_fails_the_instance_naming_it(secret_agent, app_ids):
    app_id = app_ids.new()
    secret_agent.create_app({
        "id": app_id, "instances": 1, "cpus": 0.05, "mem": 32, "cmd": "sleep 300",
        "env": {"TOKEN": {"secret": "token"}}, "secrets": {"token": {"source": "nowhere/at-all@token"}},
        "backoffSeconds": 60,
    })
    failure = wait_until(lambda: secret_agent.app(app_id).get("lastTaskFailure"), timeout=30, what="the instance to fail")
    assert "cannot read the secret 'token' (nowhere/at-all@token): there is no secret at nowhere/at-all" in failure["message"], failure


def test_without_a_key_apps_with_secrets_are_refused(make_agent, app_ids):
    agent = make_agent()
    response = agent.post("/v2/apps", json={
        "id": app_ids.new(), "cmd": "sleep 300", "env": {"T": {"secret": "t"}}, "secrets": {"t": {"source": "a/b"}}})
    assert response.status_code == 422
    assert "Feature secrets is not enabled" in response.text and "--secrets-key-file" in response.text


@pytest.mark.skipif(os.geteuid() != 0, reason="containers need root")
def test_a_secret_volume_is_a_read_only_file_in_the_container(secret_agent, app_ids, tmp_path):
    layout = tmp_path / "layout"
    build_httpd_image(layout, "1", "secret test\n")
    imported = secret_agent.cli("image", "import", str(layout), "--name", "localhost/secrets/web:1")
    assert imported.returncode == 0, imported.stderr
    planted = f"planted-{uuid.uuid4().hex}"
    path = f"certs/tls-{uuid.uuid4().hex[:6]}"
    write_secret(secret_agent, path, {"key": planted})
    app_id = app_ids.new()
    secret_agent.create_app({
        "id": app_id, "instances": 1, "cpus": 0.05, "mem": 32,
        "cmd": "cat /run/secrets/tls > /mnt/mesos/sandbox/seen; (echo x >> /run/secrets/tls) 2>/dev/null && echo writable >> /mnt/mesos/sandbox/seen;"
               " echo \"env:$TLS_KEY\" >> /mnt/mesos/sandbox/seen; exec httpd -f -p $PORT0 -h /www",
        "container": {"type": "DOCKER", "docker": {"image": "localhost/secrets/web:1"},
                      "volumes": [{"containerPath": "/run/secrets/tls", "secret": "tls"}]},
        "env": {"TLS_KEY": {"secret": "tls"}},
        "secrets": {"tls": {"source": path}},
        "portDefinitions": [{"port": 0}],
    })
    task = first_task(secret_agent, app_id)
    seen = secret_agent.sandbox(task["id"]) / "seen"
    wait_until(lambda: seen.exists() and "env:" in seen.read_text(), timeout=30, what="the container to read its secret")
    # A secret with one key gives that key's value; the file is read-only inside the container.
    assert seen.read_text() == f"{planted}env:{planted}\n"
    files = [p for p in (secret_agent.state_dir / "containers" / task["id"] / "secrets").iterdir()]
    assert len(files) == 1 and stat.S_IMODE(files[0].stat().st_mode) == 0o400
    secret_agent.delete(f"/v2/apps{app_id}?force=true")
    wait_until(lambda: not (secret_agent.state_dir / "containers" / task["id"]).exists(), timeout=30,
               what="the container's files, its secret among them, to be removed")
    assert files_holding(secret_agent.data_dir, planted, skip=("sandboxes",)) == []


def test_each_instance_gets_a_token_for_its_own_app_only(make_agent, key_file, app_ids):
    """With --acl default-deny an instance finds FLOTILLA_TOKEN in its environment: it reads the
    secrets its app declares, nothing else, and the token dies with the instance."""
    agent = make_agent(extra_args=["--secrets-key-file", str(key_file), "--acl", "default-deny"])
    bootstrap = agent.cli("acl", "bootstrap", "--json")
    assert bootstrap.returncode == 0, bootstrap.stderr
    root = hvac.Client(url=agent.url, token=json.loads(bootstrap.stdout)["SecretID"])
    own, foreign = f"shop/db-{uuid.uuid4().hex[:6]}", f"billing/db-{uuid.uuid4().hex[:6]}"
    root.secrets.kv.v2.create_or_update_secret(path=own, secret={"password": "mine"})
    root.secrets.kv.v2.create_or_update_secret(path=foreign, secret={"password": "theirs"})
    app_id = app_ids.new()
    base = agent.url
    response = requests.post(f"{base}/v2/apps", headers={"X-Vault-Token": root.token}, json={
        "id": app_id, "instances": 1, "cpus": 0.05, "mem": 32,
        "cmd": (f'echo "$FLOTILLA_TOKEN" > "$MESOS_SANDBOX/token";'
                f' curl -s -H "X-Vault-Token: $FLOTILLA_TOKEN" {base}/v1/secret/data/{own} > "$MESOS_SANDBOX/own";'
                f' curl -s -o /dev/null -w "%{{http_code}}" -H "X-Vault-Token: $FLOTILLA_TOKEN" {base}/v1/secret/data/{foreign} > "$MESOS_SANDBOX/foreign";'
                ' exec sleep 300'),
        "env": {"DB": {"secret": "db"}}, "secrets": {"db": {"source": f"{own}@password"}},
    }, timeout=10)
    assert response.status_code == 201, response.text
    tasks = wait_until(lambda: (lambda r: r.json()["tasks"] or None)(requests.get(f"{base}/v2/apps{app_id}/tasks", headers={"X-Vault-Token": root.token}, timeout=5)),
                       timeout=30, what="the instance to start")
    sandbox = agent.sandbox(tasks[0]["id"])
    wait_until(lambda: (sandbox / "foreign").exists() and (sandbox / "foreign").read_text() != "", timeout=30, what="the instance's requests")
    assert '"password":"mine"' in (sandbox / "own").read_text().replace(" ", "")
    assert (sandbox / "foreign").read_text() == "403"
    token = (sandbox / "token").read_text().strip()
    assert requests.get(f"{base}/v1/secret/data/{own}", headers={"X-Vault-Token": token}, timeout=5).status_code == 200
    assert requests.put(f"{base}/v1/secret/data/{own}", headers={"X-Vault-Token": token}, json={"data": {"password": "x"}}, timeout=5).status_code == 403
    requests.delete(f"{base}/v2/apps{app_id}?force=true", headers={"X-Vault-Token": root.token}, timeout=5)
    wait_until(lambda: requests.get(f"{base}/v1/secret/data/{own}", headers={"X-Vault-Token": token}, timeout=5).status_code == 403,
               timeout=30, what="the instance's token to be revoked when it ended")


def test_restart_on_secret_change_rolls_the_app_to_the_new_value(secret_agent, app_ids):
    path = f"shop/rotating-{uuid.uuid4().hex[:6]}"
    write_secret(secret_agent, path, {"password": "first"})

    def app(app_id, restart):
        return {
            "id": app_id, "instances": 1, "cpus": 0.05, "mem": 32, "restartOnSecretChange": restart,
            "cmd": 'echo "$DB_PASSWORD" > "$MESOS_SANDBOX/seen"; exec sleep 300',
            "env": {"DB_PASSWORD": {"secret": "db"}}, "secrets": {"db": {"source": f"{path}@password"}},
        }

    rolling, steady = app_ids.new("rolling"), app_ids.new("steady")
    secret_agent.create_app(app(rolling, True))
    secret_agent.create_app(app(steady, False))
    first, unchanged = first_task(secret_agent, rolling), first_task(secret_agent, steady)
    assert secret_agent.app(rolling)["restartOnSecretChange"] is True
    write_secret(secret_agent, path, {"password": "second"})

    def replaced():
        tasks = secret_agent.tasks(rolling)
        fresh = [t for t in tasks if t["id"] != first["id"] and t["state"] == "TASK_RUNNING"]
        if len(tasks) == 1 and fresh:
            seen = secret_agent.sandbox(fresh[0]["id"]) / "seen"
            return fresh[0] if seen.exists() and seen.read_text() == "second\n" else None
        return None

    wait_until(replaced, timeout=60, what="the app to restart with the secret's new version")
    assert [t["id"] for t in secret_agent.tasks(steady)] == [unchanged["id"]], "an app that did not ask keeps its instance"
