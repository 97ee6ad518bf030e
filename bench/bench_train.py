#!/usr/bin/env python3
"""Training-step benchmark: rex against PyTorch eager, torch.compile and JAX, interleaved in a run.

    python3 bench/bench_train.py [--server build/bench/train_step_server] [--threads 1,2]
                                 [--peers eager,compile,jax] [--repeats 15] [--steps 4]
                                 [--warmup 3] [--config NAME=FILE ...] [--scale]
                                 [--device cpu|cuda] [--tf32]

The runners, each training the same model from the same weights on the same batch:
  rex      bench/train_step_server, a subprocess
  eager    the PyTorch twin (tests/reference/twin.py's Transformer), in this process
  compile  the same twin under torch.compile (PyTorch 2.x; inductor compiles C++ with g++ on the
           CPU: about a minute per config and thread count, spent in the warm-up)
  jax      bench/jax_twin.py, a subprocess: the model written in JAX, one jit-compiled step
A peer that is not installed in this Python is left out with a line saying so. Debian's
python3-torch (1.13) has no torch.compile and there is no JAX package: `bash bench/setup_peers.sh`
creates .venv-peers with current PyTorch and JAX, then run this script with .venv-peers/bin/python.
These downloads are large (PyPI's PyTorch wheel is about 6 GB with its CUDA libraries), so the
peers stay out of CI.

First rex saves its initial weights and its batch, every peer loads them, and all take one step:
their losses must agree with rex's to LOSS_TOLERANCE (relative), or the benchmark stops, since a
peer that computes something else is no comparison. Then, per config and thread count, the
runners alternate blocks of --steps training steps (forward, backward, global-norm clipping,
AdamW), the first runner rotating with each repeat, after --warmup blocks each. Printed: median
ms/step, tokens/s, rex's speed-up over each (its tokens/s over theirs) and achieved GFLOP/s as a
share of the machine's GEMM peak, measured in the same run (the best of PyTorch's and rex's
1024^3 products at that thread count). Then, at the last thread count, the memory: the bytes a
forward pass keeps for backward per token (rex: its allocation counter; eager: the tensors
autograd saves, through saved_tensors_hooks; jax: the residuals of jax.vjp; torch.compile keeps
its own and is not measured) and the peak resident memory of a process that only trains (for
PyTorch a fresh child, its baseline after `import torch` in parentheses).

PSR masking is off (psr.schedule = none) since it does not change the work per step. PyTorch runs
with OPENBLAS_NUM_THREADS=1 (see below) and torch.set_num_threads(threads), JAX on `threads` CPUs
(its thread pools follow the CPU affinity), rex with OMP_NUM_THREADS.

--scale replaces the configs by a ladder around rex_r4 (d_model 128 -> 512, context 64 -> 512,
16 -> 64 experts per table) and times rex against the peers given with --peers (default: eager,
the fastest peer on rex_r4).

With --device cuda both run on the GPU (threads do not apply; the defaults become the GPU-sized
configs gpu_dense and gpu_rex_r4), every timing waits for the GPU, the GEMM peak is the best 4096^3
product, --tf32 lets rex and PyTorch use TF32 tensor cores for GEMMs, and the twin's attention is
PyTorch's fused scaled_dot_product_attention. The memory table is CPU-only.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

# OpenBLAS (PyTorch's BLAS here) starts its own threads, one per core, beside PyTorch's OpenMP
# threads: with two threads each on two cores, a 2-thread PyTorch step took 250 ms instead of 155.
# One OpenBLAS thread is PyTorch's best setting on this machine; it must be set before the import.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import torch  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests", "reference"))
import twin  # noqa: E402  (the PyTorch twin: the same model, written independently)
from safetensors_np import read_safetensors  # noqa: E402

DEFAULT_CONFIGS = {
    "dense": os.path.join(ROOT, "examples", "configs", "dense.json"),
    "rex_r4": os.path.join(ROOT, "examples", "configs", "tiny_rex.json"),
}
GPU_CONFIGS = {
    "gpu_dense": os.path.join(ROOT, "examples", "configs", "gpu_dense.json"),
    "gpu_rex_r4": os.path.join(ROOT, "examples", "configs", "gpu_rex_r4.json"),
}
# The --scale ladder: rex_r4 with one dimension grown at a time (d_expert = 2 d_model throughout,
# as in rex_r4; the batch stays 12 sequences, so a longer context is also more tokens per step).
SCALE_LADDER = [
    ("rex_r4", []),
    ("d_model 256", ["model.d_model=256", "moe.d_expert=512"]),
    ("d_model 512", ["model.d_model=512", "moe.d_expert=1024", "model.n_heads=8",
                     "model.n_kv_heads=4"]),
    ("context 128", ["model.context=128"]),
    ("context 256", ["model.context=256"]),
    ("context 512", ["model.context=512"]),
    ("32 experts", ["moe.experts_per_layer=8"]),
    ("64 experts", ["moe.experts_per_layer=16"]),
]
VOCAB = 73  # the King James Bible's byte vocabulary
LOSS_TOLERANCE = 1e-4  # float32 sums in another order agree to ~1e-6; a wrong model is >> 1e-3


def synchronize(device):
    if device == "cuda":
        torch.cuda.synchronize()


def training_flops(cfg):
    """FLOPs of one training step (forward + backward = 3 x forward), counting matmuls only."""
    m, e, t = cfg["model"], cfg["moe"], cfg["train"]
    d, layers, time_steps = m["d_model"], m["n_layers"], m["context"]
    head = d // m["n_heads"]
    attention = 2 * d * (2 * d + 2 * m["n_kv_heads"] * head) + 2 * 2 * d * (time_steps + 1) / 2
    if m["ffn"] == "dense":
        ffn = 2 * 3 * d * m["d_ff"]
    else:
        pool = e["reuse"] * e["experts_per_layer"]
        ffn = 2 * d * pool + (e["top_k"] + e["shared_experts"]) * 2 * 3 * d * e["d_expert"]
    per_token = layers * (attention + ffn) + 2 * d * m["vocab_size"]
    return 3 * per_token * t["batch_size"] * time_steps


class LineServer:
    """A subprocess that answers one line per command line (train_step_server, jax_twin.py)."""

    def __init__(self, args, env, cpus=None):
        """cpus: the CPUs the process may run on (all when None)."""
        self.process = subprocess.Popen(
            args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
            preexec_fn=None if cpus is None else lambda: os.sched_setaffinity(0, cpus))

    def answer(self, command):
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.process.args[0]} stopped answering '{command}'")
        return line

    def ask(self, command):
        return [float(v) for v in self.answer(command).split()[1:]]

    def steps(self, n):
        return self.ask(f"steps {n}")[0] / 1000.0

    def loss(self):
        return self.ask("loss")[0]

    def close(self):
        self.process.stdin.write("quit\n")
        self.process.stdin.flush()
        self.process.wait()


class RexServer(LineServer):
    def __init__(self, server, config_path, threads, overrides=(), device="cpu", tf32=False):
        args = [server, "--config", config_path, "--set", f"model.vocab_size={VOCAB}",
                "--set", "psr.schedule=none", "--device", device, "--tf32", str(int(tf32))]
        for override in overrides:
            args += ["--set", override]
        super().__init__(args, dict(os.environ, OMP_NUM_THREADS=str(threads)))

    def config(self):
        """The configuration rex trains, every default filled in: the peers are built from it."""
        return json.loads(self.answer("config"))


class JaxTwin(LineServer):
    """XLA sizes its CPU thread pools from the process's CPU affinity: `threads` CPUs (and, for
    one, no separate Eigen pool)."""

    def __init__(self, config_file, threads):
        env = dict(os.environ)
        if threads == 1:
            env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false")
        super().__init__([sys.executable, os.path.join(ROOT, "bench", "jax_twin.py"),
                          "--config", config_file], env,
                         cpus=sorted(os.sched_getaffinity(0))[:threads])

    def capacity_report(self):
        capacity, compiled, redone = (int(v) for v in self.ask("capacity"))
        return (f"jax: MoE capacity {capacity} rows per expert at the end, {compiled} capacities "
                f"compiled, {redone} steps redone for a larger one")


class TorchTrainer:
    def __init__(self, cfg, folder, device="cpu", compiled=False):
        self.device = device
        self.model = twin.Transformer(cfg).to(device)
        weights, _ = read_safetensors(os.path.join(folder, "model.safetensors"))
        twin.load_weights(self.model, weights)
        batch, _ = read_safetensors(os.path.join(folder, "batch.safetensors"))
        self.ids = torch.from_numpy(batch["ids"]).long().to(device)
        self.targets = torch.from_numpy(batch["targets"]).long().to(device)
        t = cfg["train"]
        self.params = list(self.model.parameters())
        self.optimizer = torch.optim.AdamW(
            [{"params": [p for p in self.params if p.ndim >= 2], "weight_decay": t["weight_decay"]},
             {"params": [p for p in self.params if p.ndim < 2], "weight_decay": 0.0}],
            lr=t["lr"], betas=(t["beta1"], t["beta2"]), eps=t["eps"])
        layers = cfg["model"]["n_layers"]
        pool = cfg["moe"]["reuse"] * cfg["moe"]["experts_per_layer"]
        self.keeps = ([torch.ones(pool, device=device) for _ in range(layers)]
                      if self.model.is_moe else None)
        self.clip = t["grad_clip"]
        self.forward = torch.compile(self.model) if compiled else self.model
        self.last_loss = float("nan")

    def step(self):
        _, loss, _, _ = self.forward(self.ids, self.targets, self.keeps)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss

    def steps(self, n):
        synchronize(self.device)
        start = time.perf_counter()
        for _ in range(n):
            loss = self.step()
        synchronize(self.device)
        elapsed = time.perf_counter() - start
        if n:
            self.last_loss = loss.item()
        return elapsed

    def loss(self):
        return self.last_loss

    def saved_bytes(self):
        """Bytes of the distinct tensors autograd saves for backward in one forward pass."""
        seen = {}

        def pack(tensor):
            seen[tensor.data_ptr()] = tensor.numel() * tensor.element_size()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            _, loss, _, _ = self.model(self.ids, self.targets, self.keeps)
        loss.backward()
        self.optimizer.zero_grad(set_to_none=True)
        return sum(seen.values())

    def close(self):
        pass


def status_mib(key):
    """VmHWM (peak) or VmRSS (current) of this process, in MiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def torch_memory(config_file, folder, threads, compiled, steps=10):
    """Peak resident memory of a fresh process that imports PyTorch and trains `steps` steps, and
    its resident memory right after the import (the baseline). Run as a child of this script."""
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--torch-memory",
                          config_file, folder, "--threads", str(threads), "--steps", str(steps)]
                         + (["--compiled"] if compiled else []),
                         check=True, capture_output=True, text=True).stdout.split()
    return float(out[0]), float(out[1])


