#!/bin/sh
# The container's two processes: llama-server on loopback, then the gateway in front of it.
set -eu
MODEL=${UHLM_MODEL:-/var/lib/uhlm/models/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf}
llama-server -m "$MODEL" --host 127.0.0.1 --port 8080 --parallel "${LLAMA_PARALLEL:-8}" \
    --ctx-size "${LLAMA_CTX:-65536}" --no-webui &
until curl -sf http://127.0.0.1:8080/health >/dev/null; do sleep 1; done
exec uhlm serve --config /etc/uhlm/server.toml --model "$MODEL"
