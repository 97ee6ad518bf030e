#!/usr/bin/env python3
"""Tests of scripts/study.py, the study runner.

Usage: python3 tests/study/test_study.py TRAIN_TINY_REX SCRATCH_DIR

- The statistics against closed forms: Student's t quantile for 1 and 2 degrees of freedom and its
  CDF for 3, and mean / std / 95% interval of a hand-computed case.
- A two-arm, two-seed micro study run end to end: the files it writes, each number of summary.json
  recomputed here from the runs' own metrics.jsonl and model headers by a plain loop, and the
  study.md table holding them.
- An interrupted study (SIGINT to the runner while the second of its runs trains) resumes: the run
  that was complete is not redone, the interrupted one continues from its checkpoint with --resume,
  and its losses equal those of an uninterrupted run of the same settings. While the first runner
  trains, a second one on its folder is refused naming the first's PID and host.
- A run folder made with other settings, and malformed study files, are refused with a message
  naming the file and, for JSON that does not parse, the line and column, for a wrong value its key
  path.
"""

import json
import math
import os
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(REPO, "scripts"))
import study  # noqa: E402  (scripts/ is put on the path first)

BINARY, SCRATCH = os.path.abspath(sys.argv[1]), os.path.abspath(sys.argv[2])
RUNNER = [sys.executable, os.path.join(REPO, "scripts", "study.py")]
failures = []


def check(condition, message):
    if not condition:
        failures.append(message)
        print("FAIL:", message)


def close(a, b, tol=1e-9):
    return abs(a - b) <= tol * max(1.0, abs(b))


# --- the statistics ------------------------------------------------------------------------------

# df = 1 is the Cauchy distribution: the quantile is tan(pi (p - 1/2)).
check(close(study.t_quantile(0.975, 1), math.tan(math.pi * 0.475), 1e-7), "t quantile, df 1")
# df = 2: x = (2p - 1) sqrt(2 / (4 p (1 - p))).
t2 = 0.95 * math.sqrt(2 / (4 * 0.975 * 0.025))
check(close(study.t_quantile(0.975, 2), t2, 1e-7), "t quantile, df 2")
# df = 3: F(x) = 1/2 + (u / (1 + u^2) + atan u) / pi with u = x / sqrt 3.
for x in (0.3, 1.0, 3.182):
    u = x / math.sqrt(3)
    check(close(study.t_cdf(x, 3), 0.5 + (u / (1 + u * u) + math.atan(u)) / math.pi, 1e-9),
          f"t CDF, df 3, at {x}")

# By hand: values 1.0, 1.2, 1.6: mean 3.8 / 3; deviations -0.8/3, -0.2/3, 1.0/3, squares summing
# to 1.68 / 9, so the sample variance is 0.84 / 9 and the half-width t(0.975, 2) std / sqrt 3.
d = study.describe([1.0, 1.2, 1.6])
check(close(d["mean"], 3.8 / 3) and close(d["std"], math.sqrt(0.84 / 9)), f"describe: {d}")
check(close(d["ci95"], t2 * math.sqrt(0.84 / 9) / math.sqrt(3), 1e-7), f"describe ci95: {d}")
check(study.describe([2.5]) == {"n": 1, "mean": 2.5, "std": None, "ci95": None}, "one value")

# --- a micro study, end to end -------------------------------------------------------------------

shutil.rmtree(SCRATCH, ignore_errors=True)
os.makedirs(SCRATCH)
corpus = os.path.join(SCRATCH, "corpus.txt")
with open(corpus, "w", encoding="utf-8") as f:
    line = "the quick brown fox jumps over the lazy dog; pack my box with five dozen jugs.\n"
    f.write(line * 400)

TINY = {"model.d_model": 32, "model.n_layers": 2, "model.context": 16, "moe.d_expert": 32,
        "train.batch_size": 4, "train.warmup": 5, "psr.t_start": 5, "psr.t_end": 30,
        "train.log_interval": 5, "train.eval_interval": 10, "train.eval_batches": 2,
        "train.checkpoint_interval": 10}


