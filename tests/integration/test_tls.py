"""The API over HTTPS (--tls-cert/--tls-key) and with client certificates (--tls-client-ca), with
certificates from a test CA (trustme): requests, the Marathon client and the CLI verify the agent,
plain HTTP and unknown clients are refused."""

import subprocess
import time

import pytest
import requests
import trustme
from marathon import MarathonApp, MarathonClient

from support.flotilla import Agent, wait_until


@pytest.fixture(scope="module")
def authority():
    return trustme.CA()


@pytest.fixture
def pki(authority, tmp_path):
    server = authority.issue_cert("127.0.0.1", "localhost")
    client = authority.issue_cert("cli@flotilla.test")
    files = {"ca": tmp_path / "ca.pem", "cert": tmp_path / "server.pem", "key": tmp_path / "server.key",
             "client_cert": tmp_path / "client.pem", "client_key": tmp_path / "client.key"}
    authority.cert_pem.write_to_path(str(files["ca"]))
    server.private_key_pem.write_to_path(str(files["key"]))
    with open(files["cert"], "wb") as chain:
        for blob in server.cert_chain_pems:
            chain.write(blob.bytes())
    client.private_key_pem.write_to_path(str(files["client_key"]))
    with open(files["client_cert"], "wb") as chain:
        for blob in client.cert_chain_pems:
            chain.write(blob.bytes())
    return files


def start_tls_agent(binary, directory, pki, client_certificates=False):
    """An agent serving HTTPS with the test CA's certificate (and requiring client certificates)."""
    arguments = ["--tls-cert", str(pki["cert"]), "--tls-key", str(pki["key"])]
    cert = None
    if client_certificates:
        arguments += ["--tls-client-ca", str(pki["ca"])]
        cert = (str(pki["client_cert"]), str(pki["client_key"]))
    agent = Agent(binary, directory, extra_args=arguments)
    agent.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert agent.process.poll() is None, agent.log_tail()
        try:
            if requests.get(f"https://127.0.0.1:{agent.api_port}/ping", verify=str(pki["ca"]), cert=cert, timeout=2).status_code == 200:
                return agent
        except requests.exceptions.RequestException:
            time.sleep(0.1)
    agent.stop()
    raise AssertionError("the HTTPS agent did not answer /ping\n" + agent.log_tail())


def test_the_api_over_https(binary, pki, tmp_path):
    agent = start_tls_agent(binary, tmp_path / "agent", pki)
    base = f"https://127.0.0.1:{agent.api_port}"
    try:
        assert "version" in requests.get(f"{base}/v2/info", verify=str(pki["ca"]), timeout=5).json()
        # A client that does not trust the CA refuses the agent; plain HTTP gets no answer.
        with pytest.raises(requests.exceptions.SSLError):
            requests.get(f"{base}/ping", timeout=5)
        with pytest.raises(requests.exceptions.ConnectionError):
            requests.get(f"http://127.0.0.1:{agent.api_port}/ping", timeout=5)
        # The Marathon client, trusting the test CA.
        client = MarathonClient(base, timeout=10, verify=str(pki["ca"]))
        client.create_app("/tls/web", MarathonApp(cmd="sleep 300", instances=1, cpus=0.05, mem=16))
        assert client.get_app("/tls/web").instances == 1
        # The CLI, with --ca-cert (or FLOTILLA_CACERT).
        listed = subprocess.run([str(binary), "apps", "--api", base, "--ca-cert", str(pki["ca"]), "--json"], capture_output=True, text=True, timeout=30)
        assert listed.returncode == 0, listed.stderr
        assert "/tls/web" in listed.stdout
        untrusted = subprocess.run([str(binary), "apps", "--api", base], capture_output=True, text=True, timeout=30)
        assert untrusted.returncode != 0 and "cannot reach the agent" in untrusted.stderr
        client.delete_app("/tls/web", force=True)
    finally:
        agent.stop()


def test_mutual_tls_refuses_clients_without_a_certificate(binary, pki, tmp_path):
    cert = (str(pki["client_cert"]), str(pki["client_key"]))
    agent = start_tls_agent(binary, tmp_path / "agent", pki, client_certificates=True)
    base = f"https://127.0.0.1:{agent.api_port}"
    try:
        assert requests.get(f"{base}/ping", verify=str(pki["ca"]), cert=cert, timeout=5).text.strip() == "pong"
        with pytest.raises((requests.exceptions.SSLError, requests.exceptions.ConnectionError)):
            requests.get(f"{base}/ping", verify=str(pki["ca"]), timeout=5)
        # A certificate from another CA is refused too.
        stranger = trustme.CA().issue_cert("intruder@example.test")
        stranger_cert, stranger_key = tmp_path / "stranger.pem", tmp_path / "stranger.key"
        stranger.cert_chain_pems[0].write_to_path(str(stranger_cert))
        stranger.private_key_pem.write_to_path(str(stranger_key))
        with pytest.raises((requests.exceptions.SSLError, requests.exceptions.ConnectionError)):
            requests.get(f"{base}/ping", verify=str(pki["ca"]), cert=(str(stranger_cert), str(stranger_key)), timeout=5)
        listed = subprocess.run(
            [str(binary), "apps", "--api", base, "--ca-cert", str(pki["ca"]), "--client-cert", cert[0], "--client-key", cert[1], "--json"],
            capture_output=True, text=True, timeout=30)
        assert listed.returncode == 0, listed.stderr
    finally:
        agent.stop()