def torch_gemm_gflops(size=1024, repeats=5, device="cpu"):
    a, b = torch.randn(size, size, device=device), torch.randn(size, size, device=device)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        torch.mm(a, b)
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size ** 3 / best / 1e9


def available_peers(wanted, device):
    """The peers of `wanted` this Python can run, and a line for each one it cannot."""
    peers, missing = [], []
    for peer in wanted:
        if peer == "compile" and not hasattr(torch, "compile"):
            missing.append(f"compile: torch {torch.__version__} has no torch.compile")
        elif peer == "jax" and device == "cuda":
            missing.append("jax: the JAX twin runs on the CPU only")
        elif peer == "jax":
            try:
                import jax  # noqa: F401
                peers.append(peer)
            except ImportError:
                missing.append(f"jax: not installed for {sys.executable}")
        elif peer in ("eager", "compile"):
            peers.append(peer)
        else:
            sys.exit(f"bench_train: unknown peer '{peer}' (eager, compile, jax)")
    return peers, missing


def make_runner(peer, cfg, config_file, folder, threads, device):
    if peer == "jax":
        runner = JaxTwin(config_file, threads)
        runner.answer(f"load {folder}")
        return runner
    return TorchTrainer(cfg, folder, device, compiled=peer == "compile")


def check_losses(runners, rex_loss, name):
    """Every runner has taken one step from rex's weights: their losses must be rex's."""
    line = [f"rex {rex_loss:.6f}"]
    for label, runner in runners:
        loss = runner.loss()
        rel = abs(loss - rex_loss) / abs(rex_loss)
        line.append(f"{label} {loss:.6f} ({rel:.1e})")
        if not rel <= LOSS_TOLERANCE:
            sys.exit(f"bench_train: {name}: the {label} peer's first loss {loss:.7g} is not rex's "
                     f"{rex_loss:.7g} (relative difference {rel:.2e} > {LOSS_TOLERANCE:.0e}): it "
                     f"does not compute the same model")
    print(f"{name}: first-step losses agree: " + ", ".join(line), flush=True)


