#!/usr/bin/env python3
"""Compares the f32 tensors of two safetensors files written by rex: for each tensor the relative
difference ||a - b|| / ||b||; prints the largest (and the whole model's) and exits 1 when the
largest exceeds the bound. A bound of 0 asks for the same bytes (so +0 and -0 differ).
Usage: compare_models.py A.safetensors B.safetensors BOUND"""
import array
import json
import struct
import sys


def tensors(path):
    with open(path, "rb") as f:
        data = f.read()
    (size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + size])
    body = data[8 + size :]
    out = {}
    for name, info in header.items():
        if name == "__metadata__" or info["dtype"] != "F32":
            continue
        begin, end = info["data_offsets"]
        values = array.array("f")
        values.frombytes(body[begin:end])
        if sys.byteorder != "little":
            values.byteswap()
        out[name] = values
    return out


def main():
    a, b, bound = tensors(sys.argv[1]), tensors(sys.argv[2]), float(sys.argv[3])
    if sorted(a) != sorted(b):
        print(f"the files hold different tensors: {sorted(set(a) ^ set(b))[:5]}")
        return 1
    worst, worst_name, diff_sq, norm_sq = 0.0, "", 0.0, 0.0
    for name in sorted(a):
        d = sum((x - y) ** 2 for x, y in zip(a[name], b[name]))
        n = sum(y * y for y in b[name])
        diff_sq, norm_sq = diff_sq + d, norm_sq + n
        relative = (d / n) ** 0.5 if n > 0 else d**0.5
        if relative >= worst:
            worst, worst_name = relative, name
    print(f"largest relative difference {worst:.3g} ({worst_name}); whole model {(diff_sq / norm_sq) ** 0.5:.3g}")
    if bound == 0:
        differing = [name for name in sorted(a) if a[name].tobytes() != b[name].tobytes()]
        print(f"{len(differing)} of {len(a)} tensors differ in their bytes {differing[:3]}")
        return 1 if differing else 0
    return 0 if worst <= bound else 1


if __name__ == "__main__":
    sys.exit(main())
