"""Rounding-error bounds for comparing two float32 evaluations of a rex model (the PyTorch twin,
and train_tiny_rex on the emulated CUDA device against the CPU). Standard library only.

Two implementations of the same float32 math differ in the order of their sums (GEMM blocking,
vector widths, FMA use, reduction trees: they also differ between machines), so each is within the
usual rounding-error bound of the exact result and the two within twice that. An n-term sum is
within gamma_n = n u / (1 - n u) (u = 2^-24) of exact relative to the sum of its terms' magnitudes
(Higham, Accuracy and Stability of Numerical Algorithms, 2nd ed., Lemma 3.1 and (3.5)); every other
operation is one rounding (gamma_1), and a math-library call (exp, log, rsqrt) is within 2 ulp =
4 u. Errors along a chain of operations compose as (1 + gamma_a)(1 + gamma_b) <= 1 + gamma_(a+b)
(Lemma 3.3), so a quantity at the end of a chain of N such terms is within gamma_N, and two
implementations within 2 gamma_N. chain_lengths() counts N for a model config, adding every stage
of a layer rather than only its longest branch. The bound is first order and componentwise: it
assumes no stage amplifies relative errors, which holds for these models at these scales (small
init_std, O(1) activations, RMS norms far above norm_eps); docs/testing.md, "Tolerances".
"""

U = 2.0 ** -24  # unit roundoff of float32
CALL = 4  # one math-library call: within 2 ulp = 4 u


def gamma(n):
    """Higham's gamma_n = n u / (1 - n u): the relative error bound of n roundings in a chain."""
    return n * U / (1 - n * U)


def chain_lengths(cfg):
    """N for the logits, the losses (one batch of train.batch_size sequences) and the gradients."""
    m, moe = cfg["model"], cfg["moe"]
    d, time, vocab = m["d_model"], m["context"], m["vocab_size"]
    head_dim, tokens = d // m["n_heads"], cfg["train"]["batch_size"] * m["context"]
    norm = d + CALL + 2  # mean of d squares, rsqrt, x * r * w
    attention = (norm + d  # q, k, v: d-term dot products
                 + 4  # RoPE: x cos + rotated sin, the tables rounded from float64
                 + head_dim + 1  # scores, scaled
                 + 1 + CALL + time + 1  # softmax: x - max, exp, the T-term sum, the division
                 + time + d + 1)  # P V (T terms), the output projection, the residual add
    if m["ffn"] == "moe":
        pool = moe["reuse"] * moe["experts_per_layer"]
        ffn = (norm + d + 1 + CALL + pool + 1 + moe["top_k"] + 1  # router, softmax, renormalised
               + d + CALL + 3 + 1  # gate and up projections, silu, silu * up
               + moe["d_expert"] + 1  # down projection, times the gate
               + moe["top_k"] + moe["shared_experts"] + 1)  # the experts' sum, the residual add
        reuse = moe["reuse"]
    else:
        ffn = norm + d + CALL + 3 + 1 + m["d_ff"] + 1
        reuse = 1
    logits = m["n_layers"] * (attention + ffn) + norm + d  # the final norm and the head
    # log-sum-exp over the vocabulary (x - max, exp, V terms, log, + max), minus the target logit,
    # the mean over the batch's tokens.
    losses = logits + 1 + CALL + vocab + CALL + 1 + 1 + tokens
    # Backward retraces the forward chain with the same reduction lengths (transposed products,
    # the softmax and norm row dots), then each weight's gradient sums over the tokens that used it
    # (an expert table's over its reuse layers; a tied embedding's also over the head).
    grads = 2 * losses + tokens * max(reuse, 2)
    return {"logits": logits, "losses": losses, "grad": grads}
