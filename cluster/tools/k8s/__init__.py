"""Kubernetes manifests: the RayService's ``serveConfigV2`` generated from the catalog, and an
offline check of the Kustomize overlays in ``k8s/``.

``cluster k8s generate`` writes ``k8s/overlays/<overlay>/serve-config.yaml`` (a patch holding
the Serve config of the overlay's profile); ``--check`` fails on drift. ``cluster k8s validate``
renders overlays with ``kubectl kustomize`` (no API server needed) and checks them: built-in
kinds against Kubernetes' schemas (kubernetes-validate), custom resources against JSON Schemas
made from their CRDs, and what no schema says (GPU requests, the Serve config, worker groups
for every model, the head group, KubeRay's name limits, references to Secrets and labels).

Modules: ``generate`` (the Serve-config patches, drift), ``secret_files`` (the overlays' env
files), ``render`` (kustomize, placeholder secrets), ``schema`` (CRD → JSON Schema, schema
problems), ``manifests`` (safe field access, pod templates), ``resources`` (quantities, Ray
resources), ``checks`` with ``checks_ray`` and ``checks_refs`` (the semantic checks),
``problems`` (``Problem``, ``K8sError``), ``validate`` (render and check a target), ``cli``.
"""

from cluster.tools.k8s.cli import k8s_app

__all__ = ["k8s_app"]
