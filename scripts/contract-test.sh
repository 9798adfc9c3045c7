#!/usr/bin/env bash
# The HTTP API's OpenAPI document is its contract: starts onrec on its defaults and runs
# schemathesis with every check against /openapi.json; any failure fails the script.
# Usage: scripts/contract-test.sh [ONREC_BINARY] [MAX_EXAMPLES]
set -euo pipefail
cd "$(dirname "$0")/.."
bin=$(realpath "${1:-target/debug/onrec}")
examples=${2:-100}

python3 -m pip install --quiet --disable-pip-version-check "schemathesis==4.32.5"

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
http_port=$(free_port)
grpc_port=$(free_port)
work=$(mktemp -d)
"$bin" serve --http-addr "127.0.0.1:$http_port" --grpc-addr "127.0.0.1:$grpc_port" \
  >"$work/server.log" 2>&1 &
server=$!
trap 'kill "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true; rm -rf "$work"' EXIT

python3 - "$http_port" <<'EOF' || { cat "$work/server.log"; exit 1; }
import sys, time, urllib.request
url = f"http://127.0.0.1:{sys.argv[1]}/readyz"
deadline = time.time() + 300
while time.time() < deadline:
    try:
        if urllib.request.urlopen(url, timeout=2).status == 200:
            sys.exit(0)
    except OSError:
        pass
    time.sleep(0.2)
sys.exit("onrec did not become ready within 300 s")
EOF

# schemathesis keeps its example database in the working directory.
cd "$work"
schemathesis run "http://127.0.0.1:$http_port/openapi.json" \
  --checks all --max-examples "$examples" --seed 1 --no-color
