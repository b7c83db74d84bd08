"""The model: a Qwen3-shaped decoder-only transformer, top to bottom in one file.

    from chatsmith.model import GPT, ModelConfig
    cfg = ModelConfig(depth=4).resolve(vocab_size=8192)   # width = depth * aspect, heads = width / head_dim
    model = GPT.build(cfg, device="cpu")                  # built on the meta device, then init_weights()
    loss = model(idx, targets)                            # idx, targets: (B, T) int64; targets -1 are ignored
    logits = model(idx)                                   # (B, T, vocab) fp32
    cache = model.new_kv_cache(slots=4)                   # inference: keys/values of 4 sequences, preallocated
    logits = model.forward_cached(idx, cache, slots=[0])  # append idx (1, T) to slot 0 -> (1, T, vocab)

Per block: RMSNorm -> attention (q, k, v, o without bias; grouped-query with n_kv_head; per-head RMSNorm on q and k
*before* RoPE; NEOX RoPE, i.e. rotate_half; causal SDPA) -> residual; RMSNorm -> SwiGLU MLP -> residual. Then a final
RMSNorm and an untied lm_head. This is exactly HF transformers' `Qwen3ForCausalLM` (tested to 1e-4 in fp32 in
tests/test_model.py), so `to_hf_state_dict()` + `hf_config_dict()` are all the export needs.

Notable choices:
Speed: on CPU a training step is bound by matmuls and by memory traffic (a fresh large tensor costs page faults; an
in-place op does not), so the tricks below remove whole intermediate tensors (measured with `chatsmith bench train`):
- `chunked_cross_entropy`: lm_head + loss in 512-row chunks, gradients made in the forward pass into reused buffers;
  the (B*T, vocab) logits never exist.
- RMSNorm with a hand-written backward (F.rms_norm's CPU backward is many small ops).
- Per-head q/k norm + RoPE fused in one function writing straight into SDPA's (B, H, T, D) layout.
- q, k, v made contiguous (B, H, T, D) for SDPA: the CPU flash kernel's forward is faster on it.
- Tried and dropped (no gain beyond noise): one matmul for q, k, v (weights concatenated per call) or for gate/up;
  loss chunks of 256/1024/2048 rows; a Python block-causal attention instead of SDPA; oneDNN linear instead of MKL.
- Parameters stay separate (q, k, v, gate, up) and named as in HF: the HF mapping is a rename and Muon
  orthogonalises each logical matrix.
- Init (nanochat-like): token embedding N(0, 1); lm_head N(0, 0.001); q, k, v, gate, up uniform with bound
  sqrt(3 / n_embd) (i.e. std 1/sqrt(n_embd)); the projections back into the residual stream (o, down) zero, so each
  block starts as the identity; norm weights one. With tied embeddings the shared matrix is N(0, 1/sqrt(n_embd)) so
  that the initial logits have unit scale.
- Inference: `new_kv_cache(slots)` preallocates keys/values for a fixed number of sequence slots and
  `forward_cached(idx, cache, slots)` appends tokens to any subset of them, each at its own length (the engine's
  continuous batching, chunked prefill, restored prefixes). It runs the fused inference path of chatsmith/kvcache.py
  (its own weight layout, rebuilt when a parameter changes); `fused=False` runs these modules block by block, the
  reference it is tested against. The training path only gains an `is None` test per layer. RoPE tables cover
  `rope_factor * seq_len` positions, so a cache may be longer than seq_len.
- No device, precision or distributed code: train.py applies autocast and wrapping from outside.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .common import UserError
from .kvcache import CachedStep, KVCache, LayerCache, forward_fused


def _opt(default, help: str, min: float | None = None, max: float | None = None, research: bool = False):
    """A field whose help and accepted range become its command-line flag (config.opt's metadata, without importing
    config: the model module stands alone). `research=True` declares a feature Qwen3 runtimes lack: export refuses a
    model that sets it to anything but the default (interop.check_exportable)."""
    return field(default=default, metadata={"help": help, "min": min, "max": max, "research": research})


@dataclass(frozen=True)
class ModelConfig:
    depth: int = _opt(4, "transformer blocks; the one dial that sets width and heads (width = depth * aspect)",
                       min=1, max=1024)
    aspect: int = _opt(64, "width per layer of depth when --n-embd is not given", min=1, max=2**16)
    n_embd: int = _opt(0, "model width; 0 derives it from --depth", min=0, max=2**20)
    head_dim: int = _opt(64, "width of one attention head", min=2, max=4096)
    n_head: int = _opt(0, "query heads; 0 derives n_embd // head_dim", min=0, max=2**14)
    n_kv_head: int = _opt(0, "key/value heads for grouped-query attention; 0 means as many as query heads",
                         min=0, max=2**14)
    intermediate_size: int = _opt(0, "SwiGLU hidden width; 0 derives 3 * n_embd", min=0, max=2**22)
    vocab_size: int = _opt(0, "vocabulary size; 0 takes it from the run's tokenizer", min=0, max=2**24)
    seq_len: int = _opt(512, "context length in tokens", min=1, max=2**20)
    rope_theta: float = _opt(10000.0, "RoPE base frequency", min=1.0, max=1e12)
    norm_eps: float = _opt(1e-6, "RMSNorm epsilon", min=1e-12, max=1.0)
    tie_embeddings: bool = _opt(False, "share the input embedding with the output head")

    def resolve(self, vocab_size: int | None = None) -> ModelConfig:
        """A copy with every derived size filled in and checked (idempotent).

        Size rule: n_embd = depth * aspect; n_head = n_embd // head_dim; n_kv_head = n_head;
        intermediate_size = 3 * n_embd; vocab_size from the field, else from the argument (the tokenizer's).
        """
        for name in ("depth", "head_dim", "seq_len"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1, not {getattr(self, name)}")
        if self.head_dim % 2:
            raise UserError(f"--head-dim must be even for RoPE, not {self.head_dim}")
        n_embd = self.n_embd or self.depth * self.aspect
        if n_embd < 1:
            raise UserError(f"the model width must be positive; set --n-embd or a positive --aspect (got {n_embd})")
        n_head = self.n_head
        if not n_head:
            if n_embd % self.head_dim:
                raise UserError(f"the width {n_embd} is not a multiple of --head-dim {self.head_dim}; choose "
                                f"--depth/--aspect or --n-embd so that it is, or set --n-head explicitly")
            n_head = n_embd // self.head_dim
        n_kv_head = self.n_kv_head or n_head
        if n_head < 1 or n_kv_head < 1 or n_head % n_kv_head:
            raise UserError(f"--n-head {n_head} must be a positive multiple of --n-kv-head {n_kv_head} "
                            f"(grouped-query attention shares each key/value head among n_head / n_kv_head heads)")
        intermediate_size = self.intermediate_size or 3 * n_embd
        vocab = self.vocab_size or (vocab_size or 0)
        if vocab < 1:
            raise UserError("the model's vocabulary size is unknown; train the tokenizer first or pass --vocab-size")
        if self.rope_theta <= 0 or self.norm_eps <= 0:
            raise UserError("--rope-theta and --norm-eps must be positive")
        return dataclasses.replace(self, n_embd=n_embd, n_head=n_head, n_kv_head=n_kv_head,
                                   intermediate_size=intermediate_size, vocab_size=vocab)


# ---------------------------------------------------------------------------------------------------------------------
# pieces


class _RMSNormFunction(torch.autograd.Function):
    """RMSNorm with a hand-written backward: F.rms_norm's CPU backward is decomposed into many small ops; this one is
    four passes."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        xf = x.float()
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True).add_(eps))  # (..., 1)
        xhat = xf * rstd  # (..., C)
        ctx.save_for_backward(xhat, rstd, weight)
        return (xhat * weight).to(torch.promote_types(x.dtype, weight.dtype))

    @staticmethod
    def backward(ctx, dy):
        xhat, rstd, weight = ctx.saved_tensors
        dy = dy.float()
        p = dy * xhat  # (..., C)
        dw = p.flatten(0, -2).sum(0).to(weight.dtype) if ctx.needs_input_grad[1] else None
        m = (p @ weight.float()).unsqueeze(-1).div_(weight.numel())  # (..., 1) mean(dy * weight * xhat)
        dx = (dy * weight).addcmul_(xhat, m, value=-1).mul_(rstd)  # rstd * (dy*w - xhat * mean(dy*w*xhat))
        return dx, dw, None


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight over the last dimension, in fp32 (Qwen3RMSNorm)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _RMSNormFunction.apply(x, self.weight, self.eps)


