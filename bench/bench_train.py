#!/usr/bin/env python3
"""Training-step benchmark: rex against its PyTorch twin, interleaved in one run.

    python3 bench/bench_train.py [--server build/bench/train_step_server] [--threads 1,2]
                                 [--repeats 15] [--steps 4] [--warmup 3] [--config NAME=FILE ...]
                                 [--device cpu|cuda] [--tf32] [--compile]

For each config and thread count, rex (bench/train_step_server, a subprocess) and the PyTorch twin
(tests/reference/twin.py's Transformer, in this process) alternate blocks of --steps training steps
(forward, backward, global-norm clipping, AdamW), starting each repeat with the other one, after
--warmup blocks each. Printed: median ms/step of each, tokens/s, the ratio of rex's tokens/s to
PyTorch's, and rex's achieved GFLOP/s as a share of the machine's GEMM peak, measured in the same
run (the best of PyTorch's and rex's 1024^3 products at that thread count). Then the memory: peak
resident memory of each process, and the bytes a forward pass keeps alive for backward per token
(rex: its allocation counter; PyTorch: the tensors autograd saves, through saved_tensors_hooks).

Both sides train the same architecture from the same JSON config, on a fixed random batch; PSR
masking is switched off (psr.schedule = none) since it does not change the work per step. Their
equality is the business of the twin tests (ctest -R twin), not of this script. PyTorch runs with
OPENBLAS_NUM_THREADS=1 (see below) and torch.set_num_threads(threads).

With --device cuda both run on the GPU (threads do not apply; the defaults become the GPU-sized
configs gpu_dense and gpu_rex_r4), every timing waits for the GPU, the GEMM peak is the best 4096^3
product, --tf32 lets both sides use TF32 tensor cores for GEMMs, and --compile adds a third runner,
the twin under torch.compile (PyTorch 2.x). The twin's attention is then PyTorch's fused
scaled_dot_product_attention. The memory table is CPU-only.
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

DEFAULT_CONFIGS = {
    "dense": os.path.join(ROOT, "examples", "configs", "dense.json"),
    "rex_r4": os.path.join(ROOT, "examples", "configs", "tiny_rex.json"),
}
GPU_CONFIGS = {
    "gpu_dense": os.path.join(ROOT, "examples", "configs", "gpu_dense.json"),
    "gpu_rex_r4": os.path.join(ROOT, "examples", "configs", "gpu_rex_r4.json"),
}
VOCAB = 73  # the King James Bible's byte vocabulary


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


class RexServer:
    def __init__(self, server, config_path, threads, device="cpu", tf32=False):
        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        args = [server, "--config", config_path, "--set", f"model.vocab_size={VOCAB}",
                "--set", "psr.schedule=none", "--device", device, "--tf32", str(int(tf32))]
        self.process = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        text=True, env=env)

    def answer(self, command):
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"train_step_server stopped answering '{command}'")
        return line

    def ask(self, command):
        return [float(v) for v in self.answer(command).split()[1:]]

    def config(self):
        """The configuration rex trains, every default filled in: the twin is built from it."""
        return json.loads(self.answer("config"))

    def steps(self, n):
        return self.ask(f"steps {n}")[0] / 1000.0

    def close(self):
        self.process.stdin.write("quit\n")
        self.process.stdin.flush()
        self.process.wait()


class TorchTrainer:
    def __init__(self, cfg, device="cpu", compiled=False):
        torch.manual_seed(cfg["train"]["seed"])
        self.device = device
        self.model = twin.Transformer(cfg).to(device)
        t = cfg["train"]
        self.params = list(self.model.parameters())
        self.optimizer = torch.optim.AdamW(
            [{"params": [p for p in self.params if p.ndim >= 2], "weight_decay": t["weight_decay"]},
             {"params": [p for p in self.params if p.ndim < 2], "weight_decay": 0.0}],
            lr=t["lr"], betas=(t["beta1"], t["beta2"]), eps=t["eps"])
        batch, time_steps = t["batch_size"], cfg["model"]["context"]
        self.ids = torch.randint(0, VOCAB, (batch, time_steps), device=device)
        self.targets = torch.randint(0, VOCAB, (batch, time_steps), device=device)
        layers = cfg["model"]["n_layers"]
        pool = cfg["moe"]["reuse"] * cfg["moe"]["experts_per_layer"]
        self.keeps = ([torch.ones(pool, device=device) for _ in range(layers)]
                      if self.model.is_moe else None)
        self.clip = t["grad_clip"]
        self.forward = torch.compile(self.model) if compiled else self.model

    def step(self):
        _, loss, _, _ = self.forward(self.ids, self.targets, self.keeps)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def steps(self, n):
        synchronize(self.device)
        start = time.perf_counter()
        for _ in range(n):
            self.step()
        synchronize(self.device)
        return time.perf_counter() - start

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


def status_mib(key):
    """VmHWM (peak) or VmRSS (current) of this process, in MiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def torch_memory(cfg, threads, steps=10):
    """Peak resident memory of a fresh process that imports PyTorch and trains `steps` steps, and
    its resident memory right after the import (the baseline). Run as a child of this script."""
    with tempfile.NamedTemporaryFile("w", suffix=".json") as config_file:
        json.dump(cfg, config_file)
        config_file.flush()
        out = subprocess.run([sys.executable, os.path.abspath(__file__), "--torch-memory",
                              config_file.name, "--threads", str(threads), "--steps", str(steps)],
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


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--server", default=os.path.join(ROOT, "build", "bench",
                                                         "train_step_server"))
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--config", action="append", default=[],
                        help="NAME=FILE (default: dense and rex_r4 from examples/configs)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--tf32", action="store_true", help="TF32 GEMMs on both sides (CUDA)")
    parser.add_argument("--compile", action="store_true",
                        help="also time the twin under torch.compile (CUDA)")
    parser.add_argument("--torch-memory", metavar="FULL_CONFIG", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.device == "cuda":
        return main_cuda(args)
    if args.torch_memory:  # child mode of torch_memory()
        torch.set_num_threads(int(args.threads))
        baseline = status_mib("VmRSS")
        with open(args.torch_memory) as config_file:
            TorchTrainer(json.load(config_file)).steps(args.steps)
        print(status_mib("VmHWM"), baseline)
        return
    if not os.path.exists(args.server):
        sys.exit(f"bench_train: {args.server} not found: build it with cmake --build build "
                 f"--target train_step_server")
    configs = dict(c.split("=", 1) for c in args.config) or DEFAULT_CONFIGS
    threads_list = [int(v) for v in args.threads.split(",")]

    print(f"bench_train: torch {torch.__version__}, {os.cpu_count()} CPUs, "
          f"{args.repeats} repeats of {args.steps} steps after {args.warmup} warm-up blocks")
    rows = []
    for name, path in configs.items():
        probe = RexServer(args.server, path, 1)
        cfg = probe.config()
        probe.close()
        tokens = cfg["train"]["batch_size"] * cfg["model"]["context"]
        flops = training_flops(cfg)
        for threads in threads_list:
            torch.set_num_threads(threads)
            rex = RexServer(args.server, path, threads)
            peak = max(torch_gemm_gflops(), rex.ask("gemm 1024")[0])
            trainer = TorchTrainer(cfg)
            for _ in range(args.warmup):
                rex.steps(args.steps)
                trainer.steps(args.steps)
            rex_times, torch_times = [], []
            for repeat in range(args.repeats):
                order = [(rex, rex_times), (trainer, torch_times)]
                for runner, times in (order if repeat % 2 == 0 else order[::-1]):
                    times.append(runner.steps(args.steps) / args.steps)
            rex_ms = statistics.median(rex_times) * 1000
            torch_ms = statistics.median(torch_times) * 1000
            kept, step_peak = rex.ask("memory")
            rex_rss = rex.ask("rss")[0] / 1024
            rex.close()
            torch_saved = trainer.saved_bytes()
            torch_peak, torch_base = torch_memory(cfg, threads)
            rex_gflops = flops / (rex_ms / 1000) / 1e9
            rows.append((name, threads, rex_ms, torch_ms, tokens, rex_gflops, peak, kept,
                         torch_saved, step_peak, rex_rss, torch_peak, torch_base))
            print(f"{name:7s} {threads} thr: rex {rex_ms:7.2f} ms/step ({tokens / rex_ms * 1000:7.0f}"
                  f" tok/s)  torch {torch_ms:7.2f} ms/step ({tokens / torch_ms * 1000:7.0f} tok/s)"
                  f"  rex/torch speed {torch_ms / rex_ms:5.2f}x  rex {rex_gflops:5.1f} GFLOP/s ="
                  f" {rex_gflops / peak:5.1%} of the {peak:.0f} GFLOP/s GEMM peak", flush=True)
    print()
    print("| config | threads | rex ms/step | PyTorch ms/step | rex tokens/s | PyTorch tokens/s |"
          " speed-up | rex GFLOP/s | of GEMM peak |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, threads, rex_ms, torch_ms, tokens, gflops, peak, *_ in rows:
        print(f"| {name} | {threads} | {rex_ms:.2f} | {torch_ms:.2f} | {tokens / rex_ms * 1000:.0f}"
              f" | {tokens / torch_ms * 1000:.0f} | {torch_ms / rex_ms:.2f}x | {gflops:.1f} |"
              f" {gflops / peak:.1%} ({peak:.0f}) |")
    print()
    print("| config | rex saved for backward | PyTorch saved for backward | rex peak live tensors"
          " in a step | rex peak RSS | PyTorch peak RSS (after `import torch`) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, threads, _, _, tokens, _, _, kept, saved, step_peak, rss, t_peak, t_base in rows:
        if threads != threads_list[-1]:
            continue
        print(f"| {name} | {kept / tokens / 1024:.1f} KiB/token | {saved / tokens / 1024:.1f}"
              f" KiB/token | {step_peak / 2 ** 20:.1f} MiB | {rss:.0f} MiB | {t_peak:.0f} MiB"
              f" ({t_base:.0f} MiB) |")
    print()
    for name in configs:
        mine = [r for r in rows if r[0] == name]
        best_rex = min(mine, key=lambda r: r[2])
        best_torch = min(mine, key=lambda r: r[3])
        print(f"{name}: rex at its best ({best_rex[1]} threads, {best_rex[2]:.2f} ms/step) is "
              f"{best_torch[3] / best_rex[2]:.2f}x PyTorch at its best ({best_torch[1]} threads, "
              f"{best_torch[3]:.2f} ms/step) in tokens/s")


def main_cuda(args):
    """The GPU benchmark: rex, PyTorch eager and (with --compile) torch.compile, interleaved."""
    if not torch.cuda.is_available():
        sys.exit("bench_train: --device cuda but PyTorch sees no GPU")
    twin.FUSED_ATTENTION = hasattr(torch.nn.functional, "scaled_dot_product_attention")
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    torch.backends.cudnn.allow_tf32 = args.tf32
    configs = dict(c.split("=", 1) for c in args.config) or GPU_CONFIGS
    print(f"bench_train: torch {torch.__version__} on {torch.cuda.get_device_name()}, "
          f"TF32 {'on' if args.tf32 else 'off'}, {args.repeats} repeats of {args.steps} steps "
          f"after {args.warmup} warm-up blocks")
    rows = []
    for name, path in configs.items():
        rex = RexServer(args.server, path, 1, "cuda", args.tf32)
        cfg = rex.config()
        tokens = cfg["train"]["batch_size"] * cfg["model"]["context"]
        flops = training_flops(cfg)
        peak = max(torch_gemm_gflops(4096, device="cuda"), rex.ask("gemm 4096")[0])
        runners = [("rex", rex), ("eager", TorchTrainer(cfg, "cuda"))]
        if args.compile:
            runners.append(("compile", TorchTrainer(cfg, "cuda", compiled=True)))
        for _ in range(args.warmup):
            for _, runner in runners:
                runner.steps(args.steps)
        times = {label: [] for label, _ in runners}
        for repeat in range(args.repeats):
            order = runners[repeat % len(runners):] + runners[:repeat % len(runners)]
            for label, runner in order:
                times[label].append(runner.steps(args.steps) / args.steps)
        rex.close()
        ms = {label: statistics.median(values) * 1000 for label, values in times.items()}
        rows.append((name, tokens, flops, peak, ms))
        print(f"{name}: " + "  ".join(f"{label} {value:.2f} ms/step" for label, value in ms.items()),
              flush=True)
    print()
    print("| config | runner | ms/step | tokens/s | rex speed-up | TFLOP/s | of GEMM peak |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for name, tokens, flops, peak, ms in rows:
        for label, value in ms.items():
            tflops = flops / (value / 1000) / 1e12
            print(f"| {name} | {label} | {value:.2f} | {tokens / value * 1000:.0f} |"
                  f" {value / ms['rex']:.2f}x | {tflops:.1f} | {tflops * 1e3 / peak:.1%}"
                  f" ({peak / 1e3:.0f}) |")


if __name__ == "__main__":
    main()
