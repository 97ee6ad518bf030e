#!/usr/bin/env python3
"""The PyTorch twin of the rex transformer: redoes one rex training step and compares everything.

Usage: python3 twin.py DIR [--perturb NAME]
       python3 twin.py DIR --train S [--autocast]

DIR is written by tests/reference/dump_rex (config.json, model.safetensors, inputs.safetensors,
expected.safetensors; see dump_rex.cpp and docs/formats.md). The twin builds the same model as a
torch.nn.Module, written from the model's math (not translated from rex's C++), so that agreement
is evidence that both are right. Parameter names come out of nn.Module's own naming and equal
rex's, so the checkpoint maps one to one. It loads the weights, draws the PSR masks itself from
the seed, the step and each mask's place (psr_masks below; every psr.mask_scope and
psr.tie_block), requires rex's dumped masks to be the same, runs forward + backward on the
same batch with them, clips the gradients and takes one torch.optim.AdamW step, all
in float32, and compares against rex: the logits, the three losses, every gradient (before
clipping), the global gradient norm, and every parameter's AdamW update.

Every comparison but the update is norm-wise relative, ||twin - rex|| / max(||rex||, TINY),
against one bound per group, derived from the model's sizes by tolerances() below, not measured
(docs/testing.md, "Tolerances"). The script checks everything, prints one summary line per group
and one line per failing tensor, and exits 1 if anything failed (2 for unreadable inputs), 0
otherwise. --perturb NAME multiplies rex's expected tensor NAME by 1.01 first, to show that a 1%
error is caught.

The bounds (error_bounds.py): rex and PyTorch evaluate the same float32 math in other orders (other
GEMM blocking, vector widths and FMA use, which also differ between machines), so each side is
within gamma_N of the exact result and the two within 2 gamma_N, N counted along the model by
chain_lengths(). These first-order bounds sit hundreds of times above what two machines give, and
a 1% error (--perturb) still stands 25-65 times above them.

The optimizer step is compared as the update, element by element, against a bound of its own.
At step 1 AdamW moves a weight by -lr * wd * p - lr * u with u(g) = g / (|g| + eps) (g the
clipped gradient): a sign normalisation. Where |g| is near eps (a gradient that cancels down to
the rounding level of its terms), u depends on digits of g that are rounding noise; a gradient that
is zero up to rounding can even flip sign and move by +lr in one implementation and -lr in the
other. Since |u'(g)| = eps / (|g| + eps)^2 falls with |g| (and |u| < 1),
    |u(g_twin) - u(g_rex)| <= min(2, |g_twin - g_rex| * eps / (m + eps)^2),
m = min(|g_twin|, |g_rex|) when the signs agree, else 0: the part of the update difference that
the measured gradient difference explains (the grad group bounds that difference). Each side's
own arithmetic adds at most gamma_2 |p| (the decay), gamma_11 lr (the 11 roundings from g to
lr * u: m, v, sqrt, the bias corrections, eps, the division) and u |after| (the final add). An
element fails when |after_twin - after_rex| exceeds lr times the first plus twice the second.
Where the gradient term dominates, the bound is tight to first order (u' hardly changes between
g_twin and g_rex), so a worst |diff| / bound close to 1 there is expected, not a near miss.
"""

import argparse
import json
import math
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from error_bounds import U, chain_lengths, gamma
from safetensors_np import TwinError, read_safetensors

# Attention through torch's fused scaled_dot_product_attention instead of the explicit softmax.
# Off for the twin checks (PyTorch 1.13 has no such kernel); bench_train.py turns it on for the GPU
# benchmark so that PyTorch runs its best attention.
FUSED_ATTENTION = False

def tolerances(cfg, sizes):
    """The bound of each group (module docstring): twice each side's gamma_N. sizes: the element
    count of every parameter tensor."""
    tol = {group: 2 * gamma(terms) for group, terms in chain_lengths(cfg).items()}
    # | ||g_twin|| - ||g_rex|| | <= ||g_twin - g_rex||, which the grad bound limits relative to the
    # norm of all gradients together; plus torch's own float32 norm (per tensor, then over the
    # tensors: gamma of the largest tensor plus the tensor count; rex sums in double).
    tol["grad_norm"] = tol["grad"] + gamma(max(sizes) + len(sizes) + 2)
    return tol


TINY = 1e-30  # denominator floor: a tensor that is exactly zero in rex must be zero in the twin
PERTURB_FACTOR = 1.01


# ---------------------------------------------------------------------------------------------
# The model, from the math.


