#!/usr/bin/env bash
# Every GPU check of the speed work in one run, for a machine with an NVIDIA
# GPU but no Rust toolchain (the `device` machine of this project). Build the
# binary on a machine with cargo, then carry it over with the repository:
#
#   cargo build --release -p diffusion-cli --features cuda,wgpu
#   strip -o diffusion-gpu "$CARGO_TARGET_DIR/release/diffusion"   # or target/release/diffusion
#   scripts/gpu-check.sh ./diffusion-gpu "$OUT"
#
# Writes into OUT: nvidia-smi.txt, bench-cuda.json, bench-wgpu.json (the
# JSON line of `diffusion bench`), seed-epoch.txt (one epoch of the seed
# preset on cuda, with its wall time) and the run directory it made.
set -u
bin=${1:?usage: gpu-check.sh DIFFUSION_BINARY OUT_DIR}
out=${2:?usage: gpu-check.sh DIFFUSION_BINARY OUT_DIR}
mkdir -p "$out"
nvidia-smi > "$out/nvidia-smi.txt" 2>&1
for backend in cuda wgpu; do
    "$bin" bench --backend "$backend" > "$out/bench-$backend.txt" 2>&1
    tail -n 1 "$out/bench-$backend.txt" > "$out/bench-$backend.json"
done
start=$(date +%s%N)
"$bin" train --backend cuda --preset seed --epochs 1 --out "$out/seed-epoch" > "$out/seed-epoch.txt" 2>&1
status=$?
echo "exit $status wall_ms $(( ($(date +%s%N) - start) / 1000000 ))" >> "$out/seed-epoch.txt"
