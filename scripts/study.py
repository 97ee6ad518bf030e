#!/usr/bin/env python3
"""Runs a study: every arm of a study file trained with every seed, then the statistics and figures.

Usage: python3 scripts/study.py STUDY.json [--out DIR] [--data FILE] [--jobs N] [--threads T]
                                [--binary PATH] [--device cpu|cuda] [--report-only]

A study file (examples/studies/*.json; keys in docs/formats.md) names arms, each a config plus
`--set` overrides, and seeds. Every arm x seed is one run of train_tiny_rex in OUT/runs/ARM-seedS.
Runs go JOBS at a time (default: the cores divided by --threads), each with OMP_NUM_THREADS=T.
A run that is complete is skipped; one that was interrupted (Ctrl-C, a kill, a reboot) is continued
from its checkpoint with --resume, so running the same command again finishes an interrupted study.
A run folder made with other settings is refused rather than mixed in. Progress, with an ETA, is
printed every few seconds; each run's own output goes to OUT/runs/ARM-seedS/log.txt.
One runner works on a study folder at a time: it holds a lock on OUT/.lock (as train_tiny_rex does
on each run folder), and a second runner on OUT is refused, naming the first's PID and host.

When every run is complete, the runner writes into OUT:
  study.md      per arm the final validation loss (mean, std and 95% t-interval over seeds),
                tokens/s, total and active parameters, and the difference from the baseline arm
                paired by seed, with its interval; the routing at the last evaluation
  summary.json  the same numbers, for scripts
  study.png     validation loss of every arm (mean, band of +-1 std over seeds), and each arm minus
                the baseline, paired by seed
  routing.png   per MoE arm over training: own share per layer, load imbalance, the Jaccard overlap
                of the top experts of the layers of a block, and the final load per pool expert
--report-only writes them from the runs that are complete, without training.
"""

import argparse
import fcntl
import json
import math
import os
import signal
import statistics
import struct
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_BINARY = os.path.join(REPO, "build", "examples", "train_tiny_rex")
MARKER = "study_run.json"  # in each run folder: the settings it was made with; whether complete
LOCK_FILE = ".lock"  # in the study folder, held by the runner working on it


class StudyError(Exception):
    """A problem with the study file, a run or its files, reported as one message."""


# ---------------------------------------------------------------------------------------------
# The study file


def text_position(data, offset):
    """(line, column) of byte `offset` of `data`, both from 1, the column in UTF-8 characters:
    what rex's JSON reader and json.JSONDecodeError report."""
    line_start = data.rfind(b"\n", 0, offset) + 1
    return (data.count(b"\n", 0, offset) + 1,
            len(data[line_start:offset].decode("utf-8", errors="replace")) + 1)


def distinct_keys(pairs):
    """object_pairs_hook: a key given twice in one object is refused, as rex refuses it (json would
    keep the last one). The hook is not told where the object is, so the message names the key."""
    seen = set()
    for key, _ in pairs:
        if key in seen:
            raise ValueError(f"key {key!r} appears twice in one object")
        seen.add(key)
    return dict(pairs)


def non_finite_path(value, path=""):
    """The key path ("set.train.lr", "seeds[2]") of the first number in `value` that is not finite
    (1e999, NaN, Infinity: Python's json accepts them, rex's reader does not); None if none."""
    if isinstance(value, float) and not math.isfinite(value):
        return path
    if isinstance(value, dict):
        children = ((f"{path}.{key}" if path else key, item) for key, item in value.items())
    elif isinstance(value, list):
        children = ((f"{path}[{i}]", item) for i, item in enumerate(value))
    else:
        children = ()
    for child_path, item in children:
        found = non_finite_path(item, child_path)
        if found is not None:
            return found
    return None


