#!/usr/bin/env bash
# `make demo`: the main job end to end on real data (Fashion-MNIST), local Ray, local storage.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh
FM=/usr/share/datasets/fashion-mnist
if [ ! -f "$FM/train-images-idx3-ubyte.gz" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "== installing Debian's dataset-fashion-mnist"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist
  else
    echo "Fashion-MNIST is missing: run 'sudo apt-get install dataset-fashion-mnist' (Debian/Ubuntu)," >&2
    echo "or pass the folder with its four IDX files: make demo DEMO_ARGS='--source DIR'" >&2
    exit 1
  fi
fi
exec "$VENV/bin/python" -m jobs.demo ${DEMO_ARGS:-} "$@"
