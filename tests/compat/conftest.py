"""Fixtures that run a real `flotilla agent` for the Marathon client compatibility tests.

The agent itself is driven by `support.flotilla` (shared with tests/integration). Each test
module gets its own agent, with its own data directory, API port and task port range, so several
test runs can share a machine.
"""

import re
import uuid

import pytest
from marathon import MarathonClient
from marathon.exceptions import NotFoundError

from support.flotilla import flotilla_binary, start_agent


@pytest.fixture(scope="module")
def agent(tmp_path_factory):
    agent = start_agent(flotilla_binary(), tmp_path_factory.mktemp("flotilla-agent"))
    try:
        yield agent
    finally:
        agent.stop()
        agent.assert_no_leftovers()


@pytest.fixture(scope="module")
def client(agent):
    return MarathonClient(agent.url, timeout=10)


class AppIds:
    """Hands out unique app ids under /compat and remembers them for cleanup."""

    def __init__(self, test_name: str):
        slug = re.sub(r"[^a-z0-9]+", "-", test_name.lower()).strip("-")
        self.default_name = slug.removeprefix("test-") or "app"
        self.issued = []

    def new(self, name: str = None) -> str:
        """An id like /compat/<name or test name>-<random>; `name` may contain '/' to nest."""
        app_id = f"/compat/{name or self.default_name}-{uuid.uuid4().hex[:8]}"
        self.issued.append(app_id)
        return app_id


@pytest.fixture
def app_ids(request, client):
    """Unique app ids for one test; every app created under them is deleted afterwards."""
    ids = AppIds(request.node.name)
    yield ids
    for app_id in ids.issued:
        try:
            client.delete_app(app_id, force=True)
        except NotFoundError:
            pass
