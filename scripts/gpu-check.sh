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

# The cuda backend loads libcuda (the driver) and libnvrtc at run time. A
# machine without the CUDA toolkit may still have nvrtc from PyTorch's
# wheels (site-packages/nvidia/*/lib): put those folders on the library path.
if ! ldconfig -p 2>/dev/null | grep -q libnvrtc; then
    for py in python3 python; do
        command -v "$py" >/dev/null || continue
        site=$("$py" -c 'import site; print(" ".join(site.getsitepackages()))' 2>/dev/null) || continue
        for d in $site; do
            for lib in "$d"/nvidia/*/lib; do
                ls "$lib"/libnvrtc* >/dev/null 2>&1 && LD_LIBRARY_PATH="$lib:${LD_LIBRARY_PATH:-}"
            done
        done
    done
    export LD_LIBRARY_PATH
fi
# The binary was built for CUDA 13 (CUDARC_CUDA_VERSION=13000 in
# .cargo/config.toml): say which nvrtc the loader will find.
nvrtc=$( (ldconfig -p 2>/dev/null | grep -o '/[^ ]*libnvrtc\.so[.0-9]*'; \
          for d in ${LD_LIBRARY_PATH//:/ }; do ls "$d"/libnvrtc.so* 2>/dev/null; done) | head -n 1)
want=$(sed -n 's/.*CUDARC_CUDA_VERSION *= *"\([0-9]*\)".*/\1/p' "$(dirname "$0")/../.cargo/config.toml" 2>/dev/null)
have=$(basename "${nvrtc:-none}" | sed -n 's/libnvrtc\.so\.\([0-9]*\).*/\1/p')
echo "nvrtc: ${nvrtc:-not found}; CUDA major ${have:-?}; built for CUDARC_CUDA_VERSION=${want:-?}" | tee "$out/nvrtc.txt"
if [ -n "$have" ] && [ -n "$want" ] && [ "$have" != "$(( want / 1000 ))" ]; then
    echo "warning: nvrtc is CUDA $have but the binary expects CUDA $(( want / 1000 ))" | tee -a "$out/nvrtc.txt"
fi
for backend in cuda wgpu; do
    "$bin" bench --backend "$backend" > "$out/bench-$backend.txt" 2>&1
    tail -n 1 "$out/bench-$backend.txt" > "$out/bench-$backend.json"
done
start=$(date +%s%N)
# One device through the same path as --devices N (data-parallel runs with
# several GPUs need a machine that has them).
"$bin" train --backend cuda --devices 1 --preset seed --epochs 1 --out "$out/seed-epoch" > "$out/seed-epoch.txt" 2>&1
status=$?
echo "exit $status wall_ms $(( ($(date +%s%N) - start) / 1000000 ))" >> "$out/seed-epoch.txt"
