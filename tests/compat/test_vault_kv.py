"""Vault's KV v2 API as `hvac` (Vault's Python client, from PyPI) speaks it to a real agent started
with a secrets key: versions, check-and-set, patch, soft delete, undelete, destroy, metadata,
listing and the engine's config; and secrets sealed at rest, with a wrong key refused at start."""

import os
import subprocess
import time
import uuid

import hvac
import json
import pytest
import requests
from hvac.exceptions import InvalidPath, InvalidRequest

from support.flotilla import flotilla_binary, start_agent


@pytest.fixture(scope="module")
def key_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("secrets-key") / "key"
    key = subprocess.run([str(flotilla_binary()), "secrets", "keygen"], capture_output=True, text=True, check=True).stdout
    path.write_text(key)
    path.chmod(0o600)
    return path


@pytest.fixture(scope="module")
def vault_agent(tmp_path_factory, key_file):
    agent = start_agent(flotilla_binary(), tmp_path_factory.mktemp("vault-agent"), extra_args=["--secrets-key-file", str(key_file)])
    try:
        yield agent
    finally:
        agent.stop()
        agent.assert_no_leftovers()


@pytest.fixture
def kv(vault_agent):
    return hvac.Client(url=vault_agent.url, token="unused-until-acls").secrets.kv.v2


def unique(name):
    return f"{name}-{uuid.uuid4().hex[:8]}"


def test_versions_are_written_and_read_back(kv):
    path = unique("shop/db")
    first = kv.create_or_update_secret(path=path, secret={"password": "one", "user": "cart"})
    assert first["data"]["version"] == 1 and first["data"]["destroyed"] is False
    kv.create_or_update_secret(path=path, secret={"password": "two", "user": "cart"})
    current = kv.read_secret_version(path=path, raise_on_deleted_version=True)
    assert current["data"]["data"] == {"password": "two", "user": "cart"}
    assert current["data"]["metadata"]["version"] == 2
    assert kv.read_secret_version(path=path, version=1, raise_on_deleted_version=True)["data"]["data"]["password"] == "one"
    with pytest.raises(InvalidPath):
        kv.read_secret_version(path=unique("nothing/here"), raise_on_deleted_version=True)


def test_check_and_set(kv):
    path = unique("cas")
    kv.create_or_update_secret(path=path, secret={"k": "1"}, cas=0)
    with pytest.raises(InvalidRequest, match="check-and-set parameter did not match the current version"):
        kv.create_or_update_secret(path=path, secret={"k": "2"}, cas=0)
    assert kv.create_or_update_secret(path=path, secret={"k": "2"}, cas=1)["data"]["version"] == 2
    kv.update_metadata(path=path, cas_required=True)
    with pytest.raises(InvalidRequest, match="check-and-set parameter required"):
        kv.create_or_update_secret(path=path, secret={"k": "3"})


def test_patch_merges_into_a_new_version(kv):
    path = unique("patched")
    kv.create_or_update_secret(path=path, secret={"a": "1", "b": "2"})
    kv.patch(path=path, secret={"b": "3", "c": "4"})
    current = kv.read_secret_version(path=path, raise_on_deleted_version=True)["data"]
    assert current["data"] == {"a": "1", "b": "3", "c": "4"} and current["metadata"]["version"] == 2


def test_soft_delete_undelete_and_destroy(kv, vault_agent):
    path = unique("lifecycle")
    kv.create_or_update_secret(path=path, secret={"v": "1"})
    kv.create_or_update_secret(path=path, secret={"v": "2"})
    kv.delete_latest_version_of_secret(path=path)
    with pytest.raises(InvalidPath):
        kv.read_secret_version(path=path, raise_on_deleted_version=True)
    # Vault answers a deleted version 404 with its metadata; hvac hands it over when asked to.
    deleted = kv.read_secret_version(path=path, raise_on_deleted_version=False)
    assert deleted["data"]["data"] is None and deleted["data"]["metadata"]["deletion_time"] != ""
    kv.undelete_secret_versions(path=path, versions=[2])
    assert kv.read_secret_version(path=path, raise_on_deleted_version=True)["data"]["data"] == {"v": "2"}
    kv.delete_secret_versions(path=path, versions=[1])
    kv.destroy_secret_versions(path=path, versions=[1])
    metadata = kv.read_secret_metadata(path=path)["data"]
    assert metadata["versions"]["1"]["destroyed"] is True and metadata["versions"]["2"]["deletion_time"] == ""
    assert metadata["current_version"] == 2 and metadata["oldest_version"] == 1
    kv.delete_metadata_and_all_versions(path=path)
    with pytest.raises(InvalidPath):
        kv.read_secret_metadata(path=path)