def write_study(path, steps, seeds=(1, 2), extra=None):
    spec = {"name": "micro", "seeds": list(seeds), "baseline": "vanilla", "data": "corpus.txt",
            "set": {**TINY, "train.steps": steps},
            "arms": [{"name": "vanilla", "label": "vanilla MoE",
                      "config": os.path.join(REPO, "examples/configs/vanilla_moe.json")},
                     {"name": "r2", "label": "R2 + PSR",
                      "config": os.path.join(REPO, "examples/configs/tiny_rex.json"),
                      "set": {"moe.reuse": 2, **(extra or {})}}]}
    with open(path, "w", encoding="utf-8") as f:
        json.dump(spec, f)


def run_runner(*args):
    return subprocess.run(RUNNER + list(args), capture_output=True, text=True)


def metrics(run_dir, kind):
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
        return [r for r in map(json.loads, f) if r["kind"] == kind]


def header_sizes(run_dir):
    with open(os.path.join(run_dir, "model.safetensors"), "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return {k: math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__"}


study_file = os.path.join(SCRATCH, "micro.json")
write_study(study_file, steps=40)
out = os.path.join(SCRATCH, "micro")
result = run_runner(study_file, "--out", out, "--binary", BINARY, "--jobs", "2")
check(result.returncode == 0, f"micro study exit {result.returncode}: {result.stderr[-2000:]}")
for name in ("study.md", "summary.json", "study.png", "routing.png"):
    path = os.path.join(out, name)
    check(os.path.isfile(path) and os.path.getsize(path) > 0, f"{name} written")
for name in ("study.png", "routing.png"):
    with open(os.path.join(out, name), "rb") as f:
        check(f.read(8) == b"\x89PNG\r\n\x1a\n", f"{name} is a PNG")
check("ETA" in result.stdout and "4/4 runs complete" in result.stdout, "progress lines")

summary = json.load(open(os.path.join(out, "summary.json"), encoding="utf-8"))
check([a["name"] for a in summary["arms"]] == ["vanilla", "r2"], "arms in order")
check(summary["launches"] == [{"jobs": 2, "threads": 1}], f"launches: {summary['launches']}")
finals = {}
for arm in summary["arms"]:
    name = arm["name"]
    finals[name] = {}
    for seed in (1, 2):
        run_dir = os.path.join(out, "runs", f"{name}-seed{seed}")
        last = [r["val_loss"] for r in metrics(run_dir, "eval") if r["step"] == 40]
        check(len(last) == 1, f"{name} seed {seed}: one eval at step 40")
        finals[name][seed] = last[0]
        check(len(metrics(run_dir, "routing")) == 4, f"{name} seed {seed}: a routing record "
              "per evaluation (steps 10, 20, 30, 40)")
    values = [finals[name][1], finals[name][2]]
    check(arm["final_val_loss"] == {"1": values[0], "2": values[1]}, f"{name}: per-seed losses")
    check(close(arm["val_loss"]["mean"], statistics.mean(values)), f"{name}: mean")
    check(close(arm["val_loss"]["std"], statistics.stdev(values)), f"{name}: std")
    # Two seeds: one degree of freedom, the Cauchy quantile.
    half = math.tan(math.pi * 0.475) * statistics.stdev(values) / math.sqrt(2)
    check(close(arm["val_loss"]["ci95"], half, 1e-7), f"{name}: 95% interval")
    speeds = [statistics.median([r["tokens_per_s"] for r in metrics(
        os.path.join(out, "runs", f"{name}-seed{s}"), "train")][1:]) for s in (1, 2)]
    check(close(arm["tokens_per_s"], statistics.mean(speeds)), f"{name}: tokens/s")
    # Parameters: every tensor of the model file; active = all but the routed experts a token
    # does not use: each of the 2 layers runs top_k = 2 of its pool, the pools together holding
    # 2 layers x 4 experts of 3 x 32 x 32 weights.
    sizes = header_sizes(os.path.join(out, "runs", f"{name}-seed1"))
    per_expert = 3 * 32 * 32
    check(arm["params"] == sum(sizes.values()), f"{name}: total parameters")
    check(sum(v for k, v in sizes.items() if k.startswith("expert_tables.")) == 2 * 4 * per_expert,
          f"{name}: the expert tensors are the ones counted as routed")
    check(arm["active_params"] == sum(sizes.values()) - 2 * 4 * per_expert + 2 * 2 * per_expert,
          f"{name}: active parameters")