def f32(value):
    """A config number rounded to float32, as rex holds it (eps, theta, coefficients, AdamW)."""
    return float(np.float32(value))


def rms_norm(x, weight, eps):
    """x * rsqrt(mean(x^2) + eps) * weight over the last axis."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)


class SwiGLU(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.gate = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


def rope_tables(time, head_dim, theta, device=None):
    """cos, sin [T, D] for rotate-half RoPE: angles in float64, rounded to float32."""
    half = head_dim // 2
    inv_freq = theta ** (-2.0 * torch.arange(half, dtype=torch.float64, device=device) / head_dim)
    angle = torch.arange(time, dtype=torch.float64, device=device)[:, None] * inv_freq[None, :]
    cos, sin = angle.cos().float(), angle.sin().float()
    return torch.cat([cos, cos], -1), torch.cat([sin, sin], -1)


def apply_rope(x, cos, sin):
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], -1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, dim, heads, kv_heads, theta):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim, self.theta = heads, kv_heads, dim // heads, theta
        self.q = nn.Linear(dim, heads * self.head_dim, bias=False)
        self.k = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.v = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.o = nn.Linear(heads * self.head_dim, dim, bias=False)

    def forward(self, x):
        batch, time, _ = x.shape
        cos, sin = rope_tables(time, self.head_dim, self.theta, x.device)

        def split(t, n):  # [B, T, n*D] -> [B, n, T, D]
            return t.reshape(batch, time, n, self.head_dim).transpose(1, 2)

        q = apply_rope(split(self.q(x), self.heads), cos, sin)
        k = apply_rope(split(self.k(x), self.kv_heads), cos, sin)
        v = split(self.v(x), self.kv_heads)
        group = self.heads // self.kv_heads  # query head h reads kv head h // group
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
        if FUSED_ATTENTION:  # PyTorch's own fused kernel, for the GPU benchmark only
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim)
            future = torch.ones(time, time, dtype=torch.bool, device=x.device).triu(1)
            out = scores.masked_fill(future, float("-inf")).softmax(-1) @ v
        merged = out.transpose(1, 2).reshape(batch, time, self.heads * self.head_dim)
        return self.o(merged)


class ExpertTable(nn.Module):
    """The r*N experts of one block; registered once, used by the block's r layers."""

    def __init__(self, size, dim, hidden):
        super().__init__()
        self.experts = nn.ModuleList(SwiGLU(dim, hidden) for _ in range(size))


class MoE(nn.Module):
    def __init__(self, dim, pool, moe):
        super().__init__()
        self.top_k, self.renormalize = moe["top_k"], moe["renormalize"]
        self.gating = moe.get("gating", "softmax_topk")
        self.aux_coef = f32(moe["aux_loss_coef"] * pool)
        self.z_coef = f32(moe["z_loss_coef"])
        self.router = nn.Linear(dim, pool, bias=False)
        self.shared = nn.ModuleList(SwiGLU(dim, moe["d_expert"])
                                    for _ in range(moe["shared_experts"]))

    def forward(self, x, table, keep):
        """x [N, d]; keep [P] or [N, P] float (1 = may be chosen, for every token or per token).
        Returns y [N, d] and the aux loss."""
        tokens, pool = x.shape[0], len(table.experts)
        logits = self.router(x)
        probs = logits.softmax(-1)
        if self.gating == "topk_softmax":  # Megatron-LM: top-k of the logits, softmax over k
            top, chosen = torch.topk(logits.masked_fill(keep == 0, float("-inf")), self.top_k,
                                     dim=-1)
            gates = top.softmax(-1)
        else:  # the paper: masked experts score -1 (not 0), below any underflowed probability
            gates, chosen = torch.topk(probs * keep + (keep - 1), self.top_k, dim=-1)
        if self.renormalize:
            gates = gates / gates.sum(-1, keepdim=True)
        y = torch.zeros_like(x)
        for e in range(pool):
            token, slot = (chosen == e).nonzero(as_tuple=True)
            if token.numel() == 0:  # unused: no gradient at all (and so no AdamW step), as in rex
                continue
            out = table.experts[e](x[token]) * gates[token, slot].unsqueeze(-1)
            y = y.index_add(0, token, out)
        for expert in self.shared:
            y = y + expert(x)
        share = torch.bincount(chosen.flatten(), minlength=pool).float() / (tokens * self.top_k)
        aux = (share * probs.mean(0)).sum() * self.aux_coef
        if self.z_coef > 0:
            aux = aux + torch.logsumexp(logits, -1).pow(2).mean() * self.z_coef
        return y, aux


