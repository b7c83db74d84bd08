"""The optimizer: Muon for the hidden weight matrices, AdamW for everything else, in one torch.optim.Optimizer.

    opt = build_optimizer(model, cfg.optim)          # cfg.optim: config.OptimConfig
    for step in range(total):
        apply_schedules(opt, step, total, cfg.optim)  # lr warmup/warmdown, Muon momentum warmup
        loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)

Param groups (every group carries "kind", "lr" and "initial_lr"; `opt.state_dict()` round-trips exactly):
- Muon: every 2-D weight inside the transformer blocks (q, k, v, o, gate, up, down), one group per shape. Update:
  Nesterov momentum (buf = m*buf + (1-m)*g; u = (1-m)*g + m*buf), then `newton_schulz` (5 steps of the quintic
  (3.4445, -4.7750, 2.0315), in bf16 where the hardware has fast bf16, else fp32), then
  p -= lr * max(1, rows/cols)**0.5 * u (decoupled weight decay p *= 1 - lr*wd first).
- AdamW (weight decay 0): the token embedding, the lm_head and the RMSNorm weights.

Hyperparameter scaling rule (nanochat's, for the depth dial): Muon's lr (`matrix_lr`) is width-independent because
the orthogonalised update has unit spectral scale and the rows/cols factor makes it shape-aware; the AdamW lrs
(`embed_lr`, `head_lr`, `scalar_lr`) are tuned at width 768 and multiplied by (n_embd / 768) ** -0.5. With tied
embeddings the one shared matrix takes `head_lr` (the head is the sensitive use). Schedules are pure functions of the
step: `lr_multiplier` (linear warmup, constant, linear warmdown to `final_lr_frac`) and `muon_momentum`
(0.85 -> 0.95 over the first 300 steps).

Under FSDP2 (`--parallel fsdp`) the parameters are DTensor shards: Muon gathers each matrix's update
(`full_tensor()`, one all-gather per matrix), runs Newton-Schulz on the whole matrices on every rank (the same
arithmetic everywhere) and keeps its own shard of the result; momentum buffers and AdamW state stay sharded.

Speed: Newton-Schulz runs batched over same-shape matrices with bmm/baddbmm (one call per shape group instead of a
per-matrix loop; faster on bench-ref, see `chatsmith bench train`); AdamW is torch's fused (or foreach) kernel
through the functional `torch.optim.adamw.adamw`, so it equals torch.optim.AdamW bit for bit.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn
from torch.optim.adamw import adamw as adamw_functional

from .common import has_fast_bf16

NS_COEFFS = (3.4445, -4.7750, 2.0315)


# ---------------------------------------------------------------------------------------------------------------------
# schedules (pure functions)


def lr_multiplier(step: int, total_steps: int, warmup_frac: float, warmdown_frac: float,
                  final_lr_frac: float) -> float:
    """Multiplier of the peak lr at 0-based `step`: linear warmup over round(warmup_frac * total) steps, then 1, then a
    linear decay over the last round(warmdown_frac * total) steps that reaches `final_lr_frac` at step == total."""
    warmup = round(warmup_frac * total_steps)
    warmdown = round(warmdown_frac * total_steps)
    if step < warmup:
        return (step + 1) / warmup
    if step <= total_steps - warmdown:
        return 1.0
    progress = (total_steps - step) / warmdown  # 1 -> 0 over the warmdown
    return progress + (1 - progress) * final_lr_frac


def muon_momentum(step: int, warmup_steps: int = 300, start: float = 0.85, end: float = 0.95) -> float:
    """Muon's momentum: linear from `start` to `end` over the first `warmup_steps` steps, then `end`."""
    frac = min(step / warmup_steps, 1.0)
    return (1 - frac) * start + frac * end


def apply_schedules(opt: MuonAdamW, step: int, total_steps: int, cfg) -> None:
    """Set every group's lr (initial_lr * lr_multiplier) and the Muon momentum for 0-based `step`."""
    mult = lr_multiplier(step, total_steps, cfg.warmup_frac, cfg.warmdown_frac, cfg.final_lr_frac)
    momentum = muon_momentum(step)
    for group in opt.param_groups:
        group["lr"] = group["initial_lr"] * mult
        if group["kind"] == "muon":
            group["momentum"] = momentum