def time_runners(runners, args):
    """Median seconds per step of each runner, interleaved, the first one rotating."""
    for _ in range(args.warmup):
        for _, runner in runners:
            runner.steps(args.steps)
    times = {label: [] for label, _ in runners}
    for repeat in range(args.repeats):
        shift = repeat % len(runners)
        for label, runner in runners[shift:] + runners[:shift]:
            times[label].append(runner.steps(args.steps) / args.steps)
    return {label: statistics.median(values) for label, values in times.items()}


def bench_one(name, path, overrides, threads, peers, args, measure_memory):
    """One config at one thread count: the loss check, the timings and (optionally) the memory."""
    torch.set_num_threads(threads)
    rex = RexServer(args.server, path, threads, overrides, args.device, args.tf32)
    cfg = rex.config()
    with tempfile.TemporaryDirectory() as folder:
        config_file = os.path.join(folder, "config.json")
        with open(config_file, "w") as f:
            json.dump(cfg, f)
        rex.answer(f"save {folder}")
        runners = [("rex", rex)] + [(peer, make_runner(peer, cfg, config_file, folder, threads,
                                                       args.device)) for peer in peers]
        for _, runner in runners:
            runner.steps(1)  # compiles the peers: the warm-up of the loss check
        check_losses(runners[1:], rex.loss(), f"{name} ({threads} thr)")
        if args.device == "cpu":
            peak = max(torch_gemm_gflops(), rex.ask("gemm 1024")[0])
        else:
            peak = max(torch_gemm_gflops(4096, device="cuda"), rex.ask("gemm 4096")[0])
        seconds = time_runners(runners, args)
        for label, runner in runners:
            if label == "jax" and cfg["model"]["ffn"] == "moe":
                print(f"{name} ({threads} thr) {runner.capacity_report()}", flush=True)
        memory = {}
        if measure_memory:
            kept, step_peak = rex.ask("memory")
            memory["rex"] = (kept, rex.ask("rss")[0] / 1024, None, step_peak)
            for label, runner in runners[1:]:
                if label == "jax":
                    memory[label] = (runner.ask("memory")[0], runner.ask("rss")[0] / 1024, None,
                                     None)
                else:
                    saved = runner.saved_bytes() if label == "eager" else None
                    rss, base = torch_memory(config_file, folder, threads, label == "compile")
                    memory[label] = (saved, rss, base, None)
        for _, runner in runners:
            runner.close()
    return cfg, peak, seconds, memory


