#!/bin/sh
# Issue 14's capacity sweep on an NVIDIA GPU machine that has a driver and CUDA 13's libraries
# but no Rust and no network (the lent H200). Prepare here, then run there from the
# repository root:
#
#   cargo xtask cuda --bundle target/gpu        # here: binary, 1.5B header, traces
#   sh xtask/gpu-capacity.sh target/gpu         # there: results in $OUT (or ./gpu-results)
#
# The server model is a stand-in: the 1.5B model's header with random weights, made there
# (the 1 GB of real weights cannot travel). A forward pass costs what the real model's does;
# the replayed devices send their recorded frames whatever the verdicts, so the load is the
# real one. DURATION and DEVICES override the sweep; DEVICE=cpu is a dry run on any machine
# (CUDA's libraries are still needed: the binary links them).
set -eu
BUNDLE=${1:?usage: sh xtask/gpu-capacity.sh BUNDLE_DIR}
OUT=${OUT:-gpu-results}
DURATION=${DURATION:-15s}
DEVICES=${DEVICES:-1,2,4,8,16,32,64}
DEVICE=${DEVICE:-cuda}
mkdir -p "$OUT"

# CUDA 13's runtime, cuBLAS and cuRAND, wherever this machine keeps them (PyTorch's wheels, a
# toolkit), and the driver's libcuda.so.1.
found=$(find /opt /usr /root /home -name 'libcublas*.so.13' -o -name libcurand.so.10 \
    -o -name libcudart.so.13 2>/dev/null || true)
libs=
for f in libcublasLt.so.13 libcublas.so.13 libcurand.so.10 libcudart.so.13; do
    p=$(echo "$found" | grep "/$f\$" | head -n 1)
    [ -n "$p" ] || { echo "no $f under /opt /usr /root /home" >&2; exit 1; }
    libs="$libs:$(dirname "$p")"
done
for d in /usr/local/nvidia/lib64 /usr/local/nvidia/lib; do
    [ -d "$d" ] && libs="$libs:$d"
done
export LD_LIBRARY_PATH="${libs#:}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
nproc >>"$OUT/gpu.txt"

U=/tmp/uhlm
python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' \
    "$BUNDLE/uhlm.xz" "$U"
chmod +x "$U"
HEADER=$BUNDLE/qwen-coder-1.5b.header.gguf
LLM=/tmp/qwen-coder-1.5b.stand-in.gguf
"$U" models stand-in "$HEADER" "$LLM"

# The GPU's logits against the CPU's and batched against alone (fails on a non-finite
# logit), then one session and sixteen in lock step.
"$U" bench model --model "$LLM" --device "$DEVICE" --check-device --json \
    --prompt-tokens 128 --decode-tokens 64 >"$OUT/model-batch1.json"
"$U" bench model --model "$LLM" --device "$DEVICE" --json \
    --prompt-tokens 128 --decode-tokens 64 --batch 16 >"$OUT/model-batch16.json"
cat "$OUT"/model-batch*.json

# Both systems, devices swept; the device traces were recorded with the real pair here.
CAPACITY=/tmp/capacity
mkdir -p "$CAPACITY"
cp "$BUNDLE/traces.jsonl" "$CAPACITY/"
"$U" bench capacity --slm "$HEADER" --llm "$LLM" --device "$DEVICE" \
    --devices "$DEVICES" --duration "$DURATION" --out "$CAPACITY" | tee "$OUT/capacity.txt"
cp "$CAPACITY"/capacity.json "$CAPACITY"/*.svg "$OUT/"