def rope_tables(head_dim: int, n_pos: int, theta: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables (n_pos, head_dim / 2) for NEOX RoPE, in fp32 as HF's default RoPE computes them (HF repeats
    the same half twice along head_dim; we keep one half)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim))
    pos = torch.arange(n_pos, dtype=torch.int64, device=device).float()
    freqs = torch.outer(pos, inv_freq)  # (n_pos, head_dim / 2)
    return freqs.cos(), freqs.sin()


def head_norm_rope_reference(x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                             eps: float) -> torch.Tensor:
    """The math of `head_norm_rope`, written plainly (tests check the fused version against it).
    x (B, T, H, D); weight (D,); cos, sin (B or 1, T, 1, D/2) -> (B, H, T, D)."""
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight  # per-head RMSNorm
    y1, y2 = y.chunk(2, dim=-1)  # (B, T, H, D/2) each
    rotated = torch.cat((-y2, y1), dim=-1)  # rotate_half
    out = y * torch.cat((cos, cos), -1) + rotated * torch.cat((sin, sin), -1)  # (B, T, H, D)
    return out.transpose(1, 2).to(x.dtype)  # (B, H, T, D)


class _HeadNormRoPE(torch.autograd.Function):
    """Per-head RMSNorm then NEOX RoPE, written straight into the (B, H, T, D) layout SDPA wants, with a hand-written
    backward. The norm weight is folded into four small (T, D/2) tables, so a call allocates the output and the
    saved normalised input and nothing else (the autograd version allocates ~8 tensors of x's size each way)."""

    @staticmethod
    def forward(ctx, x, weight, cos, sin, eps):
        B, T, H, D = x.shape
        h = D // 2
        xf = x.to(torch.promote_types(x.dtype, torch.float32))  # fp32 math for bf16 inputs
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True).add_(eps))  # (B, T, H, 1)
        xhat = xf * rstd  # (B, T, H, D)
        w = weight.to(xf.dtype)
        w1c, w2s, w2c, w1s = cos * w[:h], sin * w[h:], cos * w[h:], sin * w[:h]  # (B or 1, T, 1, D/2) each
        out = torch.empty(B, H, T, D, dtype=x.dtype, device=x.device)  # (B, H, T, D)
        o = out.transpose(1, 2)  # (B, T, H, D) view into it
        x1, x2, o1, o2 = xhat[..., :h], xhat[..., h:], o[..., :h], o[..., h:]
        torch.mul(x1, w1c, out=o1).addcmul_(x2, w2s, value=-1)  # y1 cos - y2 sin, y = xhat * w
        torch.mul(x2, w2c, out=o2).addcmul_(x1, w1s)  # y2 cos + y1 sin
        ctx.save_for_backward(xhat, rstd, weight, cos, sin)
        ctx.x_dtype = x.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        xhat, rstd, weight, cos, sin = ctx.saved_tensors
        g = grad_out.to(xhat.dtype).transpose(1, 2)  # (B, T, H, D)
        h = g.size(-1) // 2
        g1, g2 = g[..., :h], g[..., h:]
        gy = torch.empty_like(xhat)  # d loss / d (xhat * w): the RoPE rotation transposed
        torch.mul(g1, cos, out=gy[..., :h]).addcmul_(g2, sin)
        torch.mul(g2, cos, out=gy[..., h:]).addcmul_(g1, sin, value=-1)
        w = weight.to(xhat.dtype)
        dx = gy * w  # d loss / d xhat
        p = gy.mul_(xhat)  # (B, T, H, D)
        dw = p.flatten(0, -2).sum(0).to(weight.dtype) if ctx.needs_input_grad[1] else None
        m = (p @ w).unsqueeze(-1).div_(w.numel())  # (B, T, H, 1) mean(d loss/d xhat * xhat)
        dx.addcmul_(xhat, m, value=-1).mul_(rstd)
        return dx.to(ctx.x_dtype), dw, None, None, None


