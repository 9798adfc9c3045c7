#!/usr/bin/env bash
# Drain under load: wrk drives POST /v1/recommend on 32 connections while the server gets
# SIGTERM; /readyz is polled every 0.25 s from the signal until the process exits.
# Prints wrk's counts (every response must be 2xx; read errors and timeouts would be
# requests lost after they were accepted) and how long /readyz answered 503 before the
# listener closed. Needs wrk and curl.
# Usage: scripts/drain-check.sh [ONREC_BINARY] [SECONDS_BEFORE_SIGTERM]
set -euo pipefail
bin=$(realpath "${1:-target/release/onrec}")
before=${2:-8}

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
port=$(free_port)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cat >"$work/recommend.lua" <<'EOF'
counter = 0
request = function()
  counter = counter + 1
  local body = string.format('{"user_id": "w%d", "n": 10}', counter % 1000)
  return wrk.format("POST", "/v1/recommend", {["Content-Type"] = "application/json"}, body)
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "responses %d, non-2xx %d, socket errors: connect %d, read %d, write %d, timeout %d\n",
    summary.requests, e.status, e.connect, e.read, e.write, e.timeout))
end
EOF

"$bin" serve --http-addr "127.0.0.1:$port" --grpc-addr "127.0.0.1:$(free_port)" \
  >"$work/server.log" 2>&1 &
server=$!
until curl -sf "127.0.0.1:$port/readyz" >/dev/null; do
  kill -0 "$server" || { cat "$work/server.log"; exit 1; }
  sleep 0.2
done
wrk -t2 -c32 -d"$((before + 12))s" -s "$work/recommend.lua" "http://127.0.0.1:$port" \
  >"$work/wrk.txt" 2>&1 &
load=$!
sleep "$before"
start=$(date +%s.%N)
kill -TERM "$server"
while kill -0 "$server" 2>/dev/null; do
  code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 1 "127.0.0.1:$port/readyz" || true)
  echo "$(date +%s.%N) $code" >>"$work/readyz.txt"
  sleep 0.25
done
wait "$load"
tail -n 1 "$work/wrk.txt"
awk -v t0="$start" '
  $2 == 503 { last503 = $1 - t0; n503++ }
  $2 != 503 && $2 != 200 && !closed { closed = $1 - t0 }
  END { printf "readyz: 503 on %d polls, the last %.2f s after SIGTERM; refused from %.2f s\n", n503, last503, closed }
' "$work/readyz.txt"
grep -E "draining|shutting down|drained" "$work/server.log" | sed 's/^[^ ]* *//'
