"""Nobody gets into the local stack who does not belong: every socket its processes listen
on is on loopback, and Ray's APIs refuse a client without the stack's token."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import httpx
import psutil

from cluster.tools.stack import LocalStack

LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}


def listening(processes: list[psutil.Process]) -> list[tuple[str, str, int]]:
    found = []
    for p in processes:
        try:
            conns = p.net_connections(kind="inet")
            name = p.name()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        found += [(name, c.laddr.ip, c.laddr.port) for c in conns
                  if c.status == psutil.CONN_LISTEN]
    return found


def test_every_socket_of_the_stack_is_on_loopback(stack: LocalStack) -> None:
    me = psutil.Process()
    sockets = listening([me, *me.children(recursive=True)])
    names = {name for name, _, _ in sockets}
    # Not vacuous: Ray's GCS and raylet, HAProxy, Redis and the replicas are all there.
    assert {"gcs_server", "raylet", "haproxy", "valkey-server"} <= names, names
    assert any(port == int(stack.base_url.rsplit(":", 1)[1]) for _, _, port in sockets)
    exposed = [s for s in sockets if s[1] not in LOOPBACK]
    assert exposed == [], exposed


def test_the_ray_token_is_the_users_alone(stack: LocalStack) -> None:
    mode = stat.S_IMODE(stack.ray_token_path.stat().st_mode)
    assert mode == 0o600 and len(stack.ray_token_path.read_text()) == 64


def ray_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    code = "import sys; from ray.scripts.scripts import main; sys.argv = sys.argv[1:]; main()"
    return subprocess.run([sys.executable, "-c", code, "ray", *args], env=env,
                          capture_output=True, text=True, timeout=120)


def test_ray_refuses_a_client_without_the_token(stack: LocalStack) -> None:
    bare = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    with_token = bare | stack.ray_client_env()
    # The dashboard's HTTP API (jobs, Serve's REST API) answers 401 without the token.
    assert httpx.get(f"{stack.dashboard_url}/api/jobs/").status_code == 401
    token = stack.ray_token_path.read_text()
    ok = httpx.get(f"{stack.dashboard_url}/api/jobs/",
                   headers={"Authorization": f"Bearer {token}"})
    assert ok.status_code == 200, ok.text
    # A job submission without the token is refused, with it it is accepted.
    submit = ["job", "submit", "--address", stack.dashboard_url, "--no-wait", "--", "true"]
    refused = ray_cli(*submit, env=with_token | {"RAY_AUTH_TOKEN": "not-the-token" * 3})
    assert refused.returncode != 0, refused.stdout + refused.stderr
    accepted = ray_cli(*submit, env=with_token)
    assert accepted.returncode == 0, accepted.stdout + accepted.stderr
    # A Ray client connecting to the GCS without the token cannot join the cluster.
    gcs = stack.gcs_address
    join = ("import ray, sys; ray.init(address=sys.argv[1]); "
            "print(ray.cluster_resources())")
    intruder = subprocess.Popen([sys.executable, "-c", join, gcs], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True,
                                env=with_token | {"RAY_AUTH_TOKEN": "f" * 64})
    try:  # Ray's client retries a refused GCS for a minute: its log says why, then we stop it
        out, err = intruder.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        intruder.kill()
        out, err = intruder.communicate()
    assert "CPU" not in out and "Authentication token is missing or incorrect" in err, err
    member = subprocess.run([sys.executable, "-c", join, gcs], capture_output=True,
                            text=True, timeout=120, env=with_token)
    assert member.returncode == 0 and "CPU" in member.stdout, member.stderr[-2000:]
