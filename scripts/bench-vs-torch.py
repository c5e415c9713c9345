#!/usr/bin/env python3
"""This project's CPU bench beside the PyTorch reference's, in alternating pairs.

    python3 scripts/bench-vs-torch.py --diffusion target/release/diffusion \\
        --python .venv/bin/python [--pairs 3] [--out bench-pairs] [--isa avx2]

Runs `diffusion bench --backend cpu --skip-1000` and
`shared/bench/torch_ref/bench.py --threads N --sdpa` one after the other,
PAIRS times (ours first in each pair), so both sides see the same machine
drift. Each run's JSON goes to OUT; then one table: per row the median over
the pairs of each side's median, the ratio of each pair (ours / PyTorch in
speed), and each side's spread (max/min of the repeats inside one run, the
largest over the pairs). Needs a venv with `torch` and `numpy`. Prints the
CPU (model name, family, model, flags) the numbers belong to.

`--isa avx2` holds both sides to AVX2 + FMA on a CPU with AVX-512, as a
stand-in for a CPU without it: ours with `DIFFUSION_SIMD=avx2` (a binary
built with `--no-default-features --features cpu`, so that gemm's AVX-512
kernels are left out too; checked from its JSON), PyTorch with
`ATEN_CPU_CAPABILITY=avx2`, `ONEDNN_MAX_CPU_ISA=AVX2` and
`MKL_ENABLE_INSTRUCTIONS=AVX2`. The same core still runs both, so this
checks the AVX2 code, not another CPU's caches and ports.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent
TORCH_REF = HERE.parent / "shared" / "bench" / "torch_ref"

# What `--isa avx2` sets (ours, PyTorch).
AVX2_ENV = (
    {"DIFFUSION_SIMD": "avx2"},
    {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
)

# (row, ours' key in `detail`, PyTorch's key in `detail`, batch or None for seconds)
ROWS = [
    ("train b128 img/s", "train_b128_s", "train_b128_s", 128),
    ("train b32 img/s", "train_b32_s", "train_b32_s", 32),
    ("sample 81x35 s", "sample_81x35_s", "sample_81x35_s", None),
]


def last_json_line(text: str, what: str) -> dict:
    for line in reversed(text.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    sys.exit(f"{what}: no JSON line in its output; its output ends with:\n{text[-2000:]}")


def run(cmd: list, cwd: Path, what: str, env: dict) -> dict:
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env={**os.environ, **env})
    if done.returncode != 0:
        sys.exit(f"{what} exited with {done.returncode}: {done.stderr.strip()[-2000:]}")
    return last_json_line(done.stdout, what)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--diffusion", required=True, help="the release `diffusion` binary")
    ap.add_argument("--python", required=True, help="a python with torch and numpy")
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--torch-ref", default=str(TORCH_REF), help="folder of bench.py and model.py")
    ap.add_argument("--out", default="bench-pairs", help="folder for each run's JSON")
    ap.add_argument("--isa", choices=["native", "avx2"], default="native",
                    help="avx2: hold both sides to AVX2 + FMA (see the top of this file)")
    args = ap.parse_args()
    diffusion = Path(args.diffusion).resolve()
    if not diffusion.is_file():
        sys.exit(f"--diffusion {args.diffusion}: no such file; build it with "
                 "`cargo build --release -p diffusion-cli`")
    torch_ref = Path(args.torch_ref)
    if not (torch_ref / "bench.py").is_file():
        sys.exit(f"--torch-ref {torch_ref}: no bench.py there")
    if args.pairs < 1:
        sys.exit("--pairs must be at least 1")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ours_env, torch_env = AVX2_ENV if args.isa == "avx2" else ({}, {})
    torch_isa = subprocess.run(
        [args.python, "-c", "import torch; print(torch.backends.cpu.get_cpu_capability())"],
        capture_output=True, text=True, env={**os.environ, **torch_env}).stdout.strip()

    ours, theirs = [], []
    for i in range(1, args.pairs + 1):
        print(f"pair {i} of {args.pairs}: ours ...", file=sys.stderr, flush=True)
        o = run([str(diffusion), "bench", "--backend", "cpu", "--skip-1000"], HERE, "diffusion bench", ours_env)
        simd = o.get("simd") or {}
        if args.isa == "avx2" and simd != {"kernels": "avx2", "gemm": "avx2"}:
            sys.exit(f"--isa avx2: {diffusion} ran with {simd} (our kernels, gemm); build it with "
                     "`cargo build --release -p diffusion-cli --no-default-features --features cpu`")
        print(f"pair {i} of {args.pairs}: PyTorch ...", file=sys.stderr, flush=True)
        t = run([args.python, "bench.py", "--threads", str(args.threads), "--sdpa"], torch_ref, "bench.py", torch_env)
        (out / f"ours-{i}.json").write_text(json.dumps(o) + "\n")
        (out / f"torch-{i}.json").write_text(json.dumps(t) + "\n")
        ours.append(o)
        theirs.append(t)

    cpu = ours[0].get("cpu") or {}
    print(f"cpu: {cpu.get('model_name')} (family {cpu.get('family')}, model {cpu.get('model')}; "
          f"{' '.join(cpu.get('flags', []))}), {ours[0]['threads']} threads; "
          f"PyTorch {theirs[0]['torch_version']} SDPA; {args.pairs} alternating pairs")
    simd = ours[0].get("simd") or {}
    print(f"vector instructions: ours {simd.get('kernels')} (kernels) / {simd.get('gemm')} (gemm), "
          f"PyTorch {torch_isa or 'unknown'} (ATen)")
    print(f"| | ours | PyTorch SDPA | ratio per pair | ours' spread | PyTorch's spread |")
    print("|---|---|---|---|---|---|")
    for name, ok, tk, batch in ROWS:
        o_med = [r["detail"][ok]["median"] for r in ours if r["detail"].get(ok)]
        t_med = [r["detail"][tk]["median"] for r in theirs]
        if len(o_med) != len(t_med):
            continue
        # Speed ratio: > 1 means this project is faster.
        ratios = [t / o for o, t in zip(o_med, t_med)]
        show = (lambda s: f"{batch / s:.1f}") if batch else (lambda s: f"{s:.2f}")
        o_spread = max(r["detail"][ok]["max"] / r["detail"][ok]["min"] for r in ours)
        t_spread = max(r["detail"][tk]["max"] / r["detail"][tk]["min"] for r in theirs)
        print(f"| {name} | {show(statistics.median(o_med))} | {show(statistics.median(t_med))} "
              f"| {' / '.join(f'{r:.2f}x' for r in ratios)} | {o_spread:.2f}x | {t_spread:.2f}x |")


if __name__ == "__main__":
    main()
