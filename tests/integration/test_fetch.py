"""Marathon's `fetch` (and the older `uris`): artifacts downloaded into the sandbox before the
instance starts, archives extracted, executables marked, a failed download reported. The
artifacts come from a real HTTP server on 127.0.0.1 started by the test."""

import http.server
import io
import os
import tarfile
import threading

import pytest

from support.flotilla import wait_until


@pytest.fixture
def artifacts(tmp_path):
    """A loopback HTTP server over a directory: (base URL, directory, requests served)."""
    directory = tmp_path / "www"
    directory.mkdir()
    served = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(directory), **kwargs)

        def log_message(self, format, *args):
            served.append(self.path)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", directory, served
    finally:
        server.shutdown()
        server.server_close()


def tarball(path, files):
    with tarfile.open(path, "w:gz") as tar:
        for name, (content, mode) in files.items():
            info = tarfile.TarInfo(name)
            data = content.encode()
            info.size, info.mode = len(data), mode
            tar.addfile(info, io.BytesIO(data))


def test_a_tarball_is_fetched_extracted_and_run(agent, app_ids, artifacts):
    base, directory, served = artifacts
    tarball(directory / "app.tgz", {"app/run.sh": ("#!/bin/sh\necho fetched-and-running > out.txt\nexec sleep 300\n", 0o755),
                                    "app/config.txt": ("color=blue\n", 0o644)})
    (directory / "tool").write_text("#!/bin/sh\necho tool\n")
    app_id = app_ids.new()
    agent.create_app({
        "id": app_id, "cmd": "./app/run.sh", "cpus": 0.1, "mem": 32,
        "fetch": [{"uri": f"{base}/app.tgz"}, {"uri": f"{base}/tool", "executable": True}, {"uri": f"{base}/app.tgz", "extract": False, "outputFile": "copy/app.tgz"}],
    })
    task = agent.wait_for_running(app_id, 1)[0]
    sandbox = agent.sandbox(task["id"])
    wait_until(lambda: (sandbox / "out.txt").exists(), timeout=20, what="the fetched script to run")
    assert (sandbox / "out.txt").read_text() == "fetched-and-running\n"
    assert (sandbox / "app" / "config.txt").read_text() == "color=blue\n"
    assert (sandbox / "app.tgz").exists(), "the archive is kept beside what it held"
    assert os.stat(sandbox / "tool").st_mode & 0o777 == 0o755
    assert (sandbox / "copy" / "app.tgz").read_bytes() == (directory / "app.tgz").read_bytes()
    assert sorted(served) == ["/app.tgz", "/app.tgz", "/tool"]


def test_the_older_uris_are_fetched_too(agent, app_ids, artifacts):
    base, directory, _ = artifacts
    (directory / "greeting.txt").write_text("hello\n")
    app_id = app_ids.new()
    agent.create_app({"id": app_id, "cmd": "cat greeting.txt; exec sleep 300", "cpus": 0.1, "mem": 32, "uris": [f"{base}/greeting.txt"]})
    task = agent.wait_for_running(app_id, 1)[0]
    wait_until(lambda: (agent.sandbox(task["id"]) / "stdout").read_text() == "hello\n", timeout=20, what="the fetched file")


def test_a_failed_download_fails_the_instance_saying_why(agent, app_ids, artifacts):
    base, _, _ = artifacts
    app_id = app_ids.new()
    agent.create_app({"id": app_id, "cmd": "sleep 300", "cpus": 0.1, "mem": 32, "fetch": [{"uri": f"{base}/missing.tgz"}],
                      "backoffSeconds": 30})

    def failure():
        return agent.get(f"/v2/apps{app_id}").json()["app"].get("lastTaskFailure")

    last = wait_until(failure, timeout=30, what="the instance to fail")
    assert "missing.tgz" in last["message"] and "404" in last["message"], last


def test_an_output_file_outside_the_sandbox_is_refused(agent, app_ids):
    response = agent.post("/v2/apps", json={"id": app_ids.new(), "cmd": "sleep 300", "fetch": [{"uri": "http://127.0.0.1/x", "outputFile": "../x"}]})
    assert response.status_code == 422, response.text
    assert response.json()["details"][0]["path"] == "/fetch(0)/outputFile"