def test_metadata_and_max_versions(kv):
    path = unique("limited")
    kv.update_metadata(path=path, max_versions=2, custom_metadata={"owner": "shop"})
    for index in range(4):
        kv.create_or_update_secret(path=path, secret={"n": str(index)})
    metadata = kv.read_secret_metadata(path=path)["data"]
    assert sorted(metadata["versions"]) == ["3", "4"] and metadata["oldest_version"] == 3
    assert metadata["custom_metadata"] == {"owner": "shop"} and metadata["max_versions"] == 2
    with pytest.raises(InvalidPath):
        kv.read_secret_version(path=path, version=1, raise_on_deleted_version=True)


def test_listing(kv, vault_agent):
    """Listing as hvac and Vault's CLI do it (the method LIST), and as Vault's API also takes it
    (GET with ?list=true), on one kept-alive connection."""
    top = unique("tree")
    for path in (f"{top}/db", f"{top}/cache", f"{top}/payments/stripe"):
        kv.create_or_update_secret(path=path, secret={"k": "v"})

    assert kv.list_secrets(path=top)["data"]["keys"] == ["cache", "db", "payments/"]
    assert kv.list_secrets(path=f"{top}/")["data"]["keys"] == ["cache", "db", "payments/"]
    assert kv.list_secrets(path=f"{top}/payments")["data"]["keys"] == ["stripe"]
    assert top + "/" in kv.list_secrets(path="")["data"]["keys"]
    with pytest.raises(InvalidPath):
        kv.list_secrets(path=unique("empty"))

    def listing(path):
        return requests.get(f"{vault_agent.url}/v1/secret/metadata/{path}", params={"list": "true"}, timeout=5)

    assert listing(top).json()["data"]["keys"] == ["cache", "db", "payments/"]
    empty = listing(unique("empty"))
    assert empty.status_code == 404 and empty.json() == {"errors": []}
    # LIST and other methods alternate on one connection; a body that reads like a LIST line is a body.
    with requests.Session() as session:
        for _ in range(3):
            listed = session.request("LIST", f"{vault_agent.url}/v1/secret/metadata/{top}/payments", timeout=5)
            assert listed.status_code == 200 and listed.json()["data"]["keys"] == ["stripe"]
            written = session.post(f"{vault_agent.url}/v1/secret/data/{top}/body", timeout=5,
                                   data=json.dumps({"data": {"line": "LIST /v1/secret/metadata/ HTTP/1.1"}}))
            assert written.status_code == 200, written.text
        read = session.get(f"{vault_agent.url}/v1/secret/data/{top}/body", timeout=5).json()
        assert read["data"]["data"] == {"line": "LIST /v1/secret/metadata/ HTTP/1.1"}


def test_engine_configuration(kv):
    assert kv.read_configuration()["data"]["max_versions"] == 0
    kv.configure(max_versions=5)
    try:
        assert kv.read_configuration()["data"]["max_versions"] == 5
        with pytest.raises(InvalidRequest, match="delete_version_after"):
            kv.configure(delete_version_after="eventually")
        kv.configure(delete_version_after="1h")
        assert kv.read_configuration()["data"]["delete_version_after"] == "1h0m0s"
    finally:
        kv.configure(max_versions=0, delete_version_after="0s")


def test_delete_version_after_deletes_a_version_when_its_time_comes(kv):
    path = unique("timed")
    kv.update_metadata(path=path, delete_version_after="2s")
    assert kv.read_secret_metadata(path=path)["data"]["delete_version_after"] == "2s"
    written = kv.create_or_update_secret(path=path, secret={"k": "v"})["data"]
    assert written["deletion_time"] != ""
    assert kv.read_secret_version(path=path, raise_on_deleted_version=True)["data"]["data"] == {"k": "v"}
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            kv.read_secret_version(path=path, raise_on_deleted_version=True)
        except InvalidPath:
            break
        time.sleep(0.3)
    else:
        pytest.fail("the version outlived its delete_version_after")
    kv.undelete_secret_versions(path=path, versions=[1])
    assert kv.read_secret_version(path=path, raise_on_deleted_version=True)["data"]["data"] == {"k": "v"}


