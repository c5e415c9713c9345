#!/usr/bin/env python3
"""Largest absolute difference between .npy files of f32 samples.

    scripts/compare-npy.py REFERENCE.npy OTHER.npy [OTHER.npy ...]

Prints, for each OTHER, the max |a - b| against REFERENCE and the count of
pixels that differ by more than 0.1 (a visible change in a [-1, 1] image).
Standard library only: gpu-check.sh's machine may lack numpy.
"""
import ast
import struct
import sys


def read(path):
    with open(path, "rb") as f:
        data = f.read()
    if data[:6] != b"\x93NUMPY":
        sys.exit(f"{path}: not a .npy file")
    major = data[6]
    if major == 1:
        (hlen,) = struct.unpack("<H", data[8:10])
        start = 10
    else:
        (hlen,) = struct.unpack("<I", data[8:12])
        start = 12
    header = ast.literal_eval(data[start : start + hlen].decode("latin1"))
    if header["descr"] != "<f4" or header["fortran_order"]:
        sys.exit(f"{path}: want little-endian f32 in C order, got {header}")
    body = data[start + hlen :]
    count = len(body) // 4
    return header["shape"], struct.unpack(f"<{count}f", body)


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__.strip())
    ref_shape, ref = read(sys.argv[1])
    for path in sys.argv[2:]:
        shape, values = read(path)
        if shape != ref_shape:
            print(f"{path}: shape {shape} != {ref_shape}")
            continue
        diffs = [abs(a - b) for a, b in zip(ref, values)]
        print(
            f"{path}: max |diff| {max(diffs):.3g}, "
            f"{sum(d > 0.1 for d in diffs)} of {len(diffs)} pixels differ by > 0.1"
        )


if __name__ == "__main__":
    main()