diffs = [finals["r2"][s] - finals["vanilla"][s] for s in (1, 2)]
vs = summary["arms"][1]["vs_baseline"]
check(close(vs["mean"], statistics.mean(diffs)) and close(vs["std"], statistics.stdev(diffs)),
      f"paired difference {vs} against {diffs}")
check("vs_baseline" not in summary["arms"][0], "the baseline has no difference from itself")
check(close(summary["arms"][0]["routing"]["own_share"], 1.0), "r = 1 routes only to its own")
check(summary["arms"][0]["routing"]["jaccard"] is None, "r = 1: no other layer in a block")
markdown = open(os.path.join(out, "study.md"), encoding="utf-8").read()
check(f"{statistics.mean([finals['r2'][1], finals['r2'][2]]):.4f}" in markdown
      and "R2 + PSR (`r2`)" in markdown and f"{statistics.mean(diffs):.4f}" in markdown,
      "study.md holds the table")
check("2 run(s) at once, 1 thread(s) each" in markdown, "study.md says how the runs were launched")

# A second invocation finds everything complete and trains nothing.
again = run_runner(study_file, "--out", out, "--binary", BINARY)
check(again.returncode == 0 and "4 complete, 0 to train" in again.stdout, "complete runs skipped")

# --- an interrupted study resumes ----------------------------------------------------------------

