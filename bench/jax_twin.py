#!/usr/bin/env python3
"""The JAX twin of the rex transformer, for bench/bench_train.py: one jit-compiled training step.

    python3 bench/jax_twin.py --config FULL_CONFIG.json

reads commands on stdin and answers one line each, like bench/train_step_server:
    load DIR  -> "loaded"   the parameters of DIR/model.safetensors and the batch of
                            DIR/batch.safetensors (written by the server's "save DIR")
    steps N   -> "ms T"     N training steps (forward, backward, global-norm clipping, AdamW)
    loss      -> "loss L"   the loss of the last step (computed before its update)
    memory    -> "memory S" bytes of the residuals jax.vjp keeps for backward (one forward pass)
    rss       -> "rss KIB"  peak resident memory of this process
    capacity  -> "capacity C K R"  the MoE capacity now, how many capacities were compiled, and
                            how many steps were redone for a larger one (see below)
    quit

It computes on the CPUs it may run on: XLA sizes its thread pools from the process's CPU affinity
when jax is imported, so the launcher sets the affinity (bench_train.py does, for --threads; by
hand: taskset -c 0 ...) and, for one thread, XLA_FLAGS=--xla_cpu_multi_thread_eigen=false.

The model is written here from the maths of docs/method.md, as twin.py is for PyTorch: RMSNorm,
RoPE (rotate-half, angles in float64 rounded to float32), grouped-query causal attention, SwiGLU,
and the ReX MoE layer (router softmax, top-k, an expert table shared by r layers, the
load-balancing and z losses), tied or untied embeddings, cross-entropy, then clipping and AdamW
(decoupled decay on matrices only, as rex and torch.optim.AdamW). PSR is off (the bench trains
with psr.schedule = none), so every expert of the table is a candidate.

MoE dispatch under jit needs static shapes. jax.lax.ragged_dot, the grouped product, falls back to
a masked dense product on the CPU (every row times every expert: 16x the work of the R4 config),
so the experts run as one batched product over a [experts, capacity, d] buffer instead: the
token-slots are sorted by expert and placed at (expert, rank within the expert). Nothing is
dropped: the step also returns the largest expert's load, and when it exceeds the capacity the
step is thrown away (the state is functional) and redone with the capacity raised to the next
multiple of CAPACITY_QUANTUM above it. After a step that fits, the capacity shrinks to one quantum
above its largest load (loads swing: in the R4 config's first steps the busiest expert takes
several times its fair share, less once the load-balancing loss has acted). jit compiles once per
capacity and keeps it. The padding (capacity minus load per expert), the redone steps and the
compilations are costs rex does not have; they are what exact top-k routing costs under XLA's
static shapes ("capacity" reports them).
"""
import argparse
import json
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests", "reference"))
from safetensors_np import read_safetensors  # noqa: E402

CAPACITY_QUANTUM = 32


def f32(value):
    """A config number rounded to float32, as rex holds it."""
    return float(np.float32(value))