def head_norm_rope(x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   eps: float) -> torch.Tensor:
    """x (B, T, H, D) -> per-head RMSNorm(weight) -> NEOX RoPE -> (B, H, T, D) contiguous, in x's dtype."""
    return _HeadNormRoPE.apply(x, weight, cos, sin, eps)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        C, D = cfg.n_embd, cfg.head_dim
        self.q_proj = nn.Linear(C, cfg.n_head * D, bias=False)
        self.k_proj = nn.Linear(C, cfg.n_kv_head * D, bias=False)
        self.v_proj = nn.Linear(C, cfg.n_kv_head * D, bias=False)
        self.o_proj = nn.Linear(cfg.n_head * D, C, bias=False)
        self.q_norm = RMSNorm(D, cfg.norm_eps)
        self.k_norm = RMSNorm(D, cfg.norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: LayerCache | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        H, K, D = self.n_head, self.n_kv_head, self.head_dim
        q = self.q_proj(x).view(B, T, H, D)  # (B, T, n_head, head_dim)
        k = self.k_proj(x).view(B, T, K, D)  # (B, T, n_kv_head, head_dim)
        v = self.v_proj(x).view(B, T, K, D)  # (B, T, n_kv_head, head_dim)
        q = head_norm_rope(q, self.q_norm.weight, cos, sin, self.q_norm.eps)  # (B, n_head, T, head_dim)
        k = head_norm_rope(k, self.k_norm.weight, cos, sin, self.k_norm.eps)  # (B, n_kv_head, T, head_dim)
        v = v.transpose(1, 2).contiguous()  # (B, n_kv_head, T, head_dim); the CPU flash kernel is faster on it
        if cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=K != H)  # (B, n_head, T, head_dim)
        else:
            y = cache.attend(q, k, v)  # (B, n_head, T, head_dim)
        y = y.transpose(1, 2).reshape(B, T, H * D)  # (B, T, n_head * head_dim)
        return self.o_proj(y)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.n_embd, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.n_embd, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: LayerCache | None = None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, cache)
        return x + self.mlp(self.mlp_norm(x))