def print_tables(rows):
    labels = list(rows[0][4])
    print()
    print("| config | threads | " + " | ".join(f"{label} ms/step" for label in labels) +
          " | rex tokens/s | " + " | ".join(f"rex vs {label}" for label in labels[1:]) +
          " | rex GFLOP/s | of GEMM peak | best peer of GEMM peak |")
    print("| --- | ---: |" + " ---: |" * (2 * len(labels) + 3))
    for name, threads, cfg, peak, seconds, _ in rows:
        tokens = cfg["train"]["batch_size"] * cfg["model"]["context"]
        flops = training_flops(cfg)
        best_peer = min((s for label, s in seconds.items() if label != "rex"), default=None)
        rex_s = seconds["rex"]
        print(f"| {name} | {threads} | " +
              " | ".join(f"{seconds[label] * 1000:.2f}" for label in labels) +
              f" | {tokens / rex_s:.0f} | " +
              " | ".join(f"{seconds[label] / rex_s:.2f}x" for label in labels[1:]) +
              f" | {flops / rex_s / 1e9:.1f} | {flops / rex_s / 1e9 / peak:.1%} ({peak:.0f}) | " +
              (f"{flops / best_peer / 1e9 / peak:.1%} |" if best_peer else "- |"))
    memory_rows = [r for r in rows if r[5]]
    if memory_rows:
        print()
        print("| config | runner | saved for backward | peak RSS | peak live tensors in a step |")
        print("| --- | --- | ---: | ---: | ---: |")
        for name, _, cfg, _, _, memory in memory_rows:
            tokens = cfg["train"]["batch_size"] * cfg["model"]["context"]
            for label, (saved, rss, base, step_peak) in memory.items():
                saved_text = "-" if saved is None else f"{saved / tokens / 1024:.1f} KiB/token"
                base_text = "" if base is None else f" ({base:.0f} after import)"
                peak_text = "-" if step_peak is None else f"{step_peak / 2 ** 20:.1f} MiB"
                print(f"| {name} | {label} | {saved_text} | {rss:.0f} MiB{base_text} |"
                      f" {peak_text} |")
    print()
    for name in dict.fromkeys(r[0] for r in rows):
        mine = [r for r in rows if r[0] == name]
        best_rex = min(mine, key=lambda r: r[4]["rex"])
        for label in labels[1:]:
            best = min(mine, key=lambda r: r[4][label])
            print(f"{name}: rex at its best ({best_rex[1]} thr, {best_rex[4]['rex'] * 1000:.2f} "
                  f"ms/step) is {best[4][label] / best_rex[4]['rex']:.2f}x {label} at its best "
                  f"({best[1]} thr, {best[4][label] * 1000:.2f} ms/step)")


