"""Slow, obviously-correct references that the fast paths are held equal to.

Written from the paper's definitions, not from sparsemoe's code: per-row loops, kth_excluding
by literally excluding element i, every expert computed for every token. Differentiable, so
gradients can be compared too.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def phi(z: Tensor) -> Tensor:
    """Standard normal CDF."""
    return 0.5 * (1.0 + torch.erf(z / math.sqrt(2.0)))


def naive_noisy_top_k(x, w_gate, w_noise, k, noise=None, train=True, noise_epsilon=1e-2):
    """Eqs. 3–5 and 8–10 row by row. Returns (gates [T, n], load [n], P [T, n] or None)."""
    clean = x @ w_gate
    n = clean.shape[1]
    noisy_on = w_noise is not None and train
    if noisy_on:
        stddev = F.softplus(x @ w_noise) + noise_epsilon
        h = clean + noise * stddev
    else:
        h = clean
    gate_rows, p_rows = [], []
    for t in range(clean.shape[0]):
        order = sorted(range(n), key=lambda i, t=t: -float(h[t, i].detach()))
        kept = order[:k]
        kept_logits = torch.stack([h[t, i] for i in kept])
        kept_gates = torch.exp(kept_logits - kept_logits.max())
        kept_gates = kept_gates / kept_gates.sum()
        row = [h.new_zeros(()) for _ in range(n)]
        for i, g in zip(kept, kept_gates, strict=True):
            row[i] = g
        gate_rows.append(torch.stack(row))
        if noisy_on and k < n:
            p = []
            for i in range(n):
                others = torch.cat([h[t, :i], h[t, i + 1 :]])
                kth_excluding = others.sort(descending=True).values[k - 1]
                p.append(phi((clean[t, i] - kth_excluding) / stddev[t, i]))
            p_rows.append(torch.stack(p))
    gates = torch.stack(gate_rows) if gate_rows else clean.new_zeros(0, n)
    if noisy_on and k < n:
        prob = torch.stack(p_rows) if p_rows else clean.new_zeros(0, n)
        return gates, prob.sum(0), prob
    return gates, (gates > 0).to(gates.dtype).sum(0), None


def naive_cv_squared(v: Tensor) -> Tensor:
    """Population variance over squared mean, with the reference code's epsilons."""
    size = v.numel() + 1e-10
    mean = v.sum() / size
    return ((v - mean) ** 2).sum() / size / (mean**2 + 1e-10)


def naive_hierarchical(x, wgp, wnp, wgs, wns, k1, k2, noise_p, noise_s, train=True, eps=1e-2):
    """Appendix B with every secondary gate computed for every token.

    Returns (dense gates [T, a, b], importance_H [a·b], load_H [a·b]).
    """
    a = wgs.shape[0]
    gp, load_p, _ = naive_noisy_top_k(x, wgp, wnp, k1, noise_p, train, eps)
    in_group = gp > 0  # X^(i)
    gates, loads = [], []
    for i in range(a):
        ns = None if noise_s is None else noise_s[:, i]
        wn = None if wns is None else wns[i]
        gi, _, prob = naive_noisy_top_k(x, wgs[i], wn, k2, ns, train, eps)
        gates.append(gp[:, i : i + 1] * gi)
        member = in_group[:, i : i + 1].to(x.dtype)
        counted = prob if prob is not None else (gi > 0).to(x.dtype)
        load_i = (counted * member).sum(0)
        size = in_group[:, i].sum().to(x.dtype)
        loads.append(load_p[i] * load_i / (size + 1e-10))
    dense = torch.stack(gates, dim=1)  # [T, a, b]
    return dense, dense.sum(0).reshape(-1), torch.stack(loads).reshape(-1)


def ffn_expert(x, w1, b1, w2, b2, activation="relu"):
    """One feed-forward expert on all of x."""
    h = x @ w1 + (b1 if b1 is not None else 0)
    if activation in ("swiglu", "geglu"):
        g, u = h.chunk(2, dim=-1)
        h = (F.silu(g) if activation == "swiglu" else F.gelu(g)) * u
    else:
        h = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh,
             "sigmoid": torch.sigmoid}[activation](h)
    return h @ w2 + (b2 if b2 is not None else 0)