# ---------------------------------------------------------------------------------------------------------------------
# the loss


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """sum_i row_weights_i * CE(x_i @ weight.T, targets_i), chunk by chunk; gradients are made in the forward pass."""

    @staticmethod
    def forward(ctx, x, weight, targets, row_weights, chunk_rows, per_token):
        # x (N, C), weight (V, C), targets (N,) with -1 = ignore, row_weights (N,) in fp32 or wider, 0 where ignored
        need_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        acc = row_weights.dtype  # fp32 (fp64 in tests): softmax and the losses are computed in it
        exact = not torch.is_autocast_enabled(x.device.type) and x.dtype == weight.dtype == acc
        N, V = x.size(0), weight.size(0)
        losses = torch.empty(N, dtype=acc, device=x.device)  # (N,)
        grad_x = torch.empty_like(x) if need_grad else None
        grad_w = (torch.empty if exact else torch.zeros)(weight.shape, dtype=acc, device=x.device) if need_grad \
            else None  # the exact path overwrites it on the first chunk (beta=0)
        buf = torch.empty(min(chunk_rows, N), V, dtype=acc, device=x.device) if exact else None  # reused logits
        for s in range(0, N, chunk_rows):
            xs, ts = x[s:s + chunk_rows], targets[s:s + chunk_rows]  # (n, C), (n,)
            logits = torch.mm(xs, weight.t(), out=buf[:xs.size(0)]) if exact else (xs @ weight.t()).to(acc)  # (n, V)
            safe_t = ts.clamp(min=0).unsqueeze(1)  # (n, 1)
            mx = logits.amax(dim=-1, keepdim=True)  # (n, 1)
            target_logit = logits.gather(1, safe_t)  # (n, 1)
            g = logits.sub_(mx).exp_()  # (n, V) unnormalised probabilities, in place
            sumexp = g.sum(dim=-1, keepdim=True)  # (n, 1)
            losses[s:s + chunk_rows] = (sumexp.log() + mx - target_logit).squeeze(1)  # logsumexp - target logit
            if need_grad:  # d loss / d logits = (softmax - onehot) * row_weight, in place
                rw = row_weights[s:s + chunk_rows].unsqueeze(1)  # (n, 1)
                g.mul_(rw / sumexp)
                g.scatter_add_(1, safe_t, -rw)
                if exact:
                    torch.mm(g, weight, out=grad_x[s:s + chunk_rows])  # (n, C)
                    grad_w.addmm_(g.t(), xs, beta=0.0 if s == 0 else 1.0)  # (V, C)
                else:  # under autocast the matmuls run in its dtype
                    grad_x[s:s + chunk_rows] = g @ weight
                    grad_w.add_(g.t() @ xs)
        losses.masked_fill_(targets < 0, 0.0)
        if need_grad:
            ctx.save_for_backward(grad_x, grad_w.to(weight.dtype))
        return losses if per_token else (losses * row_weights).sum()

    @staticmethod
    def backward(ctx, grad_loss):
        grad_x, grad_w = ctx.saved_tensors  # already d(sum_i w_i loss_i)/d input: scale by the upstream scalar
        return grad_x * grad_loss, grad_w * grad_loss, None, None, None, None