def read_json(path, what):
    """The JSON file at `path`, read as strictly as rex reads JSON. An error names `what`, the file
    and, where the problem is in the text, its line and column: "study file s.json:3:12: ..."."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise StudyError(f"{what} {path}: no such file") from None
    except OSError as e:
        raise StudyError(f"{what} {path}: cannot read: {e}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line, column = text_position(data, e.start)
        raise StudyError(f"{what} {path}:{line}:{column}: not valid UTF-8 text") from None
    try:
        value = json.loads(text, object_pairs_hook=distinct_keys)
    except json.JSONDecodeError as e:
        raise StudyError(f"{what} {path}:{e.lineno}:{e.colno}: not valid JSON: {e.msg}") from None
    except ValueError as e:  # from distinct_keys
        raise StudyError(f"{what} {path}: {e}") from None
    where = non_finite_path(value)
    if where is not None:
        raise StudyError(f"{what} {path}: {where or 'the value'}: a number beyond double range, "
                         "NaN or Infinity (JSON numbers must be finite)")
    return value


def set_value(value):
    """A --set value as train_tiny_rex reads it: JSON numbers and booleans unquoted."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def check_sets(sets, where, path):
    """`path`: the key path of the 'set' object in the study file ("set", "arms[1].set")."""
    if not isinstance(sets, dict):
        raise StudyError(f"{where}: {path}: must be an object of config keys "
                         "(e.g. \"moe.reuse\": 4)")
    for key, value in sets.items():
        if "." not in key:
            raise StudyError(f"{where}: {path}.{key}: not a config key (want \"section.key\")")
        if not isinstance(value, (str, int, float, bool)):
            raise StudyError(f"{where}: {path}.{key}: {json.dumps(value)} is not a number, a "
                             "string or true/false")


def apply_sets(config, sets):
    """The config a run trains with, as far as the runner needs it (steps, log interval)."""
    merged = json.loads(json.dumps(config))
    for key, value in sets.items():
        section, name = key.split(".", 1)
        merged.setdefault(section, {})[name] = value
    return merged


def load_study(path, data_override):
    """The study file's settings, checked; an error names the file and the key path of the value
    that is wrong ("arms[1].name")."""
    study = read_json(path, "study file")
    where = f"study file {path}"
    if not isinstance(study, dict):
        raise StudyError(f"{where}: must be a JSON object")
    known = {"name", "description", "data", "seeds", "baseline", "set", "arms"}
    unknown = sorted(set(study) - known)
    if unknown:
        raise StudyError(f"{where}: unknown key(s) {unknown}; known: {sorted(known)}")
    for key in ("name", "seeds", "baseline", "arms"):
        if key not in study:
            raise StudyError(f"{where}: missing '{key}'")
    here = os.path.dirname(os.path.abspath(path))
    seeds = study["seeds"]
    if not isinstance(seeds, list) or not seeds:
        raise StudyError(f"{where}: seeds: must be a non-empty list of distinct whole numbers >= 0")
    for j, seed in enumerate(seeds):
        if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
            raise StudyError(f"{where}: seeds[{j}]: {json.dumps(seed)} is not a whole number >= 0")
        if seed in seeds[:j]:
            raise StudyError(f"{where}: seeds[{j}]: {seed} is seeds[{seeds.index(seed)}] too")
    common = study.get("set", {})
    check_sets(common, where, "set")
    if not isinstance(study["arms"], list) or not study["arms"]:
        raise StudyError(f"{where}: arms: must be a non-empty list")
    arms = []
    for i, arm in enumerate(study["arms"]):
        at = f"{where}: arms[{i}]"
        if not isinstance(arm, dict):
            raise StudyError(f"{at}: must be an object with a 'name' and a 'config'")
        if not isinstance(arm.get("name"), str) or not arm["name"]:
            raise StudyError(f"{at}.name: needs a name (a non-empty string)")
        if not all(c.isalnum() or c in "_-" for c in arm["name"]):
            raise StudyError(f"{at}.name: {arm['name']!r} may hold only letters, digits, _ and -")
        unknown = sorted(set(arm) - {"name", "label", "config", "set"})
        if unknown:
            raise StudyError(f"{at}: unknown key(s) {unknown}")
        if not isinstance(arm.get("config"), str):
            raise StudyError(f"{at}.config: needs a config file (a path relative to the study "
                             "file)")
        sets = arm.get("set", {})
        check_sets(sets, where, f"arms[{i}].set")
        config_path = os.path.normpath(os.path.join(here, arm["config"]))
        merged_sets = {**common, **sets}
        config = apply_sets(read_json(config_path, f"{at}.config:"), merged_sets)
        steps = config.get("train", {}).get("steps")
        if not isinstance(steps, int) or steps <= 0:
            raise StudyError(f"{at}: train.steps must be set (in the config or the study's 'set')")
        arms.append({"name": arm["name"], "label": arm.get("label", arm["name"]),
                     "config": config_path, "set": merged_sets, "steps": steps})
    names = [a["name"] for a in arms]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise StudyError(f"{where}: arms[{i}].name: {name!r} is the name of "
                             f"arms[{names.index(name)}] too (arm names must be distinct)")
    if study["baseline"] not in names:
        raise StudyError(f"{where}: baseline: {study['baseline']!r} is not an arm: {names}")
    if data_override:
        data = os.path.abspath(data_override)
    elif isinstance(study.get("data"), str):
        data = os.path.normpath(os.path.join(here, study["data"]))
    else:
        raise StudyError(f"{where}: no corpus: give --data FILE or a 'data' key")
    if not os.path.isfile(data):
        raise StudyError(f"corpus {data}: no such file (the default corpus is made by "
                         f"scripts/train.sh: bible \"Gen1:1-Rev22:21\" > data/kjv.txt)")
    return {"name": study["name"], "description": study.get("description", ""), "data": data,
            "seeds": seeds, "baseline": study["baseline"], "arms": arms}


