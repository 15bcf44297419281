#!/usr/bin/env bash
# A real client against the real binary: trains a tiny checkpoint for a few
# steps, starts `dynsparse serve` on a free loopback port, waits for /health,
# then checks a streaming completion with `curl -N` (SSE chunks ending in
# `data: [DONE]`), a non-streaming one (JSON with usage, checked by python3),
# /v1/models and /metrics, and the `openai` Python package when it is
# importable (said plainly when it is not). Stops the server; exits non-zero
# on any failure. Bounded: every step runs under `timeout`.
#
# Usage: scripts/serve-client.sh [path/to/dynsparse]   (default: target/release, else target/debug)
set -euo pipefail
cd "$(dirname "$0")/.."
BIN="${1:-}"
if [ -z "$BIN" ]; then
  if [ -x target/release/dynsparse ]; then BIN=target/release/dynsparse; else BIN=target/debug/dynsparse; fi
fi
[ -x "$BIN" ] || { echo "serve-client: no binary at $BIN (cargo build first)"; exit 1; }
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-/tmp}"
WORK="$(mktemp -d)"
SERVER_PID=""
cleanup() {
  if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
    kill -INT "$SERVER_PID" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$SERVER_PID" 2>/dev/null || true
  fi
  rm -rf "$WORK"
}
trap cleanup EXIT
fail() { echo "serve-client: FAIL: $*"; [ -f "$WORK/server.log" ] && sed 's/^/  server: /' "$WORK/server.log"; exit 1; }

echo "serve-client: training a tiny checkpoint"
timeout 120 "$BIN" --backend cpu train --out "$WORK/run" --steps 3 --layers 1 --d-model 32 --heads 2 --kv-heads 1 \
  --seq 64 --batch 2 --context 128 --eval-windows 2 --eval-every 1000 >"$WORK/train.log" 2>&1 \
  || { cat "$WORK/train.log"; fail "training the checkpoint"; }
CK="$WORK/run/checkpoint.safetensors"
[ -f "$CK" ] || fail "no checkpoint at $CK"

# A free port: bind port 0, read it, release it (the server binds it right after).
PORT="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()')"
URL="http://127.0.0.1:$PORT"
RUST_LOG=info "$BIN" --backend cpu serve --checkpoint "$CK" --port "$PORT" --max-batch 8 >"$WORK/server.log" 2>&1 &
SERVER_PID=$!
for _ in $(seq 100); do
  curl -sf "$URL/health" >/dev/null 2>&1 && break
  kill -0 "$SERVER_PID" 2>/dev/null || fail "the server exited"
  sleep 0.1
done
curl -sf "$URL/health" >/dev/null || fail "no /health within 10 s"
grep -q "listening on http://127.0.0.1:$PORT" "$WORK/server.log" || fail "the server did not log its URL"
echo "serve-client: server up at $URL"

echo "serve-client: streaming (curl -N)"
timeout 30 curl -sfN "$URL/v1/completions" -H 'Content-Type: application/json' \
  -d '{"model":"checkpoint","prompt":"key ","max_tokens":8,"temperature":0,"stream":true}' >"$WORK/stream.txt" \
  || fail "streaming request"
[ "$(tail -n 2 "$WORK/stream.txt" | head -n 1)" = "data: [DONE]" ] || { cat "$WORK/stream.txt"; fail "the stream does not end with data: [DONE]"; }
[ "$(grep -c '^data: {' "$WORK/stream.txt")" -eq 8 ] || { cat "$WORK/stream.txt"; fail "expected 8 token chunks"; }
grep -q '"finish_reason":"length"' "$WORK/stream.txt" || fail "no finish_reason in the stream"

echo "serve-client: non-streaming"
timeout 30 curl -sf "$URL/v1/completions" -H 'Content-Type: application/json' \
  -d '{"prompt":["key ","value "],"max_tokens":5,"temperature":0}' >"$WORK/full.json" || fail "non-streaming request"
python3 - "$WORK/full.json" "$WORK/stream.txt" <<'PY' || fail "non-streaming response"
import json, sys
r = json.load(open(sys.argv[1]))
assert r["object"] == "text_completion", r
assert [c["index"] for c in r["choices"]] == [0, 1], r
assert all(c["finish_reason"] == "length" for c in r["choices"]), r
assert r["usage"] == {"prompt_tokens": 10, "completion_tokens": 10, "total_tokens": 20}, r
# Greedy: the first 5 streamed tokens of "key " are this choice's text.
chunks = [json.loads(l[6:]) for l in open(sys.argv[2]) if l.startswith("data: {")]
assert "".join(c["choices"][0]["text"] for c in chunks[:5]) == r["choices"][0]["text"], (chunks, r)
PY
code="$(curl -s -o "$WORK/err.json" -w '%{http_code}' "$URL/v1/completions" -d '{"prompt":"a","max_tokens":0}')"
[ "$code" = 400 ] || fail "max_tokens 0 answered $code"
python3 -c 'import json,sys; e=json.load(open(sys.argv[1]))["error"]; assert e["param"]=="max_tokens", e' "$WORK/err.json" \
  || fail "error body"
curl -sf "$URL/v1/models" | python3 -c 'import json,sys; assert json.load(sys.stdin)["data"][0]["id"]=="checkpoint"' \
  || fail "/v1/models"
curl -sf "$URL/metrics" >"$WORK/metrics.txt" || fail "/metrics"
grep -q '^dynsparse_generation_tokens_total 18$' "$WORK/metrics.txt" || fail "/metrics does not count 18 generated tokens"
grep -q '^dynsparse_kv_pages_used 0$' "$WORK/metrics.txt" || fail "KV pages still held after the requests"

if python3 -c 'import openai' 2>/dev/null; then
  echo "serve-client: the openai package"
  timeout 60 python3 - "$URL" <<'PY' || fail "openai client"
import sys, openai
c = openai.OpenAI(base_url=sys.argv[1] + "/v1", api_key="none")
r = c.completions.create(model="checkpoint", prompt="key ", max_tokens=6, temperature=0)
assert r.usage.completion_tokens == 6 and r.choices[0].finish_reason == "length", r
text = "".join(ch.choices[0].text for ch in c.completions.create(model="checkpoint", prompt="key ", max_tokens=6, temperature=0, stream=True))
assert text == r.choices[0].text, (text, r)
try:
    c.completions.create(model="checkpoint", prompt="key ", max_tokens=0)
    raise SystemExit("max_tokens=0 was accepted")
except openai.BadRequestError:
    pass
print("openai client: ok")
PY
else
  echo "serve-client: SKIPPED the openai package check: 'import openai' fails here (pip install openai to run it)"
fi

kill -INT "$SERVER_PID"
for _ in $(seq 50); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.1; done
if kill -0 "$SERVER_PID" 2>/dev/null; then fail "the server did not stop within 5 s of Ctrl-C"; fi
wait "$SERVER_PID" || fail "the server exited non-zero after Ctrl-C"
SERVER_PID=""
echo "serve-client: ok"
