#!/usr/bin/env bash
# Download the pinned pure-Python wheels of bench/gpu_wheels.txt into a folder (default: .whl), to be carried
# to a GPU box without network and installed there as bench/README.md says. Usage: prepare_gpu_wheels.sh [DIR]
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
dest="${1:-.whl}"
mkdir -p "$dest"
python3 -m pip download --quiet --no-deps --only-binary :all: --dest "$dest" -r "$here/gpu_wheels.txt"
# a compiled wheel would install for one Python and platform only: the list must stay pure-Python
compiled=$(find "$dest" -name '*.whl' ! -name '*-none-any.whl' | tr '\n' ' ')
if [ -n "$compiled" ]; then
  echo "error: not pure-Python: $compiled; pin a py3-none-any release in bench/gpu_wheels.txt." >&2
  exit 2
fi
ls "$dest"
