"""Real app definitions from Marathon's docs and examples (tests/compat/fixtures/marathon_apps,
each with its source and Marathon's own verdict in manifest.json) are accepted or refused by
Flotilla as Marathon accepts or refuses them.

Where Flotilla answers differently on purpose, `DELIBERATE` says why. Container definitions
(Docker and Mesos containers, bridge networking, the pre-1.5 spellings) get Marathon's verdict
too, now that the OCI driver runs them."""

import json
from pathlib import Path

import pytest

from support.flotilla import wait_until

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "marathon_apps"
MANIFEST = json.loads((FIXTURES / "manifest.json").read_text())
CONTAINER_NEEDS = {"container-docker", "container-mesos", "networks-container"}

# file: (Flotilla's verdict, why it differs from Marathon's)
DELIBERATE = {
    "51-privileged-job.json": (
        "refused",
        "a privileged container owns the node it runs on; Flotilla refuses it (422 saying so) rather than run it",
    ),
    "56-mesos-seccomp-profile.json": (
        "refused",
        "every container gets Flotilla's default seccomp filter (or none, when unconfined); a named profile "
        "(a file on a Mesos agent) is refused (422) rather than ignored",
    ),
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
    return entry["verdict"]


def test_the_corpus_is_large_and_real():
    real_without_containers = [e for e in MANIFEST if not e["derived"] and not CONTAINER_NEEDS & set(e["needs"])]
    assert len(real_without_containers) >= 30, "at least 30 real definitions from Marathon's docs and examples"
    real_containers = [e for e in MANIFEST if not e["derived"] and CONTAINER_NEEDS & set(e["needs"])]
    assert len(real_containers) >= 10, "at least 10 real container definitions"
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
