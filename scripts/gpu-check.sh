#!/usr/bin/env bash
# Every GPU check in one run, for a machine with an NVIDIA GPU but no Rust
# toolchain (the `device` machine of this project). Build the binary on a
# machine with cargo, then carry it over with the repository:
#
#   cargo build --release -p diffusion-cli --features cuda,wgpu
#   strip -o diffusion-gpu "$CARGO_TARGET_DIR/release/diffusion"   # or target/release/diffusion
#   scripts/gpu-check.sh ./diffusion-gpu "$OUT" [WGPU_TEST_BINARY]
#
# Writes into OUT:
#   nvidia-smi.txt, nvrtc.txt, vulkan.txt  what the machine has;
#   samples/BACKEND-SAMPLER.npy            the shipped model's 81 digits from
#                                          seed 7 with each sampler on cpu,
#                                          cuda and wgpu (compare them with
#                                          scripts/compare-npy.py);
#   bench-cuda.json, bench-wgpu.json       the JSON line of `diffusion bench`;
#   seed-epoch.txt                         one epoch of the seed preset on
#                                          cuda, with its wall time, and the
#                                          run directory it made;
#   cubecl-cache.tgz                       cubecl's compiled kernels and
#                                          autotune results: pass it back
#                                          as CUBECL_CACHE_TGZ=FILE on the
#                                          next run and its cuda commands
#                                          skip most compilation;
#   wgpu-tests.txt                         the wgpu test group on the GPU's
#                                          own Vulkan driver (third argument:
#                                          the `wgpu` test binary, built with
#                                          `cargo test --release -p
#                                          diffusion-cli --features wgpu
#                                          --test wgpu --no-run`).
# Each command runs under a time limit, so one that hangs costs only its own.
set -u
bin=${1:?usage: gpu-check.sh DIFFUSION_BINARY OUT_DIR}
out=${2:?usage: gpu-check.sh DIFFUSION_BINARY OUT_DIR}
mkdir -p "$out"
out=$(cd "$out" && pwd)
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
# Vulkan drivers (ICDs) wgpu can load: the GPU's own, and lavapipe if present.
ls /usr/share/vulkan/icd.d /etc/vulkan/icd.d > "$out/vulkan.txt" 2>&1

limit() { timeout --kill-after=10 "$@"; }
here=$(cd "$(dirname "$0")/.." && pwd)
bin=$(cd "$(dirname "$bin")" && pwd)/$(basename "$bin")

# cuda compiles each kernel with nvrtc when a process first meets it and
# autotunes every matmul and convolution shape: on an H200 the first 100 s
# of a `sample` compiled 234 kernels. cubecl keeps both results on disk
# when its config (cubecl.toml, read from the working directory up) says
# where, so only the first command below pays. A cubecl.toml of the
# user's own is left as it is.
if [ ! -e "$here/cubecl.toml" ]; then
    cat > "$here/cubecl.toml" <<TOML
[compilation]
cache = { file = "$out/.cubecl-cache" }

[autotune]
cache = { file = "$out/.cubecl-cache" }
TOML
    trap 'rm -f "$here/cubecl.toml"' EXIT
    # A cache from an earlier run on the same kind of GPU (its tarball
    # holds one folder, cache/).
    if [ -n "${CUBECL_CACHE_TGZ:-}" ] && [ -f "$CUBECL_CACHE_TGZ" ]; then
        mkdir -p "$out/.cubecl-cache"
        tar xzf "$CUBECL_CACHE_TGZ" -C "$out/.cubecl-cache" --strip-components=1
    fi
fi
cd "$here"

# The same 81 digits on every backend: `sample --seed` draws all its noise
# on the host, so only the backends' arithmetic differs.
samples() {
    mkdir -p "$out/samples"
    for sampler in ddim dpm-solver++ ddpm reference; do
        limit "$2" "$bin" sample --backend "$1" --checkpoint "$here/data/pretrained/mnist" \
            --sampler "$sampler" --steps 20 --seed 7 \
            --out "$out/samples/$1-${sampler//+/p}.png" --npy "$out/samples/$1-${sampler//+/p}.npy" \
            >> "$out/samples/log.txt" 2>&1
        echo "$1 $sampler exit $?" >> "$out/samples/log.txt"
    done
}
bench() {
    # Fewer training repeats than bench's defaults (10 and 20): the device
    # time is short; still medians of 5 and 3, with their spread.
    limit "$2" "$bin" bench --backend "$1" --repeats 5 --warmup 2 --sample-repeats 3 \
        > "$out/bench-$1.txt" 2>&1
    echo "exit $?" >> "$out/bench-$1.txt"
    grep '^{' "$out/bench-$1.txt" | tail -n 1 > "$out/bench-$1.json"
}

# cuda first: it is what this machine is for. Its first command compiles
# most kernels (minutes); the others find them in the cache.
samples cpu 60
samples cuda 300
bench cuda 300

start=$(date +%s%N)
# One device through the same path as --devices N (data-parallel runs with
# several GPUs need a machine that has them).
limit 300 "$bin" train --backend cuda --devices 1 --preset seed --epochs 1 --out "$out/seed-epoch" > "$out/seed-epoch.txt" 2>&1
status=$?
echo "exit $status wall_ms $(( ($(date +%s%N) - start) / 1000000 ))" >> "$out/seed-epoch.txt"
rm -rf "$out/seed-epoch/checkpoints"  # one epoch's weights: not worth carrying back

# wgpu on the GPU's own Vulkan driver, if the machine has one.
samples wgpu 45
bench wgpu 120

if [ -n "${3:-}" ]; then
    # The wgpu test group on this machine's Vulkan driver; the tests run the
    # same binary as above.
    test_bin=$(cd "$(dirname "$3")" && pwd)/$(basename "$3")
    DIFFUSION_BIN="$bin" limit 400 "$test_bin" --include-ignored --nocapture --test-threads 1 \
        > "$out/wgpu-tests.txt" 2>&1
    echo "exit $?" >> "$out/wgpu-tests.txt"
fi

# The cache as one file (the device tool returns few files, none deep).
if [ -d "$out/.cubecl-cache" ]; then
    (cd "$out" && mv .cubecl-cache cache && tar czf cubecl-cache.tgz cache && rm -rf cache)
fi