def test_bad_requests_get_vaults_error_shape(vault_agent):
    response = requests.post(f"{vault_agent.url}/v1/secret/data/x", data="{not json", timeout=5)
    assert response.status_code == 400 and response.json()["errors"]
    response = requests.post(f"{vault_agent.url}/v1/secret/data/a//b", json={"data": {"k": "v"}}, timeout=5)
    assert response.status_code == 400 and "segments" in response.json()["errors"][0]
    response = requests.post(f"{vault_agent.url}/v1/secret/data/x", json={"secret": {"k": "v"}}, timeout=5)
    assert response.status_code == 400 and response.json()["errors"] == ["no data provided"]
    # What is not acted on is refused, not dropped.
    response = requests.post(f"{vault_agent.url}/v1/secret/data/x", json={"data": {"k": "v"}, "options": {"ttl": "1h"}}, timeout=5)
    assert response.status_code == 400 and "unknown option 'ttl'" in response.json()["errors"][0]
    response = requests.post(f"{vault_agent.url}/v1/secret/config", json={"max_version": 3}, timeout=5)
    assert response.status_code == 400 and "unknown field 'max_version'" in response.json()["errors"][0]


def test_the_cli_writes_and_reads(vault_agent, tmp_path):
    path = unique("cli/app")
    value_file = tmp_path / "value"
    value_file.write_text("from-a-file")
    put = vault_agent.cli("secret", "put", path, "user=cart", f"password=@{value_file}")
    assert put.returncode == 0, put.stderr
    assert put.stdout.strip() == f"{path} version 1"
    got = vault_agent.cli("secret", "get", path, "--field", "password")
    assert got.returncode == 0 and got.stdout == "from-a-file\n"
    listed = vault_agent.cli("secret", "list", path.split("/")[0], "--json")
    assert path.split("/")[1] in listed.stdout
    missing = vault_agent.cli("secret", "get", unique("cli/none"))
    assert missing.returncode != 0 and "not found" in missing.stderr


def test_values_are_sealed_at_rest_and_never_logged(kv, vault_agent):
    planted = f"planted-{uuid.uuid4().hex}"
    path = unique("planted")
    kv.create_or_update_secret(path=path, secret={"token": planted})
    assert kv.read_secret_version(path=path, raise_on_deleted_version=True)["data"]["data"]["token"] == planted
    # Not in the database (nor its write-ahead log), not in the agent's log, not on other surfaces.
    for file in vault_agent.data_dir.rglob("*"):
        if file.is_file():
            assert planted.encode() not in file.read_bytes(), f"{file} holds the planted value"
    for surface in ("/v2/apps", "/v2/deployments", "/v1/kv/?recurse=true", "/metrics", "/v1/secret/metadata/" + path):
        assert planted not in requests.get(vault_agent.url + surface, timeout=5).text, surface


def test_without_a_key_secrets_are_off_and_say_so(tmp_path):
    agent = start_agent(flotilla_binary(), tmp_path / "no-key")
    try:
        response = requests.get(f"{agent.url}/v1/secret/data/anything", timeout=5)
        assert response.status_code == 503
        assert "--secrets-key-file" in response.json()["errors"][0]
    finally:
        agent.stop()


def test_a_wrong_key_is_refused_at_start(tmp_path, key_file):
    data_dir = tmp_path / "keyed"
    agent = start_agent(flotilla_binary(), data_dir, extra_args=["--secrets-key-file", str(key_file)])
    agent.stop()
    other = tmp_path / "other-key"
    other.write_text(subprocess.run([str(flotilla_binary()), "secrets", "keygen"], capture_output=True, text=True, check=True).stdout)
    other.chmod(0o600)
    result = subprocess.run(
        [str(flotilla_binary()), "agent", "--data-dir", str(agent.state_dir), "--api-port", "0", "--secrets-key-file", str(other)],
        capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "does not open this store's secrets" in result.stdout + result.stderr
    # A key file others can read is refused too.
    other.chmod(0o644)
    result = subprocess.run(
        [str(flotilla_binary()), "agent", "--data-dir", str(agent.state_dir), "--api-port", "0", "--secrets-key-file", str(other)],
        capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "chmod 600" in result.stdout + result.stderr
