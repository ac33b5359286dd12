#!/usr/bin/env bash
# The HTTP request front (POST /v1/infer) against requests.sock, on the same daemon and workers: closed-loop
# clients, one request in flight each (HTTP/1.1 has one per connection), echo payloads, rounds interleaved.
# Prints a Markdown table (medians of ROUNDS). BUILD_DIR defaults to .build-static/release (make package).
# Usage: scripts/bench-http.sh [ROUNDS=3] [SECONDS=2]
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD_DIR=${BUILD_DIR:-.build-static/release}
ROUNDS=${1:-3}
SECS=${2:-2}
dir=$(mktemp -d)
cat >"$dir/config.toml" <<CONF
[supervisor]
run_dir = "$dir/run"
[http]
listen = "127.0.0.1:0"
[defaults]
kind = "cpu"
command = ["$PWD/$BUILD_DIR/npu-worker"]
inference_probe = { enabled = false }
max_inflight = 64
[[device]]
id = "0"
[[device]]
id = "1"
CONF
"$BUILD_DIR/npu-supervisord" --config "$dir/config.toml" >"$dir/log" 2>&1 &
daemon=$!
trap 'kill $daemon 2>/dev/null; wait $daemon 2>/dev/null; rm -rf "$dir"' EXIT
for _ in $(seq 100); do [ -S "$dir/run/status.sock" ] && grep -q '"state" : "ok"' <(socat - "UNIX-CONNECT:$dir/run/status.sock" 2>/dev/null) && break; sleep 0.1; done
http=$(socat - "UNIX-CONNECT:$dir/run/status.sock" | sed -nE 's/.*"http" : "([^"]+)".*/\1/p')
bench=$BUILD_DIR/npu-bench
echo "| payload | clients | socket req/s | HTTP req/s | HTTP/socket | socket p50/p99 ms | HTTP p50/p99 ms |"
echo "|---|---|---|---|---|---|---|"
for size in 64 4096; do
    for clients in 1 8 64; do
        s=(); h=()
        for _ in $(seq "$ROUNDS"); do
            s+=("$("$bench" load --socket "$dir/run/requests.sock" --clients "$clients" --size "$size" --duration "$SECS" --machine)")
            h+=("$("$bench" http-load --http "$http" --clients "$clients" --size "$size" --duration "$SECS" --machine)")
        done
        python3 - "$size" "$clients" "${s[@]}" -- "${h[@]}" <<'PY'
import json, statistics, sys
size, clients, rest = sys.argv[1], sys.argv[2], sys.argv[3:]
cut = rest.index("--")
sock = [json.loads(x) for x in rest[:cut]]; http = [json.loads(x) for x in rest[cut + 1:]]
for runs in (sock, http):
    for r in runs:
        assert r["never_answered"] == 0 and not r["errors"], r
med = lambda runs, k: statistics.median(r[k] for r in runs)
print("| %s B | %s | %.0f | %.0f | %.2f | %.3f/%.3f | %.3f/%.3f |" % (size, clients, med(sock, "rps"), med(http, "rps"),
      med(http, "rps") / med(sock, "rps"), med(sock, "p50_ms"), med(sock, "p99_ms"), med(http, "p50_ms"), med(http, "p99_ms")))
PY
    done
done