def chunked_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          loss_mask: torch.Tensor | None = None, reduction: str = "mean",
                          chunk_rows: int = 512) -> torch.Tensor:
    """F.cross_entropy(x @ weight.T, targets, ignore_index=-1) without ever holding all (N, V) logits.

    x (N, C) final hidden states, weight (V, C) the output head, targets (N,) int64 with -1 = ignore, loss_mask (N,)
    optional per-token weights. reduction: "mean" (weighted mean over non-ignored tokens; NaN when none counts, like
    F.cross_entropy), "sum", or "none" ((N,) weighted token losses).

    The forward pass computes each chunk's logits, loss and (when grad is needed) the gradients for x and weight at
    once, so the backward pass is a scale; hence the reduction happens inside. With grad and reduction "none" the
    caller's reduction is unknown, so that case takes the plain path.
    """
    acc = torch.promote_types(x.dtype, torch.float32)
    valid = (targets >= 0).to(acc)  # (N,)
    w = valid if loss_mask is None else valid * loss_mask.to(acc)
    if reduction == "mean":
        scale = w / w.sum()
    elif reduction in ("sum", "none"):
        scale = w
    else:
        raise ValueError(f"reduction must be mean, sum or none, not {reduction!r}")
    if reduction == "none":
        if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
            losses = F.cross_entropy((x @ weight.t()).to(acc), targets, ignore_index=-1, reduction="none")
        else:
            losses = _ChunkedLinearCrossEntropy.apply(x, weight, targets, scale, chunk_rows, True)
        return losses * w if loss_mask is not None else losses
    return _ChunkedLinearCrossEntropy.apply(x, weight, targets, scale, chunk_rows, False)


# ---------------------------------------------------------------------------------------------------------------------
# the model


