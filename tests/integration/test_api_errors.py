"""Bad requests get Marathon's status codes and error bodies, and leave the agent serving."""

import pytest
import requests

from support.flotilla import app_definition

SLEEP_CMD = "sleep 600"
UNKNOWN_VERSION = "2001-01-01T00:00:00.000Z"


@pytest.fixture(autouse=True)
def agent_survives(shared_agent):
    """After each bad request, the agent is still up and answering."""
    yield
    assert shared_agent.is_running(), "the agent died"
    response = shared_agent.get("/ping")
    assert response.status_code == 200 and response.text.strip() == "pong"


def error_paths(response) -> set:
    return {detail["path"] for detail in response.json().get("details", [])}


def assert_error(response, status: int):
    assert response.status_code == status, f"expected {status}, got {response.status_code}: {response.text}"
    body = response.json()
    assert isinstance(body.get("message"), str) and body["message"], body
    return body


def test_malformed_json_is_400(shared_agent):
    response = shared_agent.post(
        "/v2/apps", data='{"id": "/x", "cmd": ', headers={"Content-Type": "application/json"}
    )
    assert_error(response, 400)


def test_negative_instances_is_422_with_its_path(shared_agent):
    response = shared_agent.post("/v2/apps", json={"id": "/x", "cmd": "a", "instances": -1})
    assert_error(response, 422)
    assert "/instances" in error_paths(response), response.text


def test_unknown_field_is_422(shared_agent):
    response = shared_agent.post("/v2/apps", json={"id": "/x", "cmd": "a", "instanz": 1})
    assert_error(response, 422)
    assert "/instanz" in error_paths(response), response.text


def test_unknown_constraint_operator_is_422(shared_agent):
    response = shared_agent.post(
        "/v2/apps", json={"id": "/x", "cmd": "a", "constraints": [["hostname", "SOMETIMES"]]}
    )
    assert_error(response, 422)
    assert any(path.startswith("/constraints") for path in error_paths(response)), response.text


def test_invalid_app_id_is_422(shared_agent):
    response = shared_agent.post("/v2/apps", json={"id": "/Bad_ID", "cmd": "a"})
    assert_error(response, 422)
    assert "/id" in error_paths(response), response.text


def test_unknown_app_is_404(shared_agent, app_ids):
    missing = app_ids.new("missing")
    assert_error(shared_agent.get(f"/v2/apps{missing}"), 404)
    assert_error(shared_agent.get(f"/v2/apps{missing}/tasks"), 404)
    assert_error(shared_agent.get(f"/v2/apps{missing}/versions"), 404)
    assert_error(shared_agent.delete(f"/v2/apps{missing}"), 404)
    assert shared_agent.app(missing) is None, "a failed request must not create the app"


def test_rollback_of_an_unknown_app_is_404(shared_agent, app_ids):
    # A body with only `version` asks to return to that version; an app that does not exist has
    # none. (Marathon 1.x instead tries to create the app from the body and answers 422.)
    missing = app_ids.new("missing")
    assert_error(shared_agent.put(f"/v2/apps{missing}", json={"version": UNKNOWN_VERSION}), 404)
    assert shared_agent.app(missing) is None, "a failed request must not create the app"


def test_unknown_task_is_404(shared_agent, app_ids):
    app_id = app_ids.new()
    shared_agent.create_app(app_definition(app_id, SLEEP_CMD, instances=0))
    assert_error(shared_agent.delete(f"/v2/apps{app_id}/tasks/nope"), 404)


def test_second_post_of_an_id_is_409(shared_agent, app_ids):
    app_id = app_ids.new()
    definition = app_definition(app_id, SLEEP_CMD, instances=0)
    shared_agent.create_app(definition)
    assert_error(shared_agent.post("/v2/apps", json=definition), 409)


def test_update_during_a_deployment_is_409_unless_forced(shared_agent, app_ids):
    app_id = app_ids.new()
    created = shared_agent.create_app(app_definition(app_id, SLEEP_CMD, cpus=1000))  # can never fit
    deployment = created["deployments"][0]["id"]

    body = assert_error(shared_agent.put(f"/v2/apps{app_id}", json={"instances": 2}), 409)
    assert deployment in {d["id"] for d in body.get("deployments", [])}, body
    assert shared_agent.app(app_id)["instances"] == 1

    forced = shared_agent.put(f"/v2/apps{app_id}", params={"force": "true"}, json={"instances": 2})
    assert forced.status_code == 200, forced.text
    assert forced.json()["deploymentId"] and forced.json()["version"]
    assert shared_agent.app(app_id)["instances"] == 2
    assert deployment not in {d["id"] for d in shared_agent.deployments()}, "force must cancel the old deployment"