resume_file = os.path.join(SCRATCH, "resume.json")
write_study(resume_file, steps=400, seeds=(1,))
resumed = os.path.join(SCRATCH, "resumed")
first, second = (os.path.join(resumed, "runs", n) for n in ("vanilla-seed1", "r2-seed1"))
runner = subprocess.Popen(RUNNER + [resume_file, "--out", resumed, "--binary", BINARY,
                                   "--jobs", "1"],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def lock_holder():
    try:
        with open(os.path.join(resumed, ".lock"), encoding="utf-8") as f:
            return f.read()
    except OSError:
        return ""


# Once it holds its folder's lock (before it launches a run), a second runner on the folder is
# refused, naming it. Checked before the interrupt below, which must come early in the second run.
deadline = time.monotonic() + 300
while (time.monotonic() < deadline and runner.poll() is None
       and not lock_holder().startswith(f"{runner.pid} ")):
    time.sleep(0.01)
second_runner = run_runner(resume_file, "--out", resumed, "--binary", BINARY, "--jobs", "1")
check(second_runner.returncode == 1
      and f"study folder {resumed} is in use by PID {runner.pid} on host {os.uname().nodename}"
      in second_runner.stderr and "Traceback" not in second_runner.stderr,
      f"a second runner on a busy folder: exit {second_runner.returncode}: {second_runner.stderr}")
while time.monotonic() < deadline:
    if os.path.exists(os.path.join(second, "metrics.jsonl")) and metrics(second, "train"):
        break
    time.sleep(0.05)
runner.send_signal(signal.SIGINT)
output, _ = runner.communicate(timeout=300)
check(runner.returncode == 130, f"interrupted runner exits 130, not {runner.returncode}: {output}")
marker = json.load(open(os.path.join(second, "study_run.json"), encoding="utf-8"))
check(marker["complete"] is False, "the interrupted run is not marked complete")
stopped_at = max(r["step"] for r in metrics(second, "train"))
check(stopped_at < 400, f"the second run was stopped early (at {stopped_at})")
first_log = open(os.path.join(first, "log.txt"), encoding="utf-8").read()
for run_dir in (first, second):  # each launched once, by the first runner: the second launched none
    with open(os.path.join(run_dir, "log.txt"), encoding="utf-8") as f:
        check(sum(line.startswith("$ ") for line in f) == 1, f"{run_dir} was launched once")
first_model = os.stat(os.path.join(first, "model.safetensors")).st_mtime_ns

finish = run_runner(resume_file, "--out", resumed, "--binary", BINARY, "--jobs", "1")
check(finish.returncode == 0, f"resumed study exit {finish.returncode}: {finish.stderr[-2000:]}")
check("1 complete, 1 to train" in finish.stdout and "resuming r2-seed1" in finish.stdout,
      f"the resumed study continues only the interrupted run: {finish.stdout}")
check(open(os.path.join(first, "log.txt"), encoding="utf-8").read() == first_log
      and os.stat(os.path.join(first, "model.safetensors")).st_mtime_ns == first_model,
      "the complete run was not redone")
check(" --resume " in open(os.path.join(second, "log.txt"), encoding="utf-8").read(),
      "the interrupted run continued from its checkpoint")
# The resumed run equals an uninterrupted one with the same settings (one thread, as the runner).
reference = os.path.join(SCRATCH, "reference")
args = [BINARY, "--config", os.path.join(REPO, "examples/configs/tiny_rex.json"), "--data", corpus,
        "--out", reference, "--seed", "1"]
for key, value in {**TINY, "train.steps": 400, "moe.reuse": 2}.items():
    args += ["--set", f"{key}={value}"]
subprocess.run(args, check=True, capture_output=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
check([(r["step"], r["val_loss"]) for r in metrics(second, "eval")]
      == [(r["step"], r["val_loss"]) for r in metrics(reference, "eval")],
      "the resumed run's validation losses equal an uninterrupted run's")

# --- refusals -----------------------------------------------------------------------------------

write_study(study_file, steps=40, extra={"moe.top_k": 1})  # r2's settings changed under `out`
changed = run_runner(study_file, "--out", out, "--binary", BINARY)
check(changed.returncode == 1 and "made with other settings" in changed.stderr
      and "r2-seed1" in changed.stderr, f"changed settings refused: {changed.stderr}")
# Malformed study files: refused with exit status 1, no traceback, and a message naming the file
# and, for JSON that does not parse, the line and column, for a wrong value its key path.
bad = os.path.join(SCRATCH, "bad.json")
dense = os.path.join(REPO, "examples/configs/dense.json")
good_arm = '{"name": "a", "config": "%s"}' % dense
for text, message in [("{", f"{bad}:1:2: not valid JSON: Expecting property name"),
                      ('{"name": "x",\n "seeds": [1],\n "arms": [1,, 2]}',
                       f"{bad}:3:13: not valid JSON: Expecting value"),
                      (b'{"name": "\xc3\xa9",\n "na\xffme": "x"}', f"{bad}:2:5: not valid UTF-8"),
                      ('{"name": "x", "seeds": [1], "seeds": [2]}',
                       "key 'seeds' appears twice in one object"),
                      ('{"name": "x", "set": {"train.lr": 1e999}}',
                       "set.train.lr: a number beyond double range"),
                      ('{"name": "x", "seeds": [1], "baseline": "a", "arms": []}',
                       "arms: must be a non-empty list"),
                      ('{"name": "x", "seeds": [], "baseline": "a", "arms": [1]}',
                       "seeds: must be a non-empty list"),
                      ('{"name": "x", "seeds": [1, -2], "baseline": "a", "arms": [1]}',
                       "seeds[1]: -2 is not a whole number >= 0"),
                      ('{"name": "x", "seeds": [1], "baseline": "a", "arms": [%s, '
                       '{"name": "b c", "config": "%s"}]}' % (good_arm, dense),
                       "arms[1].name: 'b c' may hold only letters"),
                      ('{"name": "x", "seeds": [1], "baseline": "a", "arms": '
                       '[{"name": "a", "config": "%s", "set": {"moe.reuse": [2]}}]}' % dense,
                       "arms[0].set.moe.reuse: [2] is not a number"),
                      ('{"name": "x", "seeds": [1], "baseline": "b", "data": "corpus.txt", '
                       '"arms": [%s]}' % good_arm, "baseline: 'b' is not an arm"),
                      ('{"name": "x", "seeds": [1], "baseline": "a", "arms": '
                       '[{"name": "a", "config": "missing.json"}]}', "no such file")]:
    with open(bad, "wb") as f:
        f.write(text if isinstance(text, bytes) else text.encode())
    refused = run_runner(bad, "--out", os.path.join(SCRATCH, "bad"), "--binary", BINARY)
    check(refused.returncode == 1 and message in refused.stderr
          and "Traceback" not in refused.stderr,
          f"study file {text[:40]!r}: want exit 1 naming {message!r}, got {refused.returncode}: "
          f"{refused.stderr}")

print(f"{len(failures)} failure(s)" if failures else "all study runner checks passed")
sys.exit(1 if failures else 0)
