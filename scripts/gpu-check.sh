#!/usr/bin/env bash
# The GPU device check. Two halves:
#
#   bash scripts/gpu-check.sh prepare
#       Here, on the build machine (no GPU needed): builds the CUDA binary (cargo build
#       --features cuda, with the toolchain of ../shared/gpu) and fills gpu-carry/ (ignored by
#       git) with what the GPU machine needs: the stripped binary, xz-compressed to fit a carried
#       checkout, ../shared/gpu/run-on-gpu.sh, the peer benchmark and its wheels.
#   bash scripts/gpu-check.sh run [OUT]
#       There, in the carried checkout: parity of the CUDA kernels against the fused CPU
#       kernels, the stack benchmark at batch 256 beside the official xLSTM, and (with
#       FORECASTER=1) the `base` preset's training time. JSON lines go to OUT (default $OUT,
#       else gpu-out/).
#
# `run` takes at most 5 minutes without FORECASTER (each step has a time limit; a failed step
# does not stop the later ones); its exit status is that of the parity check.
set -u
here="$(cd "$(dirname "$0")/.." && pwd)"
carry="$here/gpu-carry"
shared="${SHARED:-$here/../shared}"

prepare() {
    set -e
    # shellcheck disable=SC1091
    source "$shared/gpu/cuda-toolchain.sh"
    # The dev profile: it shares the warm dependencies of `cargo test`, and our crate gets
    # release code generation in it (Cargo.toml); the GPU does the heavy lifting.
    (cd "$here" && cargo build --features cuda --bin xlstm-forecast)
    mkdir -p "$carry"
    # Stripped it is ~100 MB (candle's CUDA kernels included); xz brings it under the 64 MiB a
    # carried checkout may hold.
    strip -o "$carry/xlstm-forecast" "$here/target/debug/xlstm-forecast"
    xz -T0 -6 -f "$carry/xlstm-forecast"
    cp "$shared/gpu/run-on-gpu.sh" "$carry/"
    rm -rf "$carry/peer-bench" && cp -r "$shared/gpu/peer-bench" "$carry/peer-bench"
    [ -d "$carry/wheels" ] || bash "$shared/gpu/peer-bench/fetch-wheels.sh" "$carry/wheels"
    du -sh "$carry"
    echo "carry gpu-carry (ignored by git) and run: bash scripts/gpu-check.sh run"
}

# Keeps the JSON lines of FILE in it and appends the rest (run-on-gpu.sh's host banner) to LOG.
json_only() {
    grep -v '^{' "$1" >> "$2" || true
    grep '^{' "$1" > "$1.json" || true
    mv "$1.json" "$1"
}

run() {
    local out="${1:-${OUT:-$here/gpu-out}}"
    mkdir -p "$out"
    if [ ! -x "$carry/xlstm-forecast" ]; then
        python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' \
            "$carry/xlstm-forecast.xz" "$carry/xlstm-forecast"
        chmod +x "$carry/xlstm-forecast"
    fi
    local bin=(bash "$carry/run-on-gpu.sh" "$carry/xlstm-forecast")
    echo "== parity: CUDA kernels against the fused CPU kernels"
    timeout 60 "${bin[@]}" device-check --device cuda --json > "$out/parity.jsonl" 2> "$out/parity.log"
    local parity=$?
    json_only "$out/parity.jsonl" "$out/parity.log"
    tail -n 3 "$out/parity.log"
    grep -c '"pass":true' "$out/parity.jsonl" | sed 's/^/passed cases: /'
    grep '"pass":false' "$out/parity.jsonl" || true

    echo "== stack benchmark: batch 256, contexts 96/336/720, forward and AdamW training step"
    timeout 90 "${bin[@]}" bench kernels --only stack --device cuda --batch 256 \
        --contexts 96,336,720 --iters 10 --json > "$out/stack.jsonl" 2> "$out/stack.log"
    echo "rc $?"
    json_only "$out/stack.jsonl" "$out/stack.log"
    echo "$(wc -l < "$out/stack.jsonl") cases"

    echo "== peer: the official xLSTM on the same GPU"
    timeout 150 bash "$carry/peer-bench/run.sh" "$carry/wheels" --budget-s 120 \
        > "$out/peer.jsonl" 2> "$out/peer.log"
    echo "rc $?: $(wc -l < "$out/peer.jsonl") lines"
    python3 - "$out" <<'EOF' || true
import json, sys, os
out = sys.argv[1]
def lines(name):
    path = os.path.join(out, name)
    if not os.path.exists(path):
        return []
    return [json.loads(l) for l in open(path) if l.strip().startswith("{")]
ours = {(c["variant"], c["seq_len"], c["mode"]): c["median_ms"] for c in lines("stack.jsonl") if c.get("case") == "stack"}
rows = []
for p in lines("peer.jsonl"):
    variant = next((v for v in ("xLSTM[3:1]", "mLSTM-only", "sLSTM-only") if str(p.get("variant", "")).startswith(v)), None)
    for mode, key in (("forward", "forward_nograd"), ("train_step", "train_step")):
        peer_ms = (p.get(key) or {}).get("median_ms")
        mine = ours.get((variant, p.get("context"), mode))
        if variant and peer_ms and mine:
            rows.append({"variant": variant, "seq_len": p["context"], "mode": mode, "median_ms": mine,
                         "peer_median_ms": peer_ms, "ratio_ours_over_peer": round(mine / peer_ms, 3),
                         "peer_backends": p.get("backends")})
with open(os.path.join(out, "stack_vs_peer.jsonl"), "w") as f:
    for r in rows:
        f.write(json.dumps(r) + "\n")
        print(json.dumps(r))
EOF

    if [ "${FORECASTER:-0}" = 1 ]; then
        echo "== forecaster: base preset, 21 channels, 52,696 rows of 10-minute data, L 336, H 96"
        "${bin[@]}" generate --kind 10min --rows 52696 --channels 21 --seed 1 --csv "$out/weather.csv"
        timeout 240 "${bin[@]}" eval --csv "$out/weather.csv" --lookback 336 --horizon 96 \
            --split 0.7,0.1,0.2 --model xlstm --preset base --device cuda --json \
            > "$out/forecaster.json" 2> "$out/forecaster.log"
        echo "rc $?"
        json_only "$out/forecaster.json" "$out/forecaster.log"
        cat "$out/forecaster.json"
    fi
    return "$parity"
}

case "${1:-}" in
    prepare) prepare ;;
    run) shift; run "$@" ;;
    *) echo "usage: bash scripts/gpu-check.sh prepare | run [OUT]" >&2; exit 2 ;;
esac
