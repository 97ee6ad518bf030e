#!/usr/bin/env python3
"""Data parallel on one machine: 1 process x 2 threads against 2 ranks x 1 thread (mpirun), the
default tiny ReX R4 + PSR model, interleaved round by round (the machine is shared and noisy);
medians over the rounds, the ratio, and the communication each step leaves exposed with and without
overlapping the bucket reductions with backward. Prints a markdown table (docs/distributed.md).

usage: bench/data_parallel.py BUILD_DIR DATA [--rounds 5] [--steps 30]"""
import argparse
import json
import os
import platform
import statistics
import subprocess


def run(cmd, env_threads):
    env = dict(os.environ, OMP_NUM_THREADS=str(env_threads))
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("build")
    parser.add_argument("data")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=30)
    a = parser.parse_args()
    exe = os.path.join(a.build, "bench", "bench_data_parallel")
    args = ["--data", a.data, "--steps", str(a.steps)]
    mpi = ["mpirun", "--oversubscribe", "--allow-run-as-root", "-np", "2", "-x", "OMP_NUM_THREADS"]
    rows = {"1 x 2": [], "2 x 1, overlap": [], "2 x 1, no overlap": []}
    for r in range(a.rounds):
        rows["1 x 2"] += run([exe] + args, 2)
        for line in run(mpi + [exe] + args, 1):
            rows["2 x 1, overlap" if line["overlap"] else "2 x 1, no overlap"].append(line)
        print(f"round {r + 1}/{a.rounds} done", flush=True)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    print(f"\nmachine: {cpu}, {os.cpu_count()} cores; {a.rounds} rounds x {a.steps} steps")
    base = statistics.median(x["tokens_per_s"] for x in rows["1 x 2"])
    print("| processes x threads | tokens/s (median) | vs 1 x 2 | step ms | exposed comm ms | "
          "share of step |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, lines in rows.items():
        tps = statistics.median(x["tokens_per_s"] for x in lines)
        step = statistics.median(x["median_step_ms"] for x in lines)
        comm = statistics.median(x["median_exposed_comm_ms"] for x in lines)
        print(f"| {name} | {tps:.0f} | {tps / base:.3f} | {step:.1f} | {comm:.2f} | "
              f"{comm / step:.1%} |")
    dp = rows["2 x 1, overlap"][0]
    blocking = statistics.median(x["blocking_allreduce_ms"] for x in rows["2 x 1, overlap"])
    print(f"\ngradient bytes per step {dp['gradient_bytes']}, {dp['buckets']} buckets; one blocking "
          f"all-reduce of all of them: {blocking:.2f} ms (median)")


if __name__ == "__main__":
    main()