# ---------------------------------------------------------------------------------------------------------------------
# Newton-Schulz


def newton_schulz(G: torch.Tensor, steps: int = 5, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Approximately orthogonalise each matrix of G (..., rows, cols) -> about U V^T of its SVD, in `dtype`.

    Each step maps X -> a X + b (X X^T) X + c (X X^T)^2 X with the quintic (3.4445, -4.7750, 2.0315), which pushes
    every singular value of the Frobenius-normalised input towards 1 fast but not exactly: after 5 steps they land in
    about [0.68, 1.13] for well-conditioned inputs (tiny ones stay smaller). Works on the wide orientation
    (rows <= cols) and batches with bmm/baddbmm.

    For clearly wide matrices in fp32 (cols > 1.5 rows) it runs in Gram form: every X_k is Q_k X_0 where Q_k is a
    polynomial of A_0 = X_0 X_0^T, so the steps can iterate on rows x rows matrices only (A_k, P_k = aI + bA_k + cA_k^2,
    Q_k = P_k Q_{k-1}, A_{k+1} = P_k^2 A_k) and X_0 is touched twice. Same result up to rounding (1e-5 here), 34 %
    fewer FLOPs for 256 x 768. Not in bf16, where squaring A costs accuracy.
    """
    a, b, c = NS_COEFFS
    tall = G.size(-2) > G.size(-1)
    X = G.to(dtype)
    if tall:
        X = X.mT
    lead = X.shape[:-2]
    X = X.reshape(-1, X.size(-2), X.size(-1))  # (N, rows, cols), rows <= cols
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # spectral norm <= Frobenius norm = 1
    rows, cols = X.shape[-2:]
    if dtype in (torch.float32, torch.float64) and cols > 1.5 * rows:
        A = torch.bmm(X, X.mT)  # (N, rows, rows)
        Q = None
        for k in range(steps):
            P = torch.baddbmm(A, A, A, beta=b, alpha=c)  # b A + c A^2
            P.diagonal(dim1=-2, dim2=-1).add_(a)  # + a I
            Q = P if Q is None else torch.bmm(P, Q)
            if k < steps - 1:
                A = torch.bmm(P, torch.bmm(P, A))  # X_{k+1} X_{k+1}^T = P A P = P^2 A (all commute)
        X = torch.bmm(Q, X)
    else:
        for _ in range(steps):
            A = torch.bmm(X, X.mT)  # (N, rows, rows)
            B = torch.baddbmm(A, A, A, beta=b, alpha=c)  # b A + c A^2
            X = torch.baddbmm(X, B, X, beta=a, alpha=1.0)  # a X + B X
    X = X.reshape(lead + X.shape[-2:])
    return X.mT if tall else X


# ---------------------------------------------------------------------------------------------------------------------
# the optimizer


class MuonAdamW(torch.optim.Optimizer):
    """Muon groups (kind="muon": lr, momentum, weight_decay, ns_steps) and AdamW groups (kind="adamw": lr, betas, eps,
    weight_decay) in one optimizer, so that the loop, the schedules and the checkpoint see a single object."""

    def __init__(self, param_groups: list[dict], ns_dtype: torch.dtype = torch.float32):
        defaults = dict(lr=0.0, weight_decay=0.0)
        super().__init__(param_groups, defaults)
        self.ns_dtype = ns_dtype
        for group in self.param_groups:
            if group.get("kind") not in ("muon", "adamw"):
                raise ValueError("every param group needs kind='muon' or kind='adamw'")
            group.setdefault("initial_lr", group["lr"])
            if group["kind"] == "muon":
                shapes = {tuple(p.shape) for p in group["params"]}
                if len(shapes) != 1 or len(next(iter(shapes))) != 2:
                    raise ValueError(f"a Muon group holds 2-D matrices of one shape, not {sorted(shapes)}")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["kind"] == "muon":
                self._muon_group(group)
            else:
                self._adamw_group(group)
        return loss

    def _adamw_group(self, group: dict) -> None:
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        exp_avgs, exp_avg_sqs, steps = [], [], []
        for p in params:
            state = self.state[p]
            if not state:
                state["step"] = torch.tensor(0.0)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        fused = all(p.device.type in ("cpu", "cuda") for p in params)
        beta1, beta2 = group["betas"]
        adamw_functional(params, [p.grad for p in params], exp_avgs, exp_avg_sqs, [], steps,
                         foreach=None if fused else True, fused=fused or None, amsgrad=False, beta1=beta1,
                         beta2=beta2, lr=group["lr"], weight_decay=group["weight_decay"], eps=group["eps"],
                         maximize=False)

    def _muon_group(self, group: dict) -> None:
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        bufs = []
        for p in params:
            state = self.state[p]
            if not state:
                state["momentum_buffer"] = torch.zeros_like(p)
            bufs.append(state["momentum_buffer"])
        grads = [p.grad for p in params]
        m = group["momentum"]
        torch._foreach_lerp_(bufs, grads, 1 - m)  # buf = m * buf + (1 - m) * g
        updates = torch._foreach_lerp(grads, bufs, m)  # Nesterov: (1 - m) * g + m * buf
        sharded = _is_dtensor(params[0])
        if sharded:  # FSDP2: Newton-Schulz needs whole matrices: gather each (all-gather), keep this rank's shard
            updates = [u.full_tensor() for u in updates]
        stacked = torch.stack(updates)  # (N, rows, cols)
        ortho = newton_schulz(stacked, group["ns_steps"], self.ns_dtype).to(stacked.dtype)
        ortho = list(ortho.unbind(0))
        if sharded:  # every rank computed the same whole update: each takes its own shard, no communication
            from torch.distributed.tensor import distribute_tensor

            ortho = [distribute_tensor(o, p.device_mesh, p.placements, src_data_rank=None)
                     for o, p in zip(ortho, params, strict=True)]
        rows, cols = params[0].shape
        lr = group["lr"]
        if group["weight_decay"]:
            torch._foreach_mul_(params, 1 - lr * group["weight_decay"])
        torch._foreach_add_(params, ortho, alpha=-lr * max(1.0, rows / cols) ** 0.5)


def _is_dtensor(t: torch.Tensor) -> bool:
    """Whether `t` is a DTensor (a parameter sharded by FSDP2), without importing torch.distributed otherwise."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def build_optimizer(model: nn.Module, cfg) -> MuonAdamW:
    """MuonAdamW for a chatsmith GPT with the learning rates of `cfg` (config.OptimConfig); see the module docstring."""
    n_embd = model.config.n_embd
    adam_scale = (n_embd / 768) ** -0.5
    tied = getattr(model, "lm_head", None) is None
    embed, head, scalars = [], [], []
    muon_by_shape: dict[tuple[int, ...], list[nn.Parameter]] = defaultdict(list)
    for name, p in model.named_parameters():
        if name.startswith("embed_tokens."):
            (head if tied else embed).append(p)
        elif name.startswith("lm_head."):
            head.append(p)
        elif name.startswith("blocks.") and p.dim() == 2:
            muon_by_shape[tuple(p.shape)].append(p)
        elif p.dim() == 1:
            scalars.append(p)
        else:
            raise ValueError(f"build_optimizer does not know where {name} {tuple(p.shape)} belongs")
    adam = dict(kind="adamw", betas=tuple(cfg.adam_betas), eps=cfg.adam_eps, weight_decay=0.0)
    groups = [dict(adam, name="embed", params=embed, lr=cfg.embed_lr * adam_scale),
              dict(adam, name="head", params=head, lr=cfg.head_lr * adam_scale),
              dict(adam, name="scalars", params=scalars, lr=cfg.scalar_lr * adam_scale)]
    for shape, params in muon_by_shape.items():
        groups.append(dict(kind="muon", name=f"muon {shape[0]}x{shape[1]}", params=params, lr=cfg.matrix_lr,
                           momentum=muon_momentum(0), weight_decay=cfg.weight_decay, ns_steps=5))
    groups = [g for g in groups if g["params"]]
    device = next(model.parameters()).device.type
    ns_dtype = torch.bfloat16 if has_fast_bf16(device) else torch.float32
    return MuonAdamW(groups, ns_dtype=ns_dtype)
