#!/usr/bin/env python3
"""The data-parallel scaling model of docs/distributed.md: bytes all-reduced per step for a
config, the time of a ring all-reduce at a given link speed, and the efficiency that leaves for 2
to 64 ranks (weak scaling: every rank keeps its share of 6 sequences, so its compute per step stays
the measured step time). Prints markdown tables.

  bytes per step  S = 4 (parameters + parameter tensors)   (f32 gradients + one flag per tensor)
  ring all-reduce C(p) = 2 (p - 1) / p * S / bandwidth + 2 (p - 1) * latency
  efficiency      no overlap: T / (T + C);  overlapped with backward (share b of T):
                  T / (T + max(h C, C - b T))
where h is the share of the reduction that overlap cannot hide (the last bucket holds the first
layers, final only when backward ends), taken from the one-machine measurement: h = exposed
communication with overlap / one blocking all-reduce of everything.

usage: scripts/scaling_model.py [--step-ms 43.3] [--backward-share 0.6] [--latency-us 5]
       [--measured-allreduce-ms 3.02] [--measured-exposed-ms 0.87]
       (the measured figures: 2 ranks on one machine, bench/data_parallel.py)"""
import argparse


def parameters(vocab=65, d=128, layers=4, heads=4, kv_heads=2, ffn="moe", d_ff=512, n=4, r=4,
               d_expert=256):
    """Parameter count and tensor count of a rex TransformerLM (tied embeddings, no biases)."""
    kv = d * (d // heads) * kv_heads
    attn = 2 * d * d + 2 * kv  # q, o; k, v
    count = vocab * d + d  # embedding, final norm
    tensors = 2
    for _ in range(layers):
        count += attn + 2 * d  # attention, two norms
        tensors += 6
        if ffn == "dense":
            count += 3 * d * d_ff
            tensors += 3
        else:
            count += r * n * d  # router over the block's pool
            tensors += 1
    if ffn == "moe":
        blocks = layers // r
        count += blocks * r * n * 3 * d * d_expert
        tensors += blocks * r * n * 3
    return count, tensors


CONFIGS = {
    "default ReX R4 + PSR": {},
    "vanilla MoE (R1)": {"r": 1},
    "dense (d_ff 512)": {"ffn": "dense"},
}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--step-ms", type=float, default=43.3)
    p.add_argument("--backward-share", type=float, default=0.6)
    p.add_argument("--latency-us", type=float, default=5.0)
    p.add_argument("--measured-allreduce-ms", type=float, default=3.02)
    p.add_argument("--measured-exposed-ms", type=float, default=0.87)
    a = p.parse_args()

    print("| config | parameters | tensors | bytes all-reduced per step |")
    print("| --- | --- | --- | --- |")
    sizes = {}
    for name, kw in CONFIGS.items():
        count, tensors = parameters(**kw)
        sizes[name] = 4 * (count + tensors)
        print(f"| {name} | {count:,} | {tensors} | {sizes[name]:,} |")

    s = sizes["default ReX R4 + PSR"]
    bandwidth = s / (a.measured_allreduce_ms * 1e-3)  # p = 2: C = S / bandwidth
    unhidden = a.measured_exposed_ms / a.measured_allreduce_ms
    print(f"\nOne machine, 2 ranks: {a.measured_allreduce_ms} ms for {s:,} bytes = an effective "
          f"{bandwidth * 8 / 1e9:.1f} Gb/s link in the model's terms; overlap left "
          f"{a.measured_exposed_ms} ms exposed, h = {unhidden:.2f}.")

    t = a.step_ms * 1e-3
    print(f"\nDefault model, T = {a.step_ms} ms per step and rank, backward share "
          f"{a.backward_share}, latency {a.latency_us} us per hop, h = {unhidden:.2f}: ring "
          "all-reduce ms and efficiency (no overlap / overlapped)")
    print("| ranks | 10 Gb/s | 100 Gb/s | 400 Gb/s |")
    print("| --- | --- | --- | --- |")
    for ranks in (2, 4, 8, 16, 32, 64):
        cells = []
        for gbps in (10, 100, 400):
            c = 2 * (ranks - 1) / ranks * s / (gbps * 1e9 / 8) + 2 * (ranks - 1) * a.latency_us * 1e-6
            plain = t / (t + c)
            hidden = t / (t + max(unhidden * c, c - a.backward_share * t))
            cells.append(f"{c * 1e3:.2f} ms: {plain:.1%} / {hidden:.1%}")
        print(f"| {ranks} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