class Block(nn.Module):
    def __init__(self, cfg, pool):
        super().__init__()
        m = cfg["model"]
        eps = f32(m["norm_eps"])
        self.attn_norm = RMSNorm(m["d_model"], eps)
        self.attn = Attention(m["d_model"], m["n_heads"], m["n_kv_heads"],
                              f32(m["rope_theta"]))
        self.ffn_norm = RMSNorm(m["d_model"], eps)
        if m["ffn"] == "moe":
            self.moe = MoE(m["d_model"], pool, cfg["moe"])
        else:
            self.ffn = SwiGLU(m["d_model"], m["d_ff"])

    def forward(self, h, table, keep):
        """Returns the new residual stream and this layer's aux loss (None for a dense layer)."""
        h = h + self.attn(self.attn_norm(h))
        x = self.ffn_norm(h)
        if table is None:
            return h + self.ffn(x), None
        y, aux = self.moe(x.reshape(-1, x.shape[-1]), table, keep)
        return h + y.reshape(h.shape), aux


class Transformer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        m, moe = cfg["model"], cfg["moe"]
        self.is_moe = m["ffn"] == "moe"
        self.reuse = moe["reuse"]
        pool = moe["reuse"] * moe["experts_per_layer"]
        self.embed = nn.Embedding(m["vocab_size"], m["d_model"])
        self.layers = nn.ModuleList(Block(cfg, pool) for _ in range(m["n_layers"]))
        if self.is_moe:
            self.expert_tables = nn.ModuleList(
                ExpertTable(pool, m["d_model"], moe["d_expert"])
                for _ in range(m["n_layers"] // moe["reuse"]))
        self.norm = RMSNorm(m["d_model"], f32(m["norm_eps"]))
        if not m["tie_embeddings"]:
            self.lm_head = nn.Linear(m["d_model"], m["vocab_size"], bias=False)

    def forward(self, ids, targets, keeps):
        """Returns logits [B*T, V], loss, lm_loss, aux_loss."""
        h = self.embed(ids)
        aux_loss = torch.zeros((), device=ids.device)
        for index, layer in enumerate(self.layers):
            table = self.expert_tables[index // self.reuse] if self.is_moe else None
            h, aux = layer(h, table, keeps[index] if self.is_moe else None)
            if aux is not None:
                aux_loss = aux_loss + aux
        h = self.norm(h).reshape(-1, h.shape[-1])
        head = self.lm_head.weight if hasattr(self, "lm_head") else self.embed.weight
        logits = F.linear(h, head)
        lm_loss = F.cross_entropy(logits, targets.reshape(-1))
        return logits, lm_loss + aux_loss, lm_loss, aux_loss


# ---------------------------------------------------------------------------------------------
# Comparison.


class Report:
    """Collects per-tensor errors by group; prints failures as they come and a summary per group."""

    def __init__(self, tolerances):
        self.tolerances = tolerances  # group -> bound (tolerances(); the update's is per element)
        self.groups = {}  # group -> list of (name, measure, max_abs)
        self.failed = False

    def fail(self, message):
        print(f"FAIL {message}")
        self.failed = True

    def compare(self, group, name, twin, rex):
        """Norm-wise relative error of twin against rex (float64 arithmetic on the values)."""
        twin, rex = np.asarray(twin, np.float64), np.asarray(rex, np.float64)
        if twin.shape != rex.shape:
            self.fail(f"{name}: twin shape {list(twin.shape)} != rex shape {list(rex.shape)}")
            return
        diff = twin - rex
        rel = np.linalg.norm(diff) / max(np.linalg.norm(rex), TINY)
        where = np.unravel_index(np.argmax(np.abs(diff)), diff.shape) if diff.size else ()
        max_abs = float(np.abs(diff[where])) if diff.size else 0.0
        self.groups.setdefault(group, []).append((name, rel, max_abs))
        tol = self.tolerances[group]
        if not rel <= tol:  # also catches NaN
            self.fail(f"{name}: relative error {rel:.3e} > tolerance {tol:.2e}; "
                      f"max |diff| {max_abs:.3e} at {list(map(int, where))}: "
                      f"twin {twin[where]:.9g}, rex {rex[where]:.9g}")

    def compare_update(self, name, twin, rex, bound):
        """|twin - rex| <= bound element by element; the group's measure is max |diff| / bound."""
        twin, rex = np.asarray(twin, np.float64), np.asarray(rex, np.float64)
        diff = np.abs(twin - rex)
        ratio = np.where(diff > 0, diff / np.maximum(bound, TINY), 0.0)
        ratio[np.isnan(diff)] = np.inf
        where = np.unravel_index(np.argmax(ratio), ratio.shape) if ratio.size else ()
        worst = float(ratio[where]) if ratio.size else 0.0
        self.groups.setdefault("update", []).append(
            (name, worst, float(diff.max()) if diff.size else 0.0))
        if not worst <= 1.0:
            self.fail(f"{name}: {int((ratio > 1).sum())} elements beyond their bound; worst "
                      f"|diff| {diff[where]:.3e} > bound {bound[where]:.3e} at "
                      f"{list(map(int, where))}: twin {twin[where]:.9g}, rex {rex[where]:.9g}")

    def summary(self):
        for group, rows in self.groups.items():
            name, measure, _ = max(rows, key=lambda r: r[1])
            max_abs = max(r[2] for r in rows)
            tol = self.tolerances[group]
            status = "ok" if all(r[1] <= tol for r in rows) else "FAILED"
            what = "max |diff|/bound" if group == "update" else "max rel"
            print(f"{group:<10} {len(rows):4d} tensors  {what} {measure:.3e} ({name})  "
                  f"max |diff| {max_abs:.3e}  tol {tol:.2e}  {status}")


# ---- PSR masks, drawn here from the method's description (rex/nn/psr.hpp) -----------------------
# N_t from the schedule; each mask the first rN - N_t picks of a partial Fisher-Yates shuffle of
# the maskable experts, driven by rex's counter-based Generator (draw n = mix64(mix64(seed) ^ n),
# integers by rejection), seeded by hashing the mask's place: (seed, step, layer) for the step
# scope, then the sequence's index in the batch, then the token's position in its sequence.
# Compared against the masks rex dumped (psr_keep.{l}), so the twin checks rex's masks as well.
MASK64 = (1 << 64) - 1


def mix64(x):
    x = (x + 0x9E3779B97F4A7C15) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def psr_candidates(psr, n, reuse, step):
    pool, schedule = reuse * n, psr["schedule"]
    if schedule == "none" or reuse == 1:
        return pool
    t_s, t_e = psr["t_start"], psr["t_end"]
    if schedule == "stepwise":
        if step < t_s:
            return n
        return pool if step >= t_e else (2 + (reuse - 2) * (step - t_s) // (t_e - t_s)) * n
    if step <= t_s:
        return n
    return pool if step > t_e else n + (reuse - 1) * n * (step - t_s) // (t_e - t_s)


def fisher_yates_mask(seed, pool, masked, kept):
    """keep [pool] of 1s with `masked` 0s drawn from the experts outside range `kept`."""
    order = [e for e in range(pool) if e not in kept]
    keep, counter = [1.0] * pool, 0
    for i in range(masked):
        n = len(order) - i
        limit = MASK64 - MASK64 % n
        while True:
            x = mix64(mix64(seed) ^ counter)
            counter += 1
            if x < limit:
                break
        j = i + x % n
        order[i], order[j] = order[j], order[i]
        keep[order[i]] = 0.0
    return keep


def psr_masks(cfg, step, batch, length):
    """Per layer: keep [P] (step scope, or nothing masked) or [batch * length, P]."""
    m, moe, psr = cfg["model"], cfg["moe"], cfg["psr"]
    n, reuse, seed = moe["experts_per_layer"], moe["reuse"], cfg["train"]["seed"]
    pool = n * reuse
    masked = pool - psr_candidates(psr, n, reuse, step)
    scope = psr.get("mask_scope", "step")
    masks = []
    for layer in range(m["n_layers"]):
        if masked == 0:
            masks.append(torch.ones(pool))
            continue
        kept = range(layer % reuse * n, (layer % reuse + 1) * n) \
            if psr["masks"] == "own_first" else range(0)
        mask_layer = layer // reuse if psr.get("tie_block", False) else layer
        step_seed = mix64(mix64(seed ^ 0x50535200) ^ step) ^ mix64(mask_layer)
        if scope == "step":
            masks.append(torch.tensor(fisher_yates_mask(step_seed, pool, masked, kept)))
            continue
        rows = []
        for sequence in range(batch):
            sequence_seed = mix64(mix64(step_seed) ^ sequence)
            if scope == "sequence":
                rows += [fisher_yates_mask(sequence_seed, pool, masked, kept)] * length
            else:
                rows += [fisher_yates_mask(mix64(mix64(sequence_seed) ^ position), pool, masked,
                                           kept) for position in range(length)]
        masks.append(torch.tensor(rows))
    return masks


def load_inputs(folder):
    try:
        with open(os.path.join(folder, "config.json")) as f:
            cfg = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise TwinError(f"twin.py: {folder}/config.json: cannot read ({e})") from e
    for section in ("model", "moe", "psr", "train"):
        if section not in cfg:
            raise TwinError(f"twin.py: {folder}/config.json: missing section '{section}'")
    weights, _ = read_safetensors(os.path.join(folder, "model.safetensors"))
    inputs, input_meta = read_safetensors(os.path.join(folder, "inputs.safetensors"))
    if "step" not in input_meta:
        raise TwinError("twin.py: inputs.safetensors: metadata has no step")
    expected, meta = read_safetensors(os.path.join(folder, "expected.safetensors"))
    if "grad_norm" not in meta:
        raise TwinError("twin.py: expected.safetensors: metadata has no grad_norm")
    return cfg, weights, inputs, int(input_meta["step"]), expected, float(meta["grad_norm"])


def load_weights(model, weights):
    params = dict(model.named_parameters())
    if set(params) != set(weights):
        raise TwinError(f"twin.py: model.safetensors does not hold the twin's parameters: "
                        f"missing {sorted(set(params) - set(weights))}, "
                        f"unexpected {sorted(set(weights) - set(params))}")
    with torch.no_grad():
        for name, p in params.items():
            if tuple(p.shape) != weights[name].shape:
                raise TwinError(f"twin.py: model.safetensors: '{name}' is "
                                f"{list(weights[name].shape)}, the twin expects {list(p.shape)}")
            p.copy_(torch.from_numpy(weights[name]))


def make_optimizer(params, t):
    """rex's AdamW: decay on the matrices only, the config's train hyperparameters as floats."""
    decay = [p for p in params.values() if p.ndim >= 2]
    no_decay = [p for p in params.values() if p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": f32(t["weight_decay"])},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=f32(t["lr"]), betas=(f32(t["beta1"]), f32(t["beta2"])),
                             eps=f32(t["eps"]))


def run(folder, perturb):
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    cfg, weights, inputs, step, expected, rex_norm = load_inputs(folder)
    if perturb is not None:
        if perturb not in expected:
            raise TwinError(f"twin.py: --perturb {perturb}: expected.safetensors has no such "
                            f"tensor")
        expected[perturb] = expected[perturb] * np.float32(PERTURB_FACTOR)
        print(f"perturbed rex's {perturb} by x{PERTURB_FACTOR}: this run must fail")

    model = Transformer(cfg)
    load_weights(model, weights)
    names = [name for name, _ in model.named_parameters()]
    wanted = {"logits", "loss", "lm_loss", "aux_loss"} | {f"{kind}.{n}" for n in names
                                                          for kind in ("grad", "after")}
    if set(expected) != wanted:
        raise TwinError(f"twin.py: expected.safetensors: missing "
                        f"{sorted(wanted - set(expected))}, unexpected "
                        f"{sorted(set(expected) - wanted)}")
    ids = torch.from_numpy(inputs["ids"]).long()
    targets = torch.from_numpy(inputs["targets"]).long()
    keeps = None
    if model.is_moe:
        keeps = psr_masks(cfg, step, ids.shape[0], ids.shape[1])
        for layer, keep in enumerate(keeps):
            name = f"psr_keep.{layer}"
            if name not in inputs or not torch.equal(torch.from_numpy(inputs[name]).float(), keep):
                raise TwinError(f"twin.py: rex's {name} is not the mask the twin draws")
    if model.is_moe and cfg["psr"].get("masks") == "own_first":
        # The variant's promise, checked here rather than taken from rex: layer l keeps the N
        # experts it owns, pool indices [(l mod r) N, (l mod r + 1) N).
        n, r = cfg["moe"]["experts_per_layer"], cfg["moe"]["reuse"]
        for layer, keep in enumerate(keeps):
            own = keep[..., layer % r * n:(layer % r + 1) * n]
            if not bool((own == 1).all()):
                raise TwinError(f"twin.py: psr_keep.{layer} masks one of the layer's own experts "
                                f"under psr.masks = own_first: {keep.tolist()}")

    sizes = [p.numel() for p in model.parameters()]
    report = Report(dict(tolerances(cfg, sizes), update=1.0))
    logits, loss, lm_loss, aux_loss = model(ids, targets, keeps)
    report.compare("logits", "logits", logits.detach(), expected["logits"])
    for name, value in (("loss", loss), ("lm_loss", lm_loss), ("aux_loss", aux_loss)):
        report.compare("losses", name, value.detach(), expected[name])

    loss.backward()
    params = dict(model.named_parameters())
    grads = {n: (p.grad.numpy().copy() if p.grad is not None else np.zeros(p.shape, np.float32))
             for n, p in params.items()}
    for n in names:
        report.compare("grad", f"grad.{n}", grads[n], expected[f"grad.{n}"])

    t = cfg["train"]
    norm = torch.nn.utils.clip_grad_norm_(list(params.values()), t["grad_clip"])
    report.compare("grad_norm", "grad_norm", float(norm), rex_norm)

    optimizer = make_optimizer(params, t)
    optimizer.step()
    # The gradients AdamW saw: the twin's clipped in place; rex's clipped as rex does it (the f32
    # product with the f32 scale, so these are rex's bits).
    coef = t["grad_clip"] / (rex_norm + 1e-6)
    rex_scale = np.float32(coef) if t["grad_clip"] > 0 and coef < 1.0 else np.float32(1.0)
    lr, eps = f32(t["lr"]), f32(t["eps"])
    gradient_set = total = 0
    for n in names:
        p = params[n]
        g_twin = (p.grad.numpy() if p.grad is not None else np.zeros(p.shape, np.float32))
        g_twin = g_twin.astype(np.float64)
        g_rex = (expected[f"grad.{n}"] * rex_scale).astype(np.float64)
        same_sign = np.sign(g_twin) == np.sign(g_rex)
        m = np.where(same_sign, np.minimum(abs(g_twin), abs(g_rex)), 0.0)
        from_gradients = lr * np.minimum(2.0, abs(g_twin - g_rex) * eps / (m + eps) ** 2)
        after_twin, after_rex = p.detach().numpy(), expected[f"after.{n}"]
        own = (gamma(2) * abs(weights[n].astype(np.float64)) + gamma(11) * lr
               + U * np.maximum(abs(after_twin), abs(after_rex)).astype(np.float64))
        report.compare_update(f"after.{n}", after_twin, after_rex, from_gradients + 2 * own)
        gradient_set += int((from_gradients > 2 * own).sum())
        total += from_gradients.size
    print(f"update: {gradient_set} of {total} elements have a bound set mostly by the gradient "
          f"difference (|g| near eps)")
    report.summary()
    print("twin: FAILED" if report.failed else "twin: all checks passed")
    return 1 if report.failed else 0


def train(folder, steps, autocast):
    """S training steps on the dumped batch (PSR steps T .. T + S - 1), optionally under
    torch.autocast's bf16 on the CPU; prints {"losses": [...], "loss_after": ...} as JSON, the
    same figures dump_rex --steps S writes (tests/reference/check_bf16_twin.sh compares them)."""
    torch.set_num_threads(1)
    cfg, weights, inputs, step, _, _ = load_inputs(folder)
    model = Transformer(cfg)
    load_weights(model, weights)
    ids = torch.from_numpy(inputs["ids"]).long()
    targets = torch.from_numpy(inputs["targets"]).long()
    t = cfg["train"]
    params = dict(model.named_parameters())
    optimizer = make_optimizer(params, t)

    def forward(at):
        keeps = psr_masks(cfg, at, ids.shape[0], ids.shape[1]) if model.is_moe else None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            return model(ids, targets, keeps)[1].float()

    losses = []
    for i in range(steps):
        optimizer.zero_grad()
        loss = forward(step + i)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(params.values()), t["grad_clip"])
        optimizer.step()
        losses.append(float(loss))
    with torch.no_grad():
        after = float(forward(step + steps))
    print(json.dumps({"losses": losses, "loss_after": after}))
    return 0


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("dir", help="folder written by dump_rex")
    parser.add_argument("--perturb", metavar="NAME",
                        help="multiply rex's expected tensor NAME by 1.01 before comparing")
    parser.add_argument("--train", metavar="S", type=int,
                        help="train S steps on the dumped batch instead, print the losses as JSON")
    parser.add_argument("--autocast", action="store_true",
                        help="with --train: under torch.autocast (bf16, CPU)")
    args = parser.parse_args()
    try:
        if args.train:
            return train(args.dir, args.train, args.autocast)
        return run(args.dir, args.perturb)
    except TwinError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