def dense_moe(x: Tensor, gates: Tensor, experts) -> Tensor:
    """y = Σ_i G(x)_i E_i(x) with every expert computed for every token (eq. 1)."""
    out = x.new_zeros(x.shape[0], x.shape[1])
    for i, expert in enumerate(experts):
        out = out + gates[:, i : i + 1] * expert(x)
    return out


def naive_capacity(expert_indices, valid, num_experts, capacity, group_size=None, priority=None):
    """Pairs kept under an expert capacity, filled one pair at a time (GShard Algorithm 1):
    for each group, choice 1 of every token, then choice 2, ...; tokens in order, or by
    decreasing priority (ties in token order). Returns a [T, k] bool list of lists."""
    idx = expert_indices.tolist()
    t = len(idx)
    k = expert_indices.shape[1]
    ok = [[True] * k for _ in range(t)] if valid is None else valid.tolist()
    keep = [[False] * k for _ in range(t)]
    size = group_size or t
    rank = None if priority is None else priority.detach().tolist()
    for start in range(0, t, max(size, 1)):
        tokens = list(range(start, start + size))
        if rank is not None:
            tokens.sort(key=lambda i: -rank[i])
        used = [0] * num_experts
        for j in range(k):
            for i in tokens:
                e = idx[i][j]
                if ok[i][j] and used[e] < capacity:
                    keep[i][j] = True
                    used[e] += 1
    return keep


def dense_gates(expert_indices, combine_weights, num_experts, keep=None):
    """The [T, n] gate matrix of a routing grid (weights of kept pairs; a repeated expert adds)."""
    t, k = expert_indices.shape
    gates = combine_weights.new_zeros(t, num_experts)
    for i in range(t):
        for j in range(k):
            if keep is None or keep[i][j]:
                e = int(expert_indices[i, j])
                gates[i, e] = gates[i, e] + combine_weights[i, j]
    return gates


# ---- the routing family, from the papers' definitions (row/column loops, float64) ----------


def naive_softmax(logits: Tensor, dim: int = -1) -> Tensor:
    """exp(v - max) / Σ exp(v - max) along ``dim``, one slice at a time."""
    moved = logits.movedim(dim, -1)
    flat = moved.reshape(-1, moved.shape[-1])
    rows = [torch.exp(r - r.max()) / torch.exp(r - r.max()).sum() for r in flat]
    out = torch.stack(rows).reshape(moved.shape) if rows else moved.clone()
    return out.movedim(-1, dim)


def naive_switch_loss(probs: Tensor, dispatched: Tensor) -> Tensor:
    """N · Σ_i f_i · P_i; ``dispatched [T, n]`` counts each token's dispatches to expert i."""
    t, n = probs.shape
    if t == 0:
        return probs.sum() * 0
    return n * sum(dispatched[:, i].sum() / t * (probs[:, i].sum() / t) for i in range(n))


def naive_z_loss(logits: Tensor) -> Tensor:
    """(1/T) Σ_x (log Σ_i exp(logits_i))²."""
    if logits.shape[0] == 0:
        return logits.sum() * 0
    return sum(torch.log(torch.exp(row).sum()) ** 2 for row in logits) / logits.shape[0]


def naive_aux(router, logits, probs, gates, dispatched):
    """The configured auxiliary losses of a LinearRouter from their definitions."""
    return (router.w_importance * naive_cv_squared(gates.sum(0))
            + router.w_switch * naive_switch_loss(probs, dispatched)
            + router.w_z * naive_z_loss(logits))


def ranked_experts(row: Tensor) -> list:
    """Expert indices of one row in decreasing value."""
    values = row.detach().tolist()
    return sorted(range(len(values)), key=lambda i: -values[i])


