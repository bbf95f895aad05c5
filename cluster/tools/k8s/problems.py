"""What a check reports: a ``Problem`` per finding (exit code 1), ``K8sError`` when the check
cannot run at all (exit code 2)."""

from __future__ import annotations

from dataclasses import dataclass


class K8sError(RuntimeError):
    """A tool, file or schema needed for the check is missing or broken (exit code 2)."""


@dataclass(frozen=True)
class Problem:
    source: str  # the overlay or file
    resource: str  # Kind/name
    check: str  # a short code, e.g. "gpu-request-limit"
    message: str

    def __str__(self) -> str:
        return f"{self.source}: {self.resource}: [{self.check}] {self.message}"
