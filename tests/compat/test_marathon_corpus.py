"""Real app definitions from Marathon's docs and examples (tests/compat/fixtures/marathon_apps,
each with its source and Marathon's own verdict in manifest.json) are accepted or refused by
Flotilla as Marathon accepts or refuses them.

Where Flotilla answers differently on purpose, `DELIBERATE` says why; definitions that need a
container are refused until the container driver exists, with a 422 that says so."""

import json
from pathlib import Path

import pytest

from support.flotilla import wait_until

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "marathon_apps"
MANIFEST = json.loads((FIXTURES / "manifest.json").read_text())
CONTAINER_NEEDS = {"container-docker", "container-mesos", "networks-container"}

# file: (Flotilla's verdict, why it differs from Marathon's)
DELIBERATE = {
    "31-event-my-app-appdefinition.json": (
        "accepted",
        "Marathon's RAML requires both minimumHealthCapacity and maximumOverCapacity in an upgradeStrategy; "
        "Flotilla fills a field left out with Marathon's default (1), as its own strategy fields "
        "(type, progressDeadlineSeconds, ...) are meant to be given on their own",
    ),
}


def verdict_for(entry):
    """What Flotilla should answer: Marathon's verdict, except where a difference is deliberate."""
    if entry["file"] in DELIBERATE:
        return DELIBERATE[entry["file"]][0]
    if CONTAINER_NEEDS & set(entry["needs"]) and entry["verdict"] == "accepted":
        return "refused"
    return entry["verdict"]


def test_the_corpus_is_large_and_real():
    real_without_containers = [e for e in MANIFEST if not e["derived"] and not CONTAINER_NEEDS & set(e["needs"])]
    assert len(real_without_containers) >= 30, "at least 30 real definitions from Marathon's docs and examples"
    assert all(e["source"].startswith("mesosphere/marathon:") for e in MANIFEST)
    assert {e["verdict"] for e in MANIFEST} == {"accepted", "refused"}


@pytest.mark.parametrize("entry", MANIFEST, ids=[entry["file"] for entry in MANIFEST])
def test_marathon_gives_the_same_verdict(agent, entry):
    definition = json.loads((FIXTURES / entry["file"]).read_text())
    expected = verdict_for(entry)
    endpoint = entry["endpoint"]
    reply = agent.post(endpoint, json=definition)
    try:
        if expected == "accepted":
            assert reply.status_code == 201, f"{entry['file']} ({entry['source']}): Marathon accepts it, Flotilla said {reply.status_code} {reply.text[:400]}"
        else:
            assert reply.status_code in (400, 422), (
                f"{entry['file']} ({entry['source']}): Marathon refuses it ({entry['reason']}), Flotilla said {reply.status_code} {reply.text[:300]}")
            body = reply.json()
            assert body.get("message"), "a refusal says what is wrong"
            if CONTAINER_NEEDS & set(entry["needs"]) and entry["verdict"] == "accepted":
                assert "container" in reply.text, f"a container definition is refused for its container: {reply.text[:300]}"
    finally:
        if reply.status_code == 201:
            if endpoint == "/v2/groups":
                group = definition.get("id", "/")
                agent.delete(f"/v2/groups/{group.strip('/')}", params={"force": "true"})
            else:
                app_id = definition["id"] if definition["id"].startswith("/") else "/" + definition["id"]
                agent.delete(f"/v2/apps{app_id}", params={"force": "true"})
                # Several definitions share an id: the next one may come once this one has stopped
                # (while its deployment runs, a new app of that id is locked, as in Marathon).
                wait_until(lambda: not [d for d in agent.deployments() if app_id in d["affectedApps"]], timeout=30,
                           what=f"{app_id} to be gone")