def build(cfg):
    """The jit-compiled step and its helpers for the architecture of `cfg` (a full rex config)."""
    m, moe, t = cfg["model"], cfg["moe"], cfg["train"]
    d, heads, kv_heads = m["d_model"], m["n_heads"], m["n_kv_heads"]
    head_dim, time_steps, layers = d // heads, m["context"], m["n_layers"]
    eps = f32(m["norm_eps"])
    is_moe = m["ffn"] == "moe"
    reuse, top_k = moe["reuse"], moe["top_k"]
    pool = reuse * moe["experts_per_layer"]
    aux_coef, z_coef = f32(moe["aux_loss_coef"] * pool), f32(moe["z_loss_coef"])

    half = head_dim // 2
    inv_freq = f32(m["rope_theta"]) ** (-2.0 * np.arange(half, dtype=np.float64) / head_dim)
    angle = np.arange(time_steps, dtype=np.float64)[:, None] * inv_freq[None, :]
    cos = jnp.asarray(np.concatenate([np.cos(angle)] * 2, -1).astype(np.float32))
    sin = jnp.asarray(np.concatenate([np.sin(angle)] * 2, -1).astype(np.float32))
    causal = jnp.asarray(np.tril(np.ones((time_steps, time_steps), bool)))

    def rms_norm(x, weight):
        return x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + eps) * weight

    def rope(x):  # [B, n, T, D]
        rotated = jnp.concatenate([-x[..., half:], x[..., :half]], -1)
        return x * cos + rotated * sin

    def attention(p, prefix, x):
        batch = x.shape[0]

        def split(y, n):  # [B, T, n*D] -> [B, n, T, D]
            return y.reshape(batch, time_steps, n, head_dim).transpose(0, 2, 1, 3)

        q = rope(split(x @ p[prefix + "q.weight"].T, heads))
        k = rope(split(x @ p[prefix + "k.weight"].T, kv_heads))
        v = split(x @ p[prefix + "v.weight"].T, kv_heads)
        q = q.reshape(batch, kv_heads, heads // kv_heads, time_steps, head_dim)
        scores = jnp.einsum("bkgtd,bksd->bkgts", q, k) / math.sqrt(head_dim)
        weights = jax.nn.softmax(jnp.where(causal, scores, -jnp.inf), -1)
        out = jnp.einsum("bkgts,bksd->bkgtd", weights, v).reshape(batch, heads, time_steps,
                                                                 head_dim)
        return out.transpose(0, 2, 1, 3).reshape(batch, time_steps, d) @ p[prefix + "o.weight"].T

    def swiglu(p, prefix, x):
        gate, up = x @ p[prefix + "gate.weight"].T, x @ p[prefix + "up.weight"].T
        return (jax.nn.silu(gate) * up) @ p[prefix + "down.weight"].T

    def moe_layer(p, prefix, table, x, capacity):
        """x [N, d] -> y [N, d], the aux loss and the largest expert load."""
        tokens = x.shape[0]
        logits = x @ p[prefix + "router.weight"].T
        probs = jax.nn.softmax(logits, -1)
        gates, chosen = jax.lax.top_k(probs, top_k)
        if moe["renormalize"]:
            gates = gates / gates.sum(-1, keepdims=True)
        expert = chosen.reshape(-1)  # the N*k token-slots, token-major
        counts = jnp.bincount(expert, length=pool)
        order = jnp.argsort(expert, stable=True)
        starts = jnp.cumsum(counts) - counts
        rank = jnp.empty_like(expert).at[order].set(jnp.arange(expert.size) - starts[expert[order]])
        slot = jnp.where(rank < capacity, expert * capacity + rank, pool * capacity)
        token_of_slot = jnp.full(pool * capacity + 1, tokens).at[slot].set(
            jnp.arange(expert.size) // top_k)[:-1]
        rows = jnp.concatenate([x, jnp.zeros((1, d), x.dtype)])[token_of_slot]
        rows = rows.reshape(pool, capacity, d)
        hidden = jax.nn.silu(jnp.einsum("ecd,ehd->ech", rows, table["gate"])) * jnp.einsum(
            "ecd,ehd->ech", rows, table["up"])
        out = jnp.einsum("ech,edh->ecd", hidden, table["down"]).reshape(pool * capacity, d)
        out = jnp.concatenate([out, jnp.zeros((1, d), out.dtype)])[slot].reshape(tokens, top_k, d)
        y = jnp.einsum("nkd,nk->nd", out, gates)
        for s in range(moe["shared_experts"]):
            y = y + swiglu(p, f"{prefix}shared.{s}.", x)
        share = jax.lax.stop_gradient(counts.astype(jnp.float32) / (tokens * top_k))
        aux = jnp.sum(share * probs.mean(0)) * aux_coef
        if z_coef > 0:
            aux = aux + jnp.mean(jax.nn.logsumexp(logits, -1) ** 2) * z_coef
        return y, aux, counts.max()

    def loss_fn(p, ids, targets, capacity):
        h = p["embed.weight"][ids]
        aux_loss, max_load = jnp.zeros(()), jnp.zeros((), jnp.int32)
        for layer in range(layers):
            prefix = f"layers.{layer}."
            h = h + attention(p, prefix + "attn.", rms_norm(h, p[prefix + "attn_norm.weight"]))
            x = rms_norm(h, p[prefix + "ffn_norm.weight"])
            if is_moe:
                table = p["tables"][layer // reuse]
                y, aux, load = moe_layer(p, prefix + "moe.", table, x.reshape(-1, d), capacity)
                h = h + y.reshape(h.shape)
                aux_loss, max_load = aux_loss + aux, jnp.maximum(max_load, load)
            else:
                h = h + swiglu(p, prefix + "ffn.", x)
        h = rms_norm(h, p["norm.weight"]).reshape(-1, d)
        head = p["lm_head.weight"] if "lm_head.weight" in p else p["embed.weight"]
        logits = h @ head.T
        lm = jnp.mean(jax.nn.logsumexp(logits, -1) -
                      jnp.take_along_axis(logits, targets.reshape(-1, 1), -1)[:, 0])
        return lm + aux_loss, max_load

    lr, wd, clip = f32(t["lr"]), f32(t["weight_decay"]), t["grad_clip"]
    beta1, beta2, adam_eps = f32(t["beta1"]), f32(t["beta2"]), f32(t["eps"])

    def step(p, state, ids, targets, capacity):
        (loss, max_load), grads = jax.value_and_grad(loss_fn, has_aux=True)(p, ids, targets,
                                                                            capacity)
        leaves = jax.tree_util.tree_leaves(grads)
        norm = jnp.sqrt(sum(jnp.sum(g * g) for g in leaves))
        scale = jnp.minimum(1.0, clip / (norm + 1e-6)) if clip > 0 else 1.0
        count = state["count"] + 1
        fix1, fix2 = 1 - beta1 ** count, 1 - beta2 ** count

        def update(w, g, mean, var):
            g = g * scale
            mean = beta1 * mean + (1 - beta1) * g
            var = beta2 * var + (1 - beta2) * g * g
            decayed = w * (1 - lr * wd) if w.ndim >= 2 else w
            return decayed - lr * (mean / fix1) / (jnp.sqrt(var / fix2) + adam_eps), mean, var

        leaves, tree = jax.tree_util.tree_flatten(p)
        updated = [update(*four) for four in zip(leaves, tree.flatten_up_to(grads),
                                                 tree.flatten_up_to(state["mean"]),
                                                 tree.flatten_up_to(state["var"]))]
        new_p, mean, var = (tree.unflatten(part) for part in zip(*updated))
        return new_p, {"count": count, "mean": mean, "var": var}, loss, max_load

    return jax.jit(step, static_argnums=4), loss_fn, pool, top_k


class Trainer:
    def __init__(self, cfg):
        self.cfg = cfg
        self.is_moe = cfg["model"]["ffn"] == "moe"
        self.step_fn, self.loss_fn, self.pool, self.top_k = build(cfg)
        tokens = cfg["train"]["batch_size"] * cfg["model"]["context"]
        fair_share = tokens * self.top_k / self.pool
        self.capacity = self.round_up(1.25 * fair_share)
        self.capacities, self.redone = {self.capacity}, 0
        self.last_loss = float("nan")

    @staticmethod
    def round_up(load):
        return int(math.ceil(load / CAPACITY_QUANTUM) * CAPACITY_QUANTUM)

    def load(self, folder):
        weights, _ = read_safetensors(os.path.join(folder, "model.safetensors"))
        batch, _ = read_safetensors(os.path.join(folder, "batch.safetensors"))
        params = {k: jnp.asarray(v) for k, v in weights.items() if not k.startswith("expert_")}
        if self.is_moe:
            tables = []
            for table in range(self.cfg["model"]["n_layers"] // self.cfg["moe"]["reuse"]):
                name = f"expert_tables.{table}.experts.{{}}.{{}}.weight"
                tables.append({part: jnp.stack([jnp.asarray(weights[name.format(e, part)])
                                                for e in range(self.pool)])
                               for part in ("gate", "up", "down")})
            params["tables"] = tables
        self.params = params
        zeros = jax.tree_util.tree_map(jnp.zeros_like, params)  # immutable: shared by both moments
        self.state = {"count": jnp.zeros((), jnp.int32), "mean": zeros, "var": zeros}
        self.ids = jnp.asarray(batch["ids"])
        self.targets = jnp.asarray(batch["targets"])

    def step(self):
        while True:
            new_params, new_state, loss, max_load = self.step_fn(self.params, self.state, self.ids,
                                                                 self.targets, self.capacity)
            load = int(max_load)
            if not self.is_moe or load <= self.capacity:
                break
            self.capacity = self.round_up(load)  # the busiest expert did not fit: redo the step
            self.redone += 1
        if self.is_moe:
            self.capacity = min(self.capacity, self.round_up(load + CAPACITY_QUANTUM))
        self.capacities.add(self.capacity)
        self.params, self.state = new_params, new_state
        return loss

    def steps(self, n):
        start = time.perf_counter()
        loss = None
        for _ in range(n):
            loss = self.step()
        if loss is not None:
            self.last_loss = float(loss)  # waits for the last step
        return time.perf_counter() - start

    def residual_bytes(self):
        _, vjp = jax.vjp(lambda p: self.loss_fn(p, self.ids, self.targets, self.capacity)[0],
                         self.params)
        parameters = {id(x) for x in jax.tree_util.tree_leaves(self.params)}
        seen = {id(x): x.nbytes for x in jax.tree_util.tree_leaves(vjp) if id(x) not in parameters}
        return sum(seen.values())


def peak_rss_kib():
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return -1


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="a full rex config (every key filled in)")
    args = parser.parse_args()
    with open(args.config) as config_file:
        trainer = Trainer(json.load(config_file))
    for line in sys.stdin:
        command, *rest = line.split()
        if command == "load":
            trainer.load(rest[0])
            answer = "loaded"
        elif command == "steps":
            answer = f"ms {trainer.steps(int(rest[0])) * 1000:.6f}"
        elif command == "loss":
            answer = f"loss {trainer.last_loss:.9g}"
        elif command == "memory":
            answer = f"memory {trainer.residual_bytes()}"
        elif command == "rss":
            answer = f"rss {peak_rss_kib()}"
        elif command == "capacity":
            answer = f"capacity {trainer.capacity} {len(trainer.capacities)} {trainer.redone}"
        elif command == "quit":
            return
        else:
            sys.exit(f"jax_twin: unknown command {command}")
        print(answer, flush=True)


if __name__ == "__main__":
    main()
