#!/usr/bin/env python3
"""Training-step time of two builds of rex, interleaved in one run: did a change make the step slower?

    python3 bench/compare_builds.py BEFORE_SERVER AFTER_SERVER [--threads 1,2] [--repeats 15]
                                    [--steps 4] [--warmup 3] [--config NAME=FILE ...]

BEFORE_SERVER and AFTER_SERVER are two bench/train_step_server binaries (e.g. one built from the
commit before a change, kept aside, and one from the change). For each config and thread count the
two alternate blocks of --steps training steps on the same config and batch (the first of each
repeat alternates), after --warmup blocks each. Printed: the median ms/step of each and the ratio
after / before (above 1: the change is slower). The same protocol and configs as bench_train.py.
"""
import argparse
import statistics

from bench_train import DEFAULT_CONFIGS, RexServer


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("before")
    parser.add_argument("after")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--config", action="append", default=[], metavar="NAME=FILE")
    args = parser.parse_args()
    configs = dict(c.split("=", 1) for c in args.config) or DEFAULT_CONFIGS

    print("| config | threads | before ms/step | after ms/step | after / before |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, path in configs.items():
        for threads in (int(t) for t in args.threads.split(",")):
            servers = [RexServer(args.before, path, threads), RexServer(args.after, path, threads)]
            for server in servers:
                for _ in range(args.warmup):
                    server.steps(args.steps)
            times = [[], []]
            for repeat in range(args.repeats):
                for side in ((0, 1) if repeat % 2 == 0 else (1, 0)):
                    times[side].append(servers[side].steps(args.steps) / args.steps * 1000)
            for server in servers:
                server.close()
            before, after = (statistics.median(t) for t in times)
            print(f"| {name} | {threads} | {before:.2f} | {after:.2f} | {after / before:.3f} |",
                  flush=True)


if __name__ == "__main__":
    main()
