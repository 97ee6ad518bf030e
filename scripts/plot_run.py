#!/usr/bin/env python3
"""Plots training runs: the loss curves of one or more runs side by side, and, for each MoE run,
where its routers sent their tokens.

Usage: python3 scripts/plot_run.py RUN_DIR [RUN_DIR...] [--out PREFIX]

Reads RUN_DIR/metrics.jsonl (one JSON object per line: {"kind": "train", "step", "loss", ...} and
{"kind": "eval", "step", "val_loss", ...}; other kinds are ignored) and, when present,
RUN_DIR/routing.json. Writes PREFIX/loss.png (PREFIX defaults to the first RUN_DIR): train loss and
validation loss against step, one colour per run, labelled with the run folder's name. For each run
with a routing.json, writes RUN_DIR/routing.png: one row per layer, one column per expert of the
shared pool, coloured by the share of routed slots, with the layer's own experts outlined.

Everything is validated before anything is drawn, so a missing or malformed file gives one clear
message (and exit status 1) instead of a traceback or a half-written figure. Matplotlib runs on the
Agg backend: no display is needed.
"""

import argparse
import json
import math
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
from matplotlib.patches import Rectangle  # noqa: E402


class PlotError(Exception):
    """A missing or malformed input, reported as one line."""


def is_number(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def is_int(x):
    return isinstance(x, int) and not isinstance(x, bool)


def require(record, key, where, kind=is_number, what="a number"):
    if key not in record:
        raise PlotError(f"{where}: missing '{key}'")
    if not kind(record[key]):
        raise PlotError(f"{where}: '{key}' is {record[key]!r}, not {what}")
    return record[key]


def read_metrics(run_dir):
    """Returns (train, eval): lists of (step, loss) sorted by step."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise PlotError(f"{path}: no such file")
    train, evals = [], []
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
    except UnicodeDecodeError:
        raise PlotError(f"{path}: not UTF-8 text") from None
    for number, line in enumerate(lines, start=1):
        where = f"{path}:{number}"
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise PlotError(f"{where}: not valid JSON ({e.msg})") from None
        if not isinstance(record, dict):
            raise PlotError(f"{where}: expected a JSON object, got {type(record).__name__}")
        kind = require(record, "kind", where, lambda x: isinstance(x, str), "a string")
        if kind == "train":
            step = require(record, "step", where, is_int, "an integer")
            train.append((step, require(record, "loss", where)))
        elif kind == "eval":
            step = require(record, "step", where, is_int, "an integer")
            evals.append((step, require(record, "val_loss", where)))
    if not train and not evals:
        raise PlotError(f"{path}: no 'train' or 'eval' records")
    return sorted(train), sorted(evals)


def read_routing(run_dir):
    """Returns the parsed routing.json, checked, or None when the run has none (a dense model)."""
    path = os.path.join(run_dir, "routing.json")
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            routing = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PlotError(f"{path}: cannot be read as JSON ({e})") from None
    if not isinstance(routing, dict):
        raise PlotError(f"{path}: expected a JSON object")
    require(routing, "step", path, is_int, "an integer")
    layers = require(routing, "layers", path, lambda x: isinstance(x, list) and x,
                     "a non-empty list")
    pool = None
    for i, layer in enumerate(layers):
        where = f"{path}: layers[{i}]"
        if not isinstance(layer, dict):
            raise PlotError(f"{where}: expected a JSON object")
        require(layer, "layer", where, is_int, "an integer")
        share = require(layer, "share", where,
                        lambda x: isinstance(x, list) and x and all(map(is_number, x)),
                        "a non-empty list of numbers")
        if pool is None:
            pool = len(share)
        elif len(share) != pool:
            raise PlotError(f"{where}: 'share' has {len(share)} entries, layers[0] has {pool}")
        own = require(layer, "own_experts", where,
                      lambda x: isinstance(x, list) and all(map(is_int, x)),
                      "a list of integers")
        bad = [e for e in own if not 0 <= e < pool]
        if bad:
            raise PlotError(f"{where}: own expert {bad[0]} is outside the pool of {pool} experts")
    return routing


def plot_losses(runs, out_path):
    fig, (ax_train, ax_val) = plt.subplots(1, 2, figsize=(12, 4.5))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (name, train, evals) in enumerate(runs):
        colour = colours[i % len(colours)]
        if train:
            ax_train.plot(*zip(*train), color=colour, linewidth=1.0, label=name)
        if evals:
            ax_val.plot(*zip(*evals), color=colour, marker="o", markersize=3, label=name)
    for ax, title in ((ax_train, "train loss"), (ax_val, "validation loss")):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.grid(True, alpha=0.3)
        if ax.lines:
            ax.legend()
        else:
            ax.text(0.5, 0.5, "no records", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(out_path, dpi=120)
    plt.close(fig)


def plot_routing(name, routing, out_path):
    layers = routing["layers"]
    shares = [layer["share"] for layer in layers]
    pool, rows = len(shares[0]), len(layers)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * pool + 3.0), max(3.0, 0.45 * rows + 1.8)))
    percent = [[100 * value for value in share] for share in shares]
    image = ax.imshow(percent, cmap="viridis", aspect="auto", vmin=0.0)
    fig.colorbar(image, ax=ax, label="share of routed slots (%)")
    for row, layer in enumerate(layers):
        for expert in layer["own_experts"]:
            ax.add_patch(Rectangle((expert - 0.5, row - 0.5), 1, 1, fill=False, edgecolor="red",
                                   linewidth=2))
    if pool <= 32 and rows <= 32:  # small enough to print each share
        top = max(max(row) for row in percent)
        for row, share in enumerate(percent):
            for expert, value in enumerate(share):
                ax.text(expert, row, f"{value:.0f}", ha="center", va="center", fontsize=7,
                        color="black" if top > 0 and value > 0.6 * top else "white")
    labels = []
    for layer in layers:
        label = f"layer {layer['layer']}"
        if is_int(layer.get("block")):
            label += f" (block {layer['block']})"
        if is_number(layer.get("own_share")) and math.isfinite(layer["own_share"]):
            label += f"\nown {100 * layer['own_share']:.0f}%"
        labels.append(label)
    ax.set_yticks(range(rows), labels, fontsize=8)
    ax.set_xticks(range(pool))
    ax.set_xlabel("expert of the shared pool (red outline: the layer's own experts)")
    details = ", ".join(f"{key} {routing[key]}" for key in ("reuse", "experts_per_layer", "top_k")
                        if is_int(routing.get(key)))
    ax.set_title(f"{name}: routing at step {routing['step']}" + (f" ({details})" if details else ""))
    fig.tight_layout()
    fig.savefig(out_path, dpi=120)
    plt.close(fig)


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="a run folder")
    parser.add_argument("--out", metavar="PREFIX",
                        help="folder for loss.png (default: the first RUN_DIR)")
    args = parser.parse_args(argv)
    try:
        runs = []
        for run_dir in args.runs:
            if not os.path.isdir(run_dir):
                raise PlotError(f"{run_dir}: no such folder")
            name = os.path.basename(os.path.normpath(os.path.abspath(run_dir)))
            runs.append((run_dir, name, *read_metrics(run_dir), read_routing(run_dir)))
        out_dir = args.out if args.out is not None else args.runs[0]
        os.makedirs(out_dir, exist_ok=True)
        loss_path = os.path.join(out_dir, "loss.png")
        plot_losses([(name, train, evals) for _, name, train, evals, _ in runs], loss_path)
        print(f"wrote {loss_path}")
        for run_dir, name, _, _, routing in runs:
            if routing is not None:
                routing_path = os.path.join(run_dir, "routing.png")
                plot_routing(name, routing, routing_path)
                print(f"wrote {routing_path}")
    except (PlotError, OSError) as e:  # OSError: unreadable input, unwritable output
        print(f"plot_run: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