class GPT(nn.Module):
    kv_cache_is_state = True  # forward_cached keeps nothing outside the KVCache: the engine may fill a slot in
    # chunks and copy cached prefixes into it

    def __init__(self, config: ModelConfig, rope_factor: int = 4):
        super().__init__()
        cfg = config.resolve()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.rope_len = rope_factor * cfg.seq_len
        cos, sin = rope_tables(cfg.head_dim, self.rope_len, cfg.rope_theta)  # on the meta device when built there
        self.register_buffer("rope_cos", cos, persistent=False)  # (rope_len, head_dim / 2)
        self.register_buffer("rope_sin", sin, persistent=False)  # (rope_len, head_dim / 2)

    @classmethod
    def build(cls, cfg: ModelConfig, device: str | torch.device = "cpu") -> GPT:
        """Construct on the meta device (no memory), allocate on `device`, then initialise."""
        with torch.device("meta"):
            model = cls(cfg)
        model.to_empty(device=device)
        model.init_weights()
        return model

    @torch.no_grad()
    def init_weights(self) -> None:
        """Fill every parameter and the RoPE tables (see the module docstring for the rule)."""
        C = self.config.n_embd
        bound = (3 / C) ** 0.5
        if self.lm_head is None:
            nn.init.normal_(self.embed_tokens.weight, std=C**-0.5)
        else:
            nn.init.normal_(self.embed_tokens.weight, std=1.0)
            nn.init.normal_(self.lm_head.weight, std=0.001)
        for block in self.blocks:
            for lin in (block.attn.q_proj, block.attn.k_proj, block.attn.v_proj, block.mlp.gate_proj,
                        block.mlp.up_proj):
                nn.init.uniform_(lin.weight, -bound, bound)
            nn.init.zeros_(block.attn.o_proj.weight)
            nn.init.zeros_(block.mlp.down_proj.weight)
        for m in self.modules():
            if isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)
        cos, sin = rope_tables(self.config.head_dim, self.rope_len, self.config.rope_theta, self.rope_cos.device)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)

    def head_weight(self) -> torch.Tensor:
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, loss_mask: torch.Tensor | None = None,
                reduction: str = "mean", positions: torch.Tensor | None = None) -> torch.Tensor:
        """idx (B, T) int64 -> logits (B, T, vocab) fp32, or with targets (B, T) (-1 = ignore) the cross-entropy:
        a scalar for reduction mean/sum, (B, T) for none. loss_mask (B, T) optional float/bool token weights; the mean
        is then sum(w * loss) / sum(w). positions (T,) or (B, T) RoPE positions, default 0..T-1 (for a KV cache)."""
        B, T = idx.shape
        if positions is None:
            if T > self.rope_len:
                raise UserError(f"a sequence of {T} tokens is longer than the model's RoPE table ({self.rope_len})")
            cos = self.rope_cos[:T].view(1, T, 1, -1)  # (1, T, 1, head_dim / 2)
            sin = self.rope_sin[:T].view(1, T, 1, -1)
        else:
            cos = self.rope_cos[positions].view(-1, T, 1, self.config.head_dim // 2)  # (B or 1, T, 1, head_dim / 2)
            sin = self.rope_sin[positions].view(-1, T, 1, self.config.head_dim // 2)
        x = self.embed_tokens(idx)  # (B, T, C)
        for block in self.blocks:
            x = block(x, cos, sin)
        x = self.norm(x)
        if targets is None:
            return F.linear(x, self.head_weight()).float()  # (B, T, vocab)
        loss = chunked_cross_entropy(x.view(B * T, -1), self.head_weight(), targets.reshape(B * T),
                                     None if loss_mask is None else loss_mask.reshape(B * T), reduction)
        return loss.view(B, T) if reduction == "none" else loss

    # -----------------------------------------------------------------------------------------------------------------
    # inference with a KV cache

    def new_kv_cache(self, slots: int, max_len: int | None = None, dtype: torch.dtype | None = None) -> KVCache:
        """An empty cache for `slots` sequences of up to `max_len` tokens (default seq_len), on the model's device,
        in `dtype` (default the weights' dtype)."""
        cfg, w = self.config, self.embed_tokens.weight
        max_len = max_len or cfg.seq_len
        if max_len > self.rope_len:
            raise UserError(f"a KV cache of {max_len} tokens is longer than the model's RoPE table ({self.rope_len}); "
                            f"use at most {self.rope_len}")
        return KVCache(cfg.depth, slots, cfg.n_kv_head, max_len, cfg.head_dim, w.device, dtype or w.dtype)

    def forward_cached(self, idx: torch.Tensor, cache: KVCache, slots: list[int], last_only: bool = False,
                       fused: bool = True) -> torch.Tensor:
        """Append idx (B, T) to the cached sequences in `slots` (B distinct slots, each continuing at its own length)
        and return their logits (B, T, vocab) fp32, or (B, 1, vocab) with last_only. A prefill is T > 1 on one slot
        (empty, or continuing it: a restored prefix, earlier chunks); a decode step is T = 1 on the live slots.
        Advances cache.lengths by T. fused (default): the inference path of chatsmith/kvcache.py; False: the training
        modules block by block (the reference)."""
        if fused:
            return forward_fused(self, idx, cache, list(slots), last_only)
        B, T = idx.shape
        step = CachedStep(cache, list(slots), T, idx.device)
        cos = self.rope_cos[step.pos].view(B, T, 1, -1)  # (B, T, 1, head_dim / 2)
        sin = self.rope_sin[step.pos].view(B, T, 1, -1)
        x = self.embed_tokens(idx)  # (B, T, C)
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, step.layer(i))
        step.advance()
        if last_only:
            x = x[:, -1:]  # (B, 1, C)
        return F.linear(self.norm(x), self.head_weight()).float()  # (B, T or 1, vocab)

    # -----------------------------------------------------------------------------------------------------------------
    # accounting

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count (a tied matrix counted once). non_embedding drops the input embedding table unless it is
        also the output head (a matmul)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and self.lm_head is not None:
            n -= self.embed_tokens.weight.numel()
        return n

    def flops_per_token(self) -> int:
        """Training FLOPs per token: 6 * (matmul weights: every Linear in the blocks + the head) for forward and
        backward, plus attention scores and values 12 * depth * n_head * head_dim * seq_len (the full square,
        as nanoGPT/PaLM count it, although causal attention needs only half). Norms, RoPE, softmax, the embedding
        lookup and the optimizer are not counted."""
        cfg = self.config
        n_matmul = sum(m.weight.numel() for m in self.blocks.modules() if isinstance(m, nn.Linear))
        n_matmul += self.head_weight().numel()
        return 6 * n_matmul + 12 * cfg.depth * cfg.n_head * cfg.head_dim * cfg.seq_len

    # -----------------------------------------------------------------------------------------------------------------
    # HF transformers mapping (export, parity tests, the HF baseline in bench)

    def hf_config_dict(self) -> dict:
        """Keyword arguments of transformers.Qwen3Config describing this model."""
        cfg = self.config
        return dict(vocab_size=cfg.vocab_size, hidden_size=cfg.n_embd, intermediate_size=cfg.intermediate_size,
                    num_hidden_layers=cfg.depth, num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_kv_head,
                    head_dim=cfg.head_dim, hidden_act="silu", max_position_embeddings=cfg.seq_len,
                    rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta, tie_word_embeddings=cfg.tie_embeddings,
                    attention_bias=False, attention_dropout=0.0, use_sliding_window=False)

    @staticmethod
    def hf_name(name: str) -> str:
        """Our parameter name -> the Qwen3ForCausalLM parameter name."""
        if name == "lm_head.weight":
            return name
        if name.startswith("blocks."):
            _, i, rest = name.split(".", 2)
            rest = (rest.replace("attn_norm.", "input_layernorm.").replace("mlp_norm.", "post_attention_layernorm.")
                    .replace("attn.", "self_attn."))
            return f"model.layers.{i}.{rest}"
        return f"model.{name}"  # embed_tokens.weight, norm.weight

    def to_hf_state_dict(self, include_tied: bool = True) -> dict[str, torch.Tensor]:
        """Our weights under Qwen3ForCausalLM names (detached, sharing storage with the model). With tied embeddings
        `lm_head.weight` is the embedding tensor itself; pass include_tied=False to leave it out (safetensors refuses
        two names for one storage, and HF ties it back on load)."""
        sd = {self.hf_name(k): v for k, v in self.state_dict().items()}
        if self.lm_head is None and include_tied:
            sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
        return sd

    def load_hf_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        """Load Qwen3ForCausalLM weights (strict: every one of our parameters must be present)."""
        ours = {self.hf_name(k): k for k in self.state_dict()}
        missing = sorted(set(ours) - set(sd))
        if missing:
            raise UserError(f"the HF state dict lacks {len(missing)} weights, e.g. {missing[0]}; is it a Qwen3 model "
                            f"with this config?")
        self.load_state_dict({k: sd[hf] for hf, k in ours.items()})
