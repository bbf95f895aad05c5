"""Operator tools: the ``cluster`` CLI, ``cluster up`` and the local stack, a local Redis
server, the built-in models, and the Kubernetes manifests' generator and validator."""