def plan_runs(study, out):
    runs = []
    for arm in study["arms"]:
        for seed in study["seeds"]:
            runs.append({"arm": arm, "seed": seed,
                         "dir": os.path.join(out, "runs", f"{arm['name']}-seed{seed}"),
                         "settings": {"config": arm["config"], "set": arm["set"], "seed": seed,
                                      "data": study["data"]}})
    return runs


# ---------------------------------------------------------------------------------------------
# Running


def lock_study_folder(out):
    """Locks the study folder OUT for this process until it ends: flock(LOCK_EX | LOCK_NB) on
    OUT/.lock, then this process's PID and host written into it. A folder another runner holds is
    refused at once, naming that runner. The kernel drops the lock when the process ends, however
    it ends (kill -9 too), so none is left stale; the descriptor is not inherited by the runs,
    which lock their own folders. The same protocol as train_tiny_rex's (rex/io/folder_lock.hpp)."""
    path = os.path.join(out, LOCK_FILE)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        raise StudyError(f"cannot lock study folder {out} (lock file {path}): "
                         f"{e.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fields = os.pread(fd, 256, 0).decode("utf-8", "replace").split()
        os.close(fd)
        holder = (f"PID {fields[0]} on host {fields[1]}"
                  if len(fields) >= 2 and fields[0].isdigit() else "another process")
        raise StudyError(f"study folder {out} is in use by {holder} (lock file {path}); wait for "
                         "it to finish or stop it") from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {os.uname().nodename}\n".encode(), 0)
    except OSError as e:
        raise StudyError(f"cannot write this process into the lock file {path}: "
                         f"{e.strerror}") from None
    # fd stays open (and the folder locked) until the process exits.


def read_marker(run):
    path = os.path.join(run["dir"], MARKER)
    if not os.path.exists(path):
        return None
    marker = read_json(path, "run marker")
    if marker.get("settings") != run["settings"]:
        raise StudyError(f"{run['dir']} was made with other settings than this study's arm "
                         f"{run['arm']['name']} seed {run['seed']} ({path}); remove it or use "
                         f"another --out")
    return marker


def write_marker(run, complete, launch, wall_s=None):
    """launch: {"jobs", "threads"} of the runner that trains it, which the speed depends on."""
    record = {"settings": run["settings"], "complete": complete, "launch": launch}
    if wall_s is not None:
        record["wall_s"] = round(wall_s, 1)
    tmp = os.path.join(run["dir"], MARKER + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=1)
    os.replace(tmp, os.path.join(run["dir"], MARKER))


def is_complete(run):
    marker = read_marker(run)
    return marker is not None and marker.get("complete") is True


def command(run, binary, device="cpu"):
    """train_tiny_rex's arguments: a fresh start, or --resume where a checkpoint was saved."""
    on_device = [] if device == "cpu" else ["--device", device]
    if os.path.exists(os.path.join(run["dir"], "checkpoint.safetensors")):
        return [binary, "--resume", run["dir"], "--data", run["settings"]["data"]] + on_device
    args = [binary, "--config", run["settings"]["config"], "--data", run["settings"]["data"],
            "--out", run["dir"], "--overwrite", "--seed", str(run["seed"])] + on_device
    for key, value in run["settings"]["set"].items():
        args += ["--set", f"{key}={set_value(value)}"]
    return args


def steps_done(run):
    """The last completed step logged in the run's metrics.jsonl (0 when there is none)."""
    path = os.path.join(run["dir"], "metrics.jsonl")
    last = 0
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if '"kind":"train"' in line:
                    last = max(last, json.loads(line)["step"])
    except (OSError, ValueError, KeyError):
        pass
    return last


def format_duration(seconds):
    s = int(round(seconds))
    return f"{s // 3600}h{s // 60 % 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def log_tail(run, lines=15):
    try:
        with open(os.path.join(run["dir"], "log.txt"), encoding="utf-8", errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return "(no log)\n"


class Stop(Exception):
    """Ctrl-C or SIGTERM reached the runner."""


def stop_on_signal(signum, _frame):
    raise Stop(signal.Signals(signum).name)


def train_all(runs, binary, jobs, threads, progress_interval=10.0, device="cpu"):
    """Trains the runs that are not complete; returns the runs that failed.

    Each run is started in its own session, so that Ctrl-C in the terminal reaches only the
    runner; on Ctrl-C or SIGTERM the runner sends each running run one SIGINT (it saves a
    checkpoint and exits), waits for them, and raises Stop."""
    todo = [r for r in runs if not is_complete(r)]
    total_steps = sum(r["arm"]["steps"] for r in runs)
    print(f"study: {len(runs)} runs, {len(runs) - len(todo)} complete, {len(todo)} to train "
          f"({jobs} at a time, {threads} thread{'s' if threads > 1 else ''} each)", flush=True)
    if not todo:
        return []
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    launch = {"jobs": jobs, "threads": threads}
    running, failed = [], []
    start = time.monotonic()
    start_steps = sum(r["arm"]["steps"] if is_complete(r) else steps_done(r) for r in runs)
    last_report = 0.0
    previous = {s: signal.signal(s, stop_on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while todo or running:
            while todo and len(running) < jobs:
                run = todo.pop(0)
                os.makedirs(run["dir"], exist_ok=True)
                if read_marker(run) is None:
                    write_marker(run, complete=False, launch=launch)
                args = command(run, binary, device)
                with open(os.path.join(run["dir"], "log.txt"), "a", encoding="utf-8") as log:
                    log.write("$ OMP_NUM_THREADS=%d %s\n" % (threads, " ".join(args)))
                    log.flush()
                    process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env,
                                               start_new_session=True)
                running.append((run, process, time.monotonic()))
                print(f"  {'resuming' if '--resume' in args else 'starting'} "
                      f"{os.path.basename(run['dir'])}", flush=True)
            time.sleep(0.5)
            for entry in list(running):
                run, process, began = entry
                if process.poll() is None:
                    continue
                running.remove(entry)
                name = os.path.basename(run["dir"])
                if process.returncode == 0:
                    write_marker(run, complete=True, launch=launch,
                                 wall_s=time.monotonic() - began)
                    print(f"  done {name} in {format_duration(time.monotonic() - began)}",
                          flush=True)
                else:
                    failed.append(run)
                    print(f"  FAILED {name} (exit status {process.returncode}); the end of "
                          f"{run['dir']}/log.txt:\n{log_tail(run)}", file=sys.stderr, flush=True)
            now = time.monotonic()
            if now - last_report >= progress_interval or not (todo or running):
                last_report = now
                done = sum(r["arm"]["steps"] if is_complete(r) else steps_done(r) for r in runs)
                rate = (done - start_steps) / max(now - start, 1e-9)
                eta = format_duration((total_steps - done) / rate) if rate > 0 else "?"
                complete = sum(is_complete(r) for r in runs)
                print(f"study: {complete}/{len(runs)} runs complete, {len(running)} running | "
                      f"{100.0 * done / total_steps:5.1f}% of steps | "
                      f"{format_duration(now - start)} elapsed, ETA {eta}", flush=True)
    except Stop as stop:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print(f"study: {stop}: asking {len(running)} running run(s) to save a checkpoint",
              file=sys.stderr, flush=True)
        for _, process, _ in running:
            process.send_signal(signal.SIGINT)
        for _, process, _ in running:
            try:
                process.wait(timeout=300)
            except subprocess.TimeoutExpired:
                process.kill()
        raise
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return failed


# ---------------------------------------------------------------------------------------------
# Reading the runs


def parameter_counts(run_dir, config):
    """(total, active per token) from model.safetensors' header and the run's config.json."""
    path = os.path.join(run_dir, "model.safetensors")
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
    except (OSError, struct.error, ValueError) as e:
        raise StudyError(f"{path}: cannot read the safetensors header: {e}") from None
    sizes = {name: math.prod(t["shape"]) for name, t in header.items() if name != "__metadata__"}
    total = sum(sizes.values())
    routed = {n: s for n, s in sizes.items() if n.startswith("expert_tables.")}
    if config["model"]["ffn"] != "moe" or not routed:
        return total, total
    moe = config["moe"]
    pool = moe["experts_per_layer"] * moe["reuse"]
    n_tables = config["model"]["n_layers"] // moe["reuse"]
    per_expert = sum(routed.values()) / (n_tables * pool)
    active = total - sum(routed.values()) + config["model"]["n_layers"] * moe["top_k"] * per_expert
    return total, int(active)


def load_run(run):
    d = run["dir"]
    config = read_json(os.path.join(d, "config.json"), "run config")
    evals, speeds, routing = [], [], []
    path = os.path.join(d, "metrics.jsonl")
    try:
        with open(path, encoding="utf-8") as f:
            records = [json.loads(line) for line in f if line.strip()]
    except (OSError, ValueError) as e:
        raise StudyError(f"{path}: cannot read: {e}") from None
    for r in records:
        if r.get("kind") == "eval":
            evals.append((r["step"], r["val_loss"]))
        elif r.get("kind") == "train":
            speeds.append(r["tokens_per_s"])
        elif r.get("kind") == "routing":
            routing.append(r)
    steps = run["arm"]["steps"]
    final = [v for s, v in evals if s == steps]
    if not final:
        raise StudyError(f"{path}: no evaluation at the final step {steps}")
    total, active = parameter_counts(d, config)
    return {"evals": sorted(evals), "final": final[-1],
            # The first log interval includes the start-up; the median of the rest is the speed.
            "tokens_per_s": statistics.median(speeds[1:] if len(speeds) > 1 else speeds),
            "routing": sorted(routing, key=lambda r: r["step"]), "params": total,
            "active_params": active, "config": config, "launch": read_marker(run).get("launch")}


# ---------------------------------------------------------------------------------------------
# Statistics


def t_cdf(x, df):
    """P(T <= x) for Student's t with df degrees of freedom, by Simpson's rule on the density."""
    if x < 0:
        return 1.0 - t_cdf(-x, df)
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    n = 2000  # even; the density is smooth, so this is exact to ~1e-12 for the x we need

    def density(t):
        return math.exp(log_c - (df + 1) / 2 * math.log1p(t * t / df))

    h = x / n
    area = density(0) + density(x)
    area += sum((4 if i % 2 else 2) * density(i * h) for i in range(1, n))
    return 0.5 + area * h / 3


def t_quantile(p, df):
    """The x with P(T <= x) = p (0.5 < p < 1), by bisection on t_cdf."""
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        hi *= 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
    return (lo + hi) / 2


def describe(values):
    """mean, sample standard deviation and the 95% t-interval's half-width (None for one value)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return {"n": n, "mean": mean, "std": None, "ci95": None}
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return {"n": n, "mean": mean, "std": std, "ci95": t_quantile(0.975, n - 1) * std / math.sqrt(n)}


def block_overlaps(layer):
    """A layer's Jaccard indices with the other layers of its block (not with itself)."""
    return [j for other, j in enumerate(layer["jaccard"])
            if other != layer["layer"] % len(layer["jaccard"])]


def routing_summary(record):
    """Mean over layers of own share, entropy, imbalance and the off-diagonal block Jaccard."""
    layers = record["layers"]
    pairs = [j for layer in layers for j in block_overlaps(layer)]
    return {"own_share": statistics.fmean(l["own_share"] for l in layers),
            "entropy": statistics.fmean(l["entropy"] for l in layers),
            "imbalance": statistics.fmean(l["imbalance"] for l in layers),
            "jaccard": statistics.fmean(pairs) if pairs else None}


def summarize(study, runs):
    """Per arm: the seeds' results and their statistics; paired differences from the baseline."""
    loaded = {}
    for run in runs:
        if is_complete(run):
            loaded[(run["arm"]["name"], run["seed"])] = load_run(run)
    base = study["baseline"]
    arms = []
    for arm in study["arms"]:
        seeds = [s for s in study["seeds"] if (arm["name"], s) in loaded]
        if not seeds:
            continue
        results = [loaded[(arm["name"], s)] for s in seeds]
        finals = [r["final"] for r in results]
        entry = {"name": arm["name"], "label": arm["label"], "seeds": seeds,
                 "final_val_loss": dict(zip(map(str, seeds), finals)),
                 "val_loss": describe(finals),
                 "tokens_per_s": statistics.fmean(r["tokens_per_s"] for r in results),
                 "params": results[0]["params"], "active_params": results[0]["active_params"],
                 "steps": arm["steps"]}
        paired = [s for s in seeds if (base, s) in loaded]
        if arm["name"] != base and paired:
            diffs = [loaded[(arm["name"], s)]["final"] - loaded[(base, s)]["final"] for s in paired]
            entry["vs_baseline"] = {"seeds": paired, **describe(diffs)}
        if results[0]["routing"]:
            finals_routing = [routing_summary(r["routing"][-1]) for r in results]
            entry["routing"] = {k: (statistics.fmean(f[k] for f in finals_routing)
                                    if finals_routing[0][k] is not None else None)
                                for k in finals_routing[0]}
        arms.append(entry)
    launches = sorted({json.dumps(r["launch"], sort_keys=True) for r in loaded.values()})
    return {"name": study["name"], "description": study["description"], "baseline": base,
            "seeds": study["seeds"], "data": study["data"], "arms": arms,
            "launches": [json.loads(x) for x in launches]}, loaded


# ---------------------------------------------------------------------------------------------
# The report


def fmt(x, digits=4):
    return "–" if x is None else f"{x:.{digits}f}"


def interval(d, digits=4):
    if d["ci95"] is None:
        return f"{d['mean']:.{digits}f} (one seed)"
    low, high = d["mean"] - d["ci95"], d["mean"] + d["ci95"]
    return f"{d['mean']:.{digits}f} ± {d['std']:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def launched(launches):
    """"2 runs at once, 1 thread each" for the runner settings the runs were trained with."""
    known = [x for x in launches if x]
    text = " or ".join(f"{x['jobs']} run(s) at once, {x['threads']} thread(s) each" for x in known)
    return text + (" (some runs: not recorded)" if len(known) < len(launches) else "")


def write_markdown(summary, path):
    lines = [f"# Study `{summary['name']}`", ""]
    if summary["description"]:
        lines += [summary["description"], ""]
    lines += [f"Corpus `{summary['data']}`; seeds {summary['seeds']}; baseline "
              f"`{summary['baseline']}`. Validation loss in nats per character at the final step: "
              "mean ± sample std [95% t-interval of the mean] over seeds. The paired difference "
              "is the arm's loss minus the baseline's with the same seed (negative: the arm is "
              f"better). tokens/s: the median per run (mean over seeds), measured with "
              f"{launched(summary['launches'])}.", "",
              "| arm | seeds | final val loss | − baseline (paired) | tokens/s | params "
              "| active |",
              "| --- | ---: | --- | --- | ---: | ---: | ---: |"]
    for a in summary["arms"]:
        vs = a.get("vs_baseline")
        diff = "baseline" if a["name"] == summary["baseline"] else (interval(vs) if vs else "–")
        lines.append(f"| {a['label']} (`{a['name']}`) | {a['val_loss']['n']} | "
                     f"{interval(a['val_loss'])} | {diff} | {a['tokens_per_s']:,.0f} | "
                     f"{a['params'] / 1e6:.2f}M | {a['active_params'] / 1e6:.2f}M |")
    lines += ["", "Differences whose interval excludes 0:"]
    clear = [a["name"] for a in summary["arms"]
             if a.get("vs_baseline") and a["vs_baseline"]["ci95"] is not None
             and abs(a["vs_baseline"]["mean"]) > a["vs_baseline"]["ci95"]]
    by_name = {a["name"]: a["vs_baseline"]["mean"] for a in summary["arms"] if a["name"] in clear}
    lines += [f"- `{name}`: {diff:+.4f} nats ({'better' if diff < 0 else 'worse'})"
              for name, diff in by_name.items()] or ["- none"]
    routed = [a for a in summary["arms"] if "routing" in a]
    if routed:
        lines += ["", "Routing at the last evaluation (means over layers and seeds): own share, "
                  "entropy (nats), imbalance (max share / mean share), Jaccard of the top experts "
                  "between different layers of a block.", "",
                  "| arm | own share | entropy | imbalance | Jaccard |",
                  "| --- | ---: | ---: | ---: | ---: |"]
        for a in routed:
            r = a["routing"]
            lines.append(f"| `{a['name']}` | {fmt(r['own_share'], 3)} | {fmt(r['entropy'], 3)} | "
                         f"{fmt(r['imbalance'], 2)} | {fmt(r['jaccard'], 3)} |")
    lines += ["", "Per seed (final validation loss):", "",
              "| arm | " + " | ".join(f"seed {s}" for s in summary["seeds"]) + " |",
              "| --- |" + " ---: |" * len(summary["seeds"])]
    for a in summary["arms"]:
        lines.append(f"| `{a['name']}` | " + " | ".join(
            fmt(a["final_val_loss"].get(str(s))) for s in summary["seeds"]) + " |")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


def mean_curve(curves):
    """Per step shared by all curves: (steps, mean, std) of a list of [(step, value)]."""
    common = sorted(set.intersection(*(set(s for s, _ in c) for c in curves)))
    values = [[dict(c)[s] for c in curves] for s in common]
    means = [statistics.fmean(v) for v in values]
    stds = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in values]
    return common, means, stds


def band(ax, steps, mean, std, colour):
    """Shades mean +- std."""
    ax.fill_between(steps, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                    color=colour, alpha=0.2)


def plot_study(summary, loaded, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    base = summary["baseline"]
    for a in summary["arms"]:
        curves = [loaded[(a["name"], s)]["evals"] for s in a["seeds"]]
        steps, mean, std = mean_curve(curves)
        line, = left.plot(steps, mean, marker="o", markersize=3, label=a["label"])
        band(left, steps, mean, std, line.get_color())
        paired = [s for s in a["seeds"] if (base, s) in loaded]
        if paired:
            diffs = [[(st, v - dict(loaded[(base, s)]["evals"])[st])
                      for st, v in loaded[(a["name"], s)]["evals"]
                      if st in dict(loaded[(base, s)]["evals"])] for s in paired]
            steps, mean, std = mean_curve(diffs)
            right.plot(steps, mean, marker="o", markersize=3, color=line.get_color())
            band(right, steps, mean, std, line.get_color())
    left.set(xlabel="step", ylabel="validation loss (nats/char)",
             title=f"{summary['name']}: mean ± std over seeds")
    left.legend(fontsize=8)
    right.axhline(0, color="black", linewidth=0.8)
    right.set(xlabel="step", ylabel=f"loss − {base} (same seed)",
              title="difference from the baseline, paired by seed")
    for ax in (left, right):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_routing(summary, loaded, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    arms = [a for a in summary["arms"] if "routing" in a]
    if not arms:
        return False
    fig, axes = plt.subplots(len(arms), 4, figsize=(18, 3.2 * len(arms)), squeeze=False)
    for row, a in zip(axes, arms):
        records = [loaded[(a["name"], s)]["routing"] for s in a["seeds"]]
        n_layers = len(records[0][0]["layers"])
        colours = plt.cm.viridis([i / max(n_layers - 1, 1) for i in range(n_layers)])

        def per_layer(key, ax, ylabel):
            for layer in range(n_layers):
                curves = [[(r["step"], key(r["layers"][layer])) for r in rs]
                          for rs in records]
                steps, mean, _ = mean_curve(curves)
                ax.plot(steps, mean, color=colours[layer], label=f"layer {layer}")
            ax.set(xlabel="step", ylabel=ylabel)
            ax.grid(alpha=0.3)

        per_layer(lambda l: l["own_share"], row[0], "own share")
        row[0].set_title(f"{a['label']}", fontsize=9)
        per_layer(lambda l: l["imbalance"], row[1], "imbalance (max / mean share)")
        width = len(records[0][0]["layers"][0]["jaccard"])
        if width > 1:
            per_layer(lambda l: statistics.fmean(block_overlaps(l)), row[2],
                      "Jaccard with the block's other layers")
        else:
            row[2].text(0.5, 0.5, "one layer per block", ha="center", va="center")
            row[2].set_axis_off()
        if n_layers <= 8:
            row[0].legend(fontsize=7)
        shares = [[statistics.fmean(rs[-1]["layers"][layer]["share"][e] for rs in records)
                   for e in range(len(records[0][-1]["layers"][layer]["share"]))]
                  for layer in range(n_layers)]
        image = row[3].imshow(shares, aspect="auto", cmap="magma", interpolation="nearest")
        row[3].set(xlabel="pool expert", ylabel="layer", title="load per expert, last evaluation")
        row[3].xaxis.set_major_locator(MaxNLocator(integer=True))
        row[3].yaxis.set_major_locator(MaxNLocator(integer=True))
        fig.colorbar(image, ax=row[3], fraction=0.04)
    fig.tight_layout()
    fig.savefig(path, dpi=75)
    plt.close(fig)
    return True


def report(study, runs, out):
    summary, loaded = summarize(study, runs)
    if not summary["arms"]:
        raise StudyError("no run is complete yet: nothing to report")
    with open(os.path.join(out, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)
    write_markdown(summary, os.path.join(out, "study.md"))
    written = ["study.md", "summary.json"]
    try:
        plot_study(summary, loaded, os.path.join(out, "study.png"))
        written.append("study.png")
        if plot_routing(summary, loaded, os.path.join(out, "routing.png")):
            written.append("routing.png")
    except ImportError:
        print("study: matplotlib is missing (apt-get install python3-matplotlib); no figures",
              file=sys.stderr)
    print(f"study: wrote {', '.join(written)} in {out}")


def main():
    parser = argparse.ArgumentParser(
        description="Train every arm x seed of a study file, then write its statistics and "
                    "figures.",
        epilog="Study file keys: docs/formats.md. Results of the shipped studies: docs/results.md.")
    parser.add_argument("study",
                        help="the study file (JSON), e.g. examples/studies/paper_table4.json")
    parser.add_argument("--out", help="the study folder (default: runs/studies/NAME)")
    parser.add_argument("--data", help="the corpus (default: the study file's 'data')")
    parser.add_argument("--threads", type=int, default=1,
                        help="OMP_NUM_THREADS per run (default 1)")
    parser.add_argument("--jobs", type=int, help="runs at once (default: cores / threads)")
    parser.add_argument("--binary", default=DEFAULT_BINARY,
                        help="train_tiny_rex to run (default: build/examples/train_tiny_rex)")
    parser.add_argument("--device", default="cpu",
                        help="train_tiny_rex's --device for every run, e.g. cuda (default cpu)")
    parser.add_argument("--report-only", action="store_true",
                        help="write the report from the complete runs; train nothing")
    args = parser.parse_args()
    try:
        if args.threads < 1 or (args.jobs is not None and args.jobs < 1):
            raise StudyError("--threads and --jobs must be at least 1")
        jobs = args.jobs or max(1, (os.cpu_count() or 1) // args.threads)
        study = load_study(args.study, args.data)
        out = os.path.abspath(args.out or os.path.join("runs", "studies", study["name"]))
        os.makedirs(out, exist_ok=True)
        lock_study_folder(out)
        runs = plan_runs(study, out)
        if not args.report_only:
            if not os.access(args.binary, os.X_OK):
                raise StudyError(f"{args.binary}: not an executable; build it with "
                                 "cmake -S . -B build -DCMAKE_BUILD_TYPE=Release && "
                                 "cmake --build build --target train_tiny_rex")
            failed = train_all(runs, os.path.abspath(args.binary), jobs, args.threads,
                               device=args.device)
            if failed:
                raise StudyError(f"{len(failed)} run(s) failed: "
                                 + ", ".join(os.path.basename(r["dir"]) for r in failed)
                                 + "; fix the cause and run the same command to finish the study")
        report(study, runs, out)
    except StudyError as e:
        print(f"study: error: {e}", file=sys.stderr)
        sys.exit(1)
    except Stop:
        print("study: stopped; run the same command to continue", file=sys.stderr)
        sys.exit(128 + signal.SIGINT)


if __name__ == "__main__":
    main()
