#!/usr/bin/env bash
# The test suite on CPU (multi-process tests use DeepSpeed with the gloo backend).
set -euo pipefail
cd "$(dirname "$0")/.."
export DS_ACCELERATOR=cpu
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$HOME/.cache/diffumamba/torch_extensions}"
exec python3 -m pytest -q --timeout=600 "$@"