def naive_top_k(probs: Tensor, k: int, normalize: bool) -> Tensor:
    """Top-k gates [T, n]: the k largest probabilities, optionally renormalised (Mixtral)."""
    gates = torch.zeros_like(probs)
    rows = []
    for t in range(probs.shape[0]):
        kept = ranked_experts(probs[t])[:k]
        total = sum(probs[t, i] for i in kept)
        row = [probs.new_zeros(()) for _ in range(probs.shape[1])]
        for i in kept:
            row[i] = probs[t, i] / total if normalize else probs[t, i]
        rows.append(torch.stack(row))
    return torch.stack(rows) if rows else gates


def naive_column_top(scores: Tensor, m: int) -> Tensor:
    """[T, n] 0/1: the m largest entries of each column (ties to the earlier token)."""
    mask = torch.zeros_like(scores)
    for i, column in enumerate(scores.detach().T.tolist()):
        for t in sorted(range(len(column)), key=lambda r: -column[r])[:m]:
            mask[t, i] = 1.0
    return mask


def naive_soft_moe(x, phi, scale, slots_per_expert, experts):
    """Soft MoE for inputs ``x [G, m, d]`` slot by slot and token by token (Puigcerver et al.,
    Algorithm 1): logits from l2-normalised tokens and Φ times ``scale`` (or raw when scale is
    None), dispatch softmax over tokens, combine softmax over slots."""
    outputs, slot_inputs = [], []
    for tokens in x:
        if scale is None:
            logits = tokens @ phi
        else:
            xn = torch.stack([r / torch.sqrt((r * r).sum()) for r in tokens])
            pn = torch.stack([c / torch.sqrt((c * c).sum()) for c in phi.T]).T
            logits = scale * (xn @ pn)
        dispatch = naive_softmax(logits, dim=0)
        combine = naive_softmax(logits, dim=1)
        slots = [sum(dispatch[i, j] * tokens[i] for i in range(tokens.shape[0]))
                 for j in range(logits.shape[1])]
        ys = [experts[j // slots_per_expert](s[None])[0] for j, s in enumerate(slots)]
        outputs.append(torch.stack([sum(combine[i, j] * ys[j] for j in range(len(ys)))
                                    for i in range(tokens.shape[0])]))
        slot_inputs.append(torch.stack(slots))
    return torch.stack(outputs), torch.stack(slot_inputs)


# ---- the Deep Mixture of Experts (Eigen, Ranzato and Sutskever 2013) -----------------------


def naive_gate_network(x, w_hidden, b_hidden, w_gate, b_gate):
    """g(x) = softmax(B·relu(A·x + a) + b), one row at a time, as logits and probabilities."""
    hidden = torch.stack([torch.clamp(row @ w_hidden + b_hidden, min=0) for row in x]) \
        if x.shape[0] else x.new_zeros(0, w_hidden.shape[1])
    logits = hidden @ w_gate + (0 if b_gate is None else b_gate)
    return logits, naive_softmax(logits)


def linear_expert(x, w, b, activation="relu"):
    """f(x) = act(x·W + b) on all of x."""
    y = x @ w + (0 if b is None else b)
    return {None: lambda v: v, "relu": F.relu, "tanh": torch.tanh}[activation](y)


def naive_margin_constraint(gates, totals, margin):
    """Eigen et al.'s constraint on dense gates [T, n], one example after another: an expert
    whose running total is more than ``margin`` above the mean of the totals gets gate 0 and
    the rest are renormalised; the totals add the renormalised gates.

    Returns (mask [T, n] bool, constrained gates [T, n], totals after) with the gates
    differentiable in ``gates``."""
    totals = list(totals)
    n = len(totals)
    mask, rows = [], []
    for row in gates:
        mean = sum(totals) / n
        keep = [totals[i] - mean <= margin for i in range(n)]
        kept = sum(row[i] for i in range(n) if keep[i])
        new = torch.stack([row[i] / kept if keep[i] else row[i] * 0 for i in range(n)])
        for i in range(n):
            totals[i] += float(new[i].detach())
        mask.append(keep)
        rows.append(new)
    return torch.tensor(mask, dtype=torch.bool), torch.stack(rows), totals
