"""Keep the local stack's Serve ports on 127.0.0.1: run in every Ray worker process of the
stack (``worker_process_setup_hook``), before Serve starts a server there.

Ray 2.60 hard-codes two wildcard binds that no option changes: the replicas'
inter-deployment gRPC server (``[::]:0``, the transport RAY_SERVE_THROUGHPUT_OPTIMIZED turns
on; it answers handle calls, so anyone reaching it could call a model past the ingress),
and HAProxy's stats and Prometheus frontends (``bind *:``), with its admin socket at mode 666.
This rewrites exactly those, and fails loudly if Ray's code no longer has them (the
integration test of the listening sockets then says what changed). On Kubernetes the pods'
network policies close these ports instead (k8s/base/networkpolicies.yaml).
"""

from __future__ import annotations

from typing import Any

# (text in HAProxy's config template, its loopback replacement)
HAPROXY_BINDS = (
    ("bind :{{ config.metrics_port }}", "bind 127.0.0.1:{{ config.metrics_port }}"),
    ("bind *:{{ config.stats_port }}", "bind 127.0.0.1:{{ config.stats_port }}"),
    ("mode 666 level admin", "mode 600 level admin"),
)
WILDCARD = "[::]:"


def bind_to_loopback() -> None:
    _replica_grpc_on_loopback()
    _haproxy_on_loopback()


def _replica_grpc_on_loopback() -> None:
    from ray.serve._private import replica

    bind = replica.add_port_to_grpc_server
    if getattr(bind, "loopback", False):
        return

    def on_loopback(server: Any, address: str) -> int:
        if address.startswith(WILDCARD):
            address = "127.0.0.1:" + address[len(WILDCARD):]
        port: int = bind(server, address)
        return port

    on_loopback.loopback = True  # type: ignore[attr-defined]
    replica.add_port_to_grpc_server = on_loopback


def _haproxy_on_loopback() -> None:
    from ray.serve._private import haproxy

    template = haproxy.HAPROXY_CONFIG_TEMPLATE
    for wild, local in HAPROXY_BINDS:
        if wild not in template and local not in template:
            raise RuntimeError(f"Ray's HAProxy template no longer has {wild!r}: see "
                               f"cluster/tools/loopback.py")
        template = template.replace(wild, local)
    haproxy.HAPROXY_CONFIG_TEMPLATE = template