def test_bad_tls_files_stop_the_agent_with_a_clear_error(binary, pki, tmp_path):
    missing = subprocess.run(
        [str(binary), "agent", "--data-dir", str(tmp_path / "d"), "--api-port", "0", "--tls-cert", str(tmp_path / "nope.pem"), "--tls-key", str(pki["key"])],
        capture_output=True, text=True, timeout=60)
    assert missing.returncode != 0 and "cannot read the TLS certificate" in missing.stdout + missing.stderr
    half = subprocess.run([str(binary), "agent", "--data-dir", str(tmp_path / "d"), "--tls-cert", str(pki["cert"])], capture_output=True, text=True, timeout=30)
    assert half.returncode != 0 and "--tls-cert and --tls-key go together" in half.stderr


def test_agents_of_a_cluster_speak_mutual_tls_to_each_other(binary, authority, tmp_path, etcd):
    """Two agents on etcd, each serving HTTPS that requires client certificates: a write sent to
    the follower is forwarded to the leader, and an instance's log is relayed from its node, over
    TLS that each side verifies (the peers present their own certificates; --tls-peer-ca)."""
    files = {"ca": tmp_path / "ca.pem", "cert": tmp_path / "agents.pem", "key": tmp_path / "agents.key",
             "client_cert": tmp_path / "client.pem", "client_key": tmp_path / "client.key"}
    authority.cert_pem.write_to_path(str(files["ca"]))
    agents_cert = authority.issue_cert("127.0.0.2", "127.0.0.3")
    agents_cert.private_key_pem.write_to_path(str(files["key"]))
    with open(files["cert"], "wb") as chain:
        for blob in agents_cert.cert_chain_pems:
            chain.write(blob.bytes())
    client = authority.issue_cert("operator@flotilla.test")
    client.private_key_pem.write_to_path(str(files["client_key"]))
    client.cert_chain_pems[0].write_to_path(str(files["client_cert"]))
    cert = (str(files["client_cert"]), str(files["client_key"]))
    tls = ["--tls-cert", str(files["cert"]), "--tls-key", str(files["key"]), "--tls-client-ca", str(files["ca"]),
           "--tls-peer-ca", str(files["ca"]), "--store", etcd.store_url, "--server"]
    agents = [Agent(binary, tmp_path / f"agent{n}", bind=f"127.0.0.{n}", node_name=f"node-{n}", extra_args=tls) for n in (2, 3)]

    def get(agent, path):
        return requests.get(f"https://{agent.bind}:{agent.api_port}{path}", verify=str(files["ca"]), cert=cert, timeout=10)

    try:
        for agent in agents:
            agent.start()
        for agent in agents:
            def up(agent=agent):
                assert agent.process.poll() is None, agent.log_tail()
                try:
                    return get(agent, "/ping").status_code == 200
                except requests.exceptions.RequestException:
                    return False
            wait_until(up, timeout=60, what=f"{agent.node_name} answering over HTTPS")

        def leader():
            named = {get(agent, "/v2/leader").json().get("leader") for agent in agents}
            return named.pop() if len(named) == 1 and None not in named else None

        leading = wait_until(leader, timeout=30, what="one leader")
        follower = next(agent for agent in agents if f"{agent.bind}:{agent.api_port}" != leading)
        base = f"https://{follower.bind}:{follower.api_port}"
        # A write to the follower is forwarded to the leader over mutual TLS.
        created = requests.post(f"{base}/v2/apps", verify=str(files["ca"]), cert=cert, timeout=20, json={
            "id": "/tls/peers", "cmd": "echo hello-from-$HOST >&2; exec sleep 300", "instances": 2, "cpus": 0.05, "mem": 16,
            "constraints": [["hostname", "UNIQUE"]]})
        assert created.status_code == 201, created.text

        def spread():
            tasks = get(follower, "/v2/apps/tls/peers/tasks").json()["tasks"]
            return tasks if len(tasks) == 2 and {task["host"] for task in tasks} == {"127.0.0.2", "127.0.0.3"} else None

        tasks = wait_until(spread, timeout=30, what="an instance on each node")
        # The log of an instance on the other node, asked of each agent, is relayed over TLS.
        for agent in agents:
            (remote,) = [task for task in tasks if task["host"] != agent.bind]

            def relayed(agent=agent, remote=remote):
                answer = get(agent, f"/flotilla/v1/logs/{remote['id']}?stream=stderr&lines=10")
                assert answer.status_code == 200, f"{answer.status_code}: {answer.text}"
                return f"hello-from-{remote['host']}" in answer.text

            wait_until(relayed, timeout=20, what=f"the log of {remote['id']} through {agent.node_name}")
        requests.delete(f"{base}/v2/apps/tls/peers?force=true", verify=str(files["ca"]), cert=cert, timeout=20)
    finally:
        for agent in agents:
            agent.stop()
