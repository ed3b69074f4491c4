"""Access control with the real clients: an agent with --acl default-deny, its first token from
`flotilla acl bootstrap`, policies written with hvac (Vault's syntax, and Consul's key_prefix
rules in the same language), and tokens checked on the Vault, Consul and Marathon surfaces."""

import json
import subprocess
import uuid

import consul
import hvac
import pytest
import requests
from hvac.exceptions import Forbidden, InvalidRequest
from marathon import MarathonApp, MarathonClient
from marathon.exceptions import MarathonHttpError

from support.flotilla import flotilla_binary, start_agent


@pytest.fixture(scope="module")
def acl_agent(tmp_path_factory):
    directory = tmp_path_factory.mktemp("acl-agent")
    key = directory / "secrets.key"
    key.write_text(subprocess.run([str(flotilla_binary()), "secrets", "keygen"], capture_output=True, text=True, check=True).stdout)
    key.chmod(0o600)
    agent = start_agent(flotilla_binary(), directory / "agent", extra_args=["--acl", "default-deny", "--secrets-key-file", str(key)])
    try:
        yield agent
    finally:
        agent.stop()


@pytest.fixture(scope="module")
def root_token(acl_agent):
    result = acl_agent.cli("acl", "bootstrap", "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["SecretID"]


@pytest.fixture(scope="module")
def root(acl_agent, root_token):
    return hvac.Client(url=acl_agent.url, token=root_token)


def token_with(root, name, policy, **options):
    root.sys.create_or_update_policy(name=name, policy=policy)
    return root.auth.token.create(policies=[name], **options)["auth"]["client_token"]


def consul_port(agent):
    return int(agent.url.rsplit(":", 1)[1])


def test_bootstrap_works_once_and_the_token_is_not_stored(acl_agent, root_token):
    again = requests.put(f"{acl_agent.url}/v1/acl/bootstrap", timeout=5)
    assert again.status_code == 403 and "already" in again.text
    for file in acl_agent.state_dir.rglob("*"):
        if file.is_file():
            assert root_token.encode() not in file.read_bytes(), f"{file} holds the token"
    assert requests.get(f"{acl_agent.url}/ping", timeout=5).text.strip() == "pong", "/ping needs no token"


def test_without_a_token_every_surface_refuses(acl_agent):
    with pytest.raises(Forbidden):
        hvac.Client(url=acl_agent.url).secrets.kv.v2.read_secret_version(path="anything", raise_on_deleted_version=True)
    with pytest.raises(consul.ACLPermissionDenied):
        consul.Consul(host="127.0.0.1", port=consul_port(acl_agent)).kv.get("anything")
    with pytest.raises(MarathonHttpError) as refused:
        MarathonClient(acl_agent.url).list_apps()
    assert refused.value.status_code == 401
    assert requests.get(f"{acl_agent.url}/metrics", timeout=5).status_code == 401
    # A made-up token is no better.
    with pytest.raises(consul.ACLPermissionDenied):
        consul.Consul(host="127.0.0.1", port=consul_port(acl_agent), token=str(uuid.uuid4())).kv.get("anything")


def test_a_read_only_token_reads_but_does_not_write_and_dies_with_revocation(acl_agent, root):
    path = f"shop/db-{uuid.uuid4().hex[:6]}"
    root.secrets.kv.v2.create_or_update_secret(path=path, secret={"password": "s3cret"})
    root.secrets.kv.v2.create_or_update_secret(path="other/thing", secret={"k": "v"})
    reader = token_with(root, "cart-read", 'path "secret/data/shop/*" { capabilities = ["read"] }', ttl="1h")
    client = hvac.Client(url=acl_agent.url, token=reader)
    assert client.secrets.kv.v2.read_secret_version(path=path, raise_on_deleted_version=True)["data"]["data"] == {"password": "s3cret"}
    with pytest.raises(Forbidden):
        client.secrets.kv.v2.create_or_update_secret(path=path, secret={"password": "mine"})
    with pytest.raises(Forbidden):
        client.secrets.kv.v2.read_secret_version(path="other/thing", raise_on_deleted_version=True)
    # It may not make tokens at all; a token that may cannot give a child policies it lacks.
    with pytest.raises(Forbidden):
        client.auth.token.create(policies=["cart-read"])
    maker = token_with(root, "token-maker", 'path "auth/token/create" { capabilities = ["update"] }')
    with pytest.raises(InvalidRequest, match="subset"):
        hvac.Client(url=acl_agent.url, token=maker).auth.token.create(policies=["root"])
    made = hvac.Client(url=acl_agent.url, token=maker).auth.token.create(policies=["token-maker"], explicit_max_ttl="2h")
    assert made["auth"]["policies"] == ["token-maker"]
    # What it does not act on, it says, as Vault does.
    assert made["warnings"] == ["Endpoint ignored these unrecognized parameters: [explicit_max_ttl]"]
    looked = client.auth.token.lookup_self()["data"]
    assert looked["policies"] == ["cart-read"] and 3500 < looked["ttl"] <= 3600
    client.auth.token.revoke_self()
    with pytest.raises(Forbidden):
        client.secrets.kv.v2.read_secret_version(path=path, raise_on_deleted_version=True)


def test_consul_rules_decide_for_consul_clients(acl_agent, root, root_token):
    admin = consul.Consul(host="127.0.0.1", port=consul_port(acl_agent), token=root_token)
    assert admin.kv.put("shop/config", "v1") is True
    assert admin.kv.put("billing/config", "v2") is True
    token = token_with(root, "shop-kv", 'key_prefix "shop/" { policy = "read" }\nservice_prefix "" { policy = "read" }')
    shop = consul.Consul(host="127.0.0.1", port=consul_port(acl_agent), token=token)
    assert shop.kv.get("shop/config")[1]["Value"] == b"v1"
    with pytest.raises(consul.ACLPermissionDenied):
        shop.kv.put("shop/config", "changed")
    with pytest.raises(consul.ACLPermissionDenied):
        shop.kv.get("billing/config")
    assert isinstance(shop.catalog.services()[1], dict)


def test_marathon_apps_by_id_prefix(acl_agent, root):
    token = token_with(root, "shop-apps", 'path "marathon/apps/shop/*" { capabilities = ["create", "read", "update", "delete"] }')
    client = MarathonClient(acl_agent.url, auth_token=token)
    app_id = f"/shop/web-{uuid.uuid4().hex[:6]}"
    client.create_app(app_id, MarathonApp(cmd="sleep 300", instances=0, cpus=0.05, mem=16))
    assert client.get_app(app_id).instances == 0
    with pytest.raises(MarathonHttpError) as refused:
        client.create_app(f"/billing/web-{uuid.uuid4().hex[:6]}", MarathonApp(cmd="sleep 300", instances=0, cpus=0.05, mem=16))
    assert refused.value.status_code == 403
    client.delete_app(app_id, force=True)
    # The same token, sent as Vault and Consul clients send theirs, is the same token.
    assert requests.get(f"{acl_agent.url}/v2/apps{app_id}", headers={"X-Vault-Token": token}, timeout=5).status_code in (200, 404)
    assert requests.get(f"{acl_agent.url}/v2/apps{app_id}", headers={"Authorization": f"Bearer {token}"}, timeout=5).status_code in (200, 404)
    assert requests.get(f"{acl_agent.url}/v2/apps", headers={"Authorization": f"Bearer {token}"}, timeout=5).status_code == 403


def test_policies_are_listed_read_and_refused_when_malformed(root):
    root.sys.create_or_update_policy(name="listed", policy='path "secret/data/x" { capabilities = ["read"] }')
    assert "listed" in root.sys.list_policies()["data"]["keys"]
    assert 'path "secret/data/x"' in root.sys.read_policy(name="listed")["data"]["rules"]
    with pytest.raises(InvalidRequest):
        root.sys.create_or_update_policy(name="broken", policy='path "x" { capabilities = ["fly"] }')
    assert "listed" in root.sys.list_acl_policies()["data"]["keys"]  # the method LIST
    root.sys.delete_policy(name="listed")
    assert "listed" not in root.sys.list_policies()["data"]["keys"]


def test_accessors_are_listed_looked_up_and_revoked_with_sudo_only(acl_agent, root):
    made = root.auth.token.create(policies=["default"], ttl="1h")["auth"]
    assert made["accessor"] in root.auth.token.list_accessors()["data"]["keys"]
    looked = root.auth.token.lookup_accessor(made["accessor"])["data"]
    assert looked["accessor"] == made["accessor"] and looked["id"] == "" and made["client_token"] not in json.dumps(looked)
    plain = hvac.Client(url=acl_agent.url, token=made["client_token"])
    with pytest.raises(Forbidden):
        plain.auth.token.list_accessors()
    root.auth.token.revoke_accessor(made["accessor"])
    assert made["accessor"] not in root.auth.token.list_accessors()["data"]["keys"]
    assert not plain.is_authenticated()


def test_the_cli_sends_its_token(acl_agent, root_token):
    denied = acl_agent.cli("apps")
    assert denied.returncode != 0 and "Not Authenticated" in denied.stderr
    allowed = subprocess.run(acl_agent.cli_command("apps", "--json"), capture_output=True, text=True, timeout=30,
                             env={"FLOTILLA_TOKEN": root_token, "PATH": "/usr/bin:/bin"})
    assert allowed.returncode == 0, allowed.stderr


def test_the_audit_log_records_writes_and_refusals_without_secrets(acl_agent, root, root_token):
    planted = f"planted-{uuid.uuid4().hex}"
    root.secrets.kv.v2.create_or_update_secret(path="audited/db", secret={"password": planted})
    requests.get(f"{acl_agent.url}/v1/secret/data/audited/db", params={"token": "made-up-" + planted}, timeout=5)
    result = subprocess.run(acl_agent.cli_command("audit", "tail", "-n", "500", "--json"), capture_output=True, text=True, timeout=30,
                            env={"FLOTILLA_TOKEN": root_token, "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    entries = json.loads(result.stdout)
    me = root.auth.token.lookup_self()["data"]["accessor"]
    assert any(e["accessor"] == me and e["method"] == "POST" and e["path"] == "/v1/secret/data/audited/db" and e["decision"] == "allowed"
               for e in entries), entries[-5:]
    assert any(e["accessor"] == "unknown" and e["path"] == "/v1/secret/data/audited/db" and e["decision"] == "denied" and e["status"] == 403
               for e in entries), entries[-5:]
    assert any(e["accessor"] == "anonymous" and e["decision"] == "denied" for e in entries)
    log = (acl_agent.state_dir / "audit.log").read_bytes()
    assert planted.encode() not in log and root_token.encode() not in log


def test_a_token_with_uses_dies_after_them(acl_agent, root):
    root.secrets.kv.v2.create_or_update_secret(path="counted/db", secret={"k": "v"})
    policy = 'path "secret/data/counted/*" { capabilities = ["read"] }'
    token = token_with(root, "counted", policy, num_uses=2)
    client = hvac.Client(url=acl_agent.url, token=token)
    for _ in range(2):
        assert client.secrets.kv.v2.read_secret_version(path="counted/db", raise_on_deleted_version=True)["data"]["data"] == {"k": "v"}
    with pytest.raises(Forbidden):
        client.secrets.kv.v2.read_secret_version(path="counted/db", raise_on_deleted_version=True)
