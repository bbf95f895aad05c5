"""The source checkout, for the tools that read or write it (the Kubernetes manifests)."""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