def torch_memory_child(args):
    """--torch-memory CONFIG FOLDER: train from the saved weights, print peak and baseline MiB."""
    torch.set_num_threads(int(args.threads))
    baseline = status_mib("VmRSS")
    config_file, folder = args.torch_memory
    with open(config_file) as f:
        TorchTrainer(json.load(f), folder, compiled=args.compiled).steps(args.steps)
    print(status_mib("VmHWM"), baseline)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--server", default=os.path.join(ROOT, "build", "bench",
                                                         "train_step_server"))
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--peers", help="comma-separated, of eager,compile,jax "
                                        "(default: all; with --scale: eager)")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--config", action="append", default=[],
                        help="NAME=FILE (default: dense and rex_r4 from examples/configs)")
    parser.add_argument("--scale", action="store_true", help="time the SCALE_LADDER configs")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--tf32", action="store_true", help="TF32 GEMMs on both sides (CUDA)")
    parser.add_argument("--torch-memory", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--compiled", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.torch_memory:
        return torch_memory_child(args)
    if not os.path.exists(args.server):
        sys.exit(f"bench_train: {args.server} not found: build it with cmake --build build "
                 f"--target train_step_server")
    if args.device == "cuda":
        if not torch.cuda.is_available():
            sys.exit("bench_train: --device cuda but PyTorch sees no GPU")
        twin.FUSED_ATTENTION = hasattr(torch.nn.functional, "scaled_dot_product_attention")
        torch.backends.cuda.matmul.allow_tf32 = args.tf32
        torch.backends.cudnn.allow_tf32 = args.tf32
    default_peers = "eager" if args.scale else "eager,compile,jax"
    peers, missing = available_peers((args.peers or default_peers).split(","), args.device)
    for line in missing:
        print(f"bench_train: left out {line}")
    if args.scale:
        base = DEFAULT_CONFIGS["rex_r4"]
        configs = [(label, base, overrides) for label, overrides in SCALE_LADDER]
    else:
        named = dict(c.split("=", 1) for c in args.config) or (
            GPU_CONFIGS if args.device == "cuda" else DEFAULT_CONFIGS)
        configs = [(name, path, []) for name, path in named.items()]
    threads_list = [1] if args.device == "cuda" else [int(v) for v in args.threads.split(",")]
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"{os.cpu_count()} CPUs"
    versions = f"torch {torch.__version__}"
    if "jax" in peers:
        import jax
        versions += f", jax {jax.__version__}"
    print(f"bench_train: {versions}, {where}, {args.repeats} repeats of {args.steps} steps after "
          f"{args.warmup} warm-up blocks; runners rex, {', '.join(peers)}", flush=True)
    rows = []
    for name, path, overrides in configs:
        for threads in threads_list:
            memory_too = args.device == "cpu" and not args.scale and threads == threads_list[-1]
            cfg, peak, seconds, memory = bench_one(name, path, overrides, threads, peers, args,
                                                   memory_too)
            rows.append((name, threads, cfg, peak, seconds, memory))
            print(f"{name} {threads} thr: " + "  ".join(
                f"{label} {value * 1000:.2f} ms/step" for label, value in seconds.items()),
                flush=True)
    print_tables(rows)


if __name__ == "__main__":
    main()
