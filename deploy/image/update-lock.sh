#!/bin/sh
# Regenerates deploy/image/requirements.txt, the image's dependencies pinned with the hashes of every
# published wheel (so one lock serves amd64 and arm64), from pyproject.toml's base dependencies.
# Run it with Python 3.11 (the image's) after changing dependencies; it needs PyPI.
set -eu

root=$(cd "$(dirname "$0")/../.." && pwd)
python=${PYTHON:-python3.11}
venv=$(mktemp -d)
trap 'rm -rf "$venv"' EXIT

"$python" -m venv "$venv"
"$venv/bin/pip" install --quiet pip-tools==7.6.2
cd "$root"
"$venv/bin/pip-compile" --quiet --generate-hashes --strip-extras --allow-unsafe --no-emit-index-url \
    --output-file deploy/image/requirements.txt pyproject.toml
echo "wrote deploy/image/requirements.txt"