def test_body_over_one_mib_is_413(shared_agent, app_ids):
    padding = "x" * (1024 * 1024 + 1024)
    body = {"id": app_ids.new(), "cmd": SLEEP_CMD, "labels": {"padding": padding}}
    try:
        response = shared_agent.post("/v2/apps", json=body)
    except requests.ConnectionError as error:
        pytest.fail(f"the agent dropped the connection instead of answering 413: {error}")
    assert_error(response, 413)
    assert shared_agent.app(body["id"]) is None


def test_rollback_to_an_unknown_version_is_404(shared_agent, app_ids):
    app_id = app_ids.new()
    created = shared_agent.create_app(app_definition(app_id, SLEEP_CMD, instances=0))
    assert_error(shared_agent.put(f"/v2/apps{app_id}", json={"version": UNKNOWN_VERSION}), 404)
    assert shared_agent.app(app_id)["version"] == created["version"], "a failed rollback must change nothing"


# Bodies a client might send by mistake (or on purpose): wrong types at every level, deep nesting,
# huge numbers, strings where objects belong.
HOSTILE_BODIES = [
    b"", b"null", b"[]", b"{}", b"[1,2,3]", b'"text"', b"{\"id\": {}}", b"{\"apps\": 7}", b"{\"groups\": [null]}",
    b"{\"groups\": [{\"id\": \"a\", \"groups\": [{\"id\": \"b\", \"groups\": [{\"id\": \"..\"}]}]}]}",
    b"[{\"KV\": {\"Verb\": \"set\", \"Key\": 5}}]", b"[{\"KV\": {\"Verb\": \"lock\", \"Key\": \"k\", \"Session\": 1e309}}]",
    b"[{\"KV\": {\"Verb\": \"cas\", \"Key\": \"k\", \"Index\": -1}}]", b"[{\"Node\": {}}]", b"[{\"KV\": {\"Verb\": \"get\"}}]",
    b"{\"TTL\": 12, \"LockDelay\": \"forever\"}", b"{\"NodeChecks\": \"serfHealth\"}", b"{\"ServiceChecks\": [7]}",
    b"{\"Name\": \"x\", \"HTTP\": \"not a url\", \"Interval\": \"1s\"}", b"{\"Name\": \"x\", \"Args\": \"sh\", \"Interval\": \"1s\"}",
    b"{\"Node\": \"n\", \"Address\": \"a\", \"Service\": \"s\"}", b"{\"Node\": \"n\", \"Address\": \"a\", \"Checks\": [1, {}]}",
    b"[" * 5000 + b"]" * 5000, b"{\"a\":" * 3000 + b"1" + b"}" * 3000, b"\xff\xfe\x00garbage", b"{\"id\": \"/x\", \"scaleBy\": 1e400}",
]
HOSTILE_TARGETS = [
    ("PUT", "/v1/txn"), ("PUT", "/v1/session/create"), ("POST", "/v2/groups"), ("PUT", "/v2/groups/hostile"),
    ("PUT", "/v1/catalog/register"), ("PUT", "/v1/catalog/deregister"), ("PUT", "/v1/agent/check/register"),
    ("PUT", "/v2/apps"), ("PUT", "/v1/agent/service/register"), ("POST", "/v2/eventSubscriptions?callbackUrl=x"),
]
# Consul answers these with 500 and a sentence clients match; anything else 5xx is a crash.
CONSUL_500S = ("Must provide node", "Missing check", "Missing node", "Invalid Session TTL", "Session TTL", "invalid session", "Invalid Behavior")


@pytest.mark.parametrize("method,path", HOSTILE_TARGETS)
def test_hostile_bodies_get_a_4xx_and_change_nothing(shared_agent, method, path):
    def group_ids():
        return sorted(group["id"] for group in shared_agent.get("/v2/groups").json()["groups"])

    before = group_ids()
    for body in HOSTILE_BODIES:
        response = shared_agent.request(method, path, data=body, headers={"Content-Type": "application/json"})
        assert response.status_code < 500 or any(text in response.text for text in CONSUL_500S), (
            f"{method} {path} with {body[:60]!r}: {response.status_code} {response.text[:200]}")
    # `PUT /v2/groups/hostile` with `{}` creates the empty group, as Marathon's does; nothing else may.
    shared_agent.delete("/v2/groups/hostile", params={"force": "true"})
    assert group_ids() == before, "a refused body made a group"
