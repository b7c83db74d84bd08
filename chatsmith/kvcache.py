"""Inference with a KV cache: the preallocated cache and the two cached forwards that fill it.

    cache = model.new_kv_cache(slots=4)                            # KVCache, zeros, on the model's device
    logits = model.forward_cached(idx, cache, [0])                 # the fused inference path (forward_fused below)
    logits = model.forward_cached(idx, cache, [0], fused=False)    # the training modules, block by block (reference)
    decode, chunk = forward_mixed(model, cache, [(ids, [0, 1], False), (prompt_chunk, [2], True)])  # one pass

Both append idx (B, T) to B slots, each continuing at its own length: a prefill is T > 1 on one slot (empty, or
holding a prefix restored from the prefix cache, or the chunks before), a decode step is T = 1 on the live slots.
`forward_mixed` runs several such parts (the engine: a decode step and a prefill chunk) through the projections
together, so the weights are read once; RoPE, cache writes and attention run per part.

Choices in the fused path (the same math as GPT.forward; tests check its logits and greedy tokens against it):
- Inference weights (`InferenceWeights`, cached on the model, rebuilt when a parameter's storage or version counter
  changes, e.g. after an optimizer step or load_state_dict): q|k|v and gate|up concatenated, so each is one matmul; the
  RMSNorm weights before them (and the final norm's before the head) folded into their columns, times sqrt(width),
  so a norm is a bare x / sqrt(sum(x^2) + width * eps); every matrix in the autocast dtype when autocast is on, cast
  once instead of on every call. The cost is a second copy of the matrices. RoPE tables are full-width (sin signed)
  and precomputed, sliced per call.
- q and k heads are normalised together (one normalisation over (B, T, n_head + n_kv_head, head_dim)) and rotated
  together: y * cos + roll(y, head_dim / 2) * sin (NEOX rotate_half), with the per-head q/k norm weights multiplied
  into the cos and sin rows once per call for every layer (a decode step is mostly small ops: each saved op counts).
- New keys and values are written in place into the cache: one copy per tensor into views of all layers' rows taken
  once per call when the rows are contiguous slots at one length (one stream, a prefill), else one indexed write.
- Attention is SDPA over the cache prefix: no mask when every query sees all of it (decode rows of one length), causal
  for a fresh prefill, an offset causal mask for a chunk that continues a slot, per-row masks otherwise. The engine
  keeps live slots contiguous (lowest free slot first), so the rows read the cache through a view, not a gather.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F


class KVCache:
    """Preallocated keys and values for `slots` sequences of up to `max_len` tokens each, in every layer.

    kv: (n_layer, slots, 2, n_kv_head, max_len, head_dim), keys (index 0) stored after q/k norm and RoPE, values
    (index 1); k and v are views of its two halves, (n_layer, slots, n_kv_head, max_len, head_dim). lengths[slot] is
    the number of tokens a slot holds (host ints: masks and positions are built on the host anyway). A cached forward
    appends and advances lengths; `reset(slot)` empties a slot (its old entries are masked out, never read)."""

    def __init__(self, n_layer: int, slots: int, n_kv_head: int, max_len: int, head_dim: int,
                 device: str | torch.device | None = None, dtype: torch.dtype | None = None):
        self.kv = torch.zeros((n_layer, slots, 2, n_kv_head, max_len, head_dim), device=device, dtype=dtype)
        self.k, self.v = self.kv[:, :, 0], self.kv[:, :, 1]
        self.layers = [(self.k[i], self.v[i]) for i in range(n_layer)]  # per layer (slots, n_kv_head, max_len, D)
        self.lengths = [0] * slots
        self.max_len = max_len

    @property
    def slots(self) -> int:
        return len(self.lengths)

    def reset(self, slot: int) -> None:
        self.lengths[slot] = 0


class CachedStep:
    """What one cached forward shares across layers: where the new keys go and what each query may see."""

    def __init__(self, cache: KVCache, slots: list[int], T: int, device: torch.device):
        starts = [cache.lengths[s] for s in slots]
        B, S = len(slots), max(starts) + T  # S: keys attended over, the longest sequence after this call
        if S > cache.max_len:
            raise ValueError(f"the KV cache holds {cache.max_len} tokens per slot; this call needs {S}")
        self.cache, self.slots, self.starts, self.T, self.S, self.device = cache, slots, starts, T, S, device
        self.contiguous = slots == list(range(slots[0], slots[0] + B))
        self.start = starts[0] if all(s == starts[0] for s in starts) else None  # one length for every row

    @functools.cached_property
    def slot_t(self) -> torch.Tensor:
        return torch.tensor(self.slots, device=self.device)  # (B,)

    @functools.cached_property
    def pos(self) -> torch.Tensor:
        """(B, T) positions of the new tokens."""
        return torch.tensor(self.starts, device=self.device).unsqueeze(1) + torch.arange(self.T, device=self.device)

    @functools.cached_property
    def rows(self) -> slice | torch.Tensor:
        """Cache rows of the slots: a contiguous run reads through a view instead of a gather (a copy)."""
        return slice(self.slots[0], self.slots[0] + len(self.slots)) if self.contiguous else self.slot_t

    @functools.cached_property
    def mask(self) -> torch.Tensor | None:
        """None when every row is a fresh prefill (plain causal attention over the new keys); else (B or 1, 1, T, S)
        bool: key j is visible to the query at position p iff j <= p (earlier tokens of the slot, and itself)."""
        if not any(self.starts):
            return None
        if self.start is not None:  # one length: one (T, S) mask for all rows
            q_pos = self.start + torch.arange(self.T, device=self.device)
            return (torch.arange(self.S, device=self.device) <= q_pos.unsqueeze(-1)).view(1, 1, self.T, self.S)
        return (torch.arange(self.S, device=self.device) <= self.pos.unsqueeze(-1)).unsqueeze(1)  # (B, 1, T, S)

    @functools.cached_property
    def targets(self) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]] | None:
        """Where the new keys and values go, per layer, as (B, T, n_kv_head, D) views of the cache (one slicing for
        all layers, then one copy_ per tensor and layer); None when the rows are not contiguous slots at one length
        (an indexed write instead)."""
        if not (self.contiguous and self.start is not None):
            return None
        t = slice(self.start, self.start + self.T)
        return (self.cache.k[:, self.rows, :, t].transpose(2, 3).unbind(0),
                self.cache.v[:, self.rows, :, t].transpose(2, 3).unbind(0))

    @functools.cached_property
    def visible(self) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]] | None:
        """Per layer, contiguous rows' keys and values up to S: (B, n_kv_head, S, D) views, which see the writes made
        after they were taken; None for scattered rows (gathered per layer, after that layer's write)."""
        if not self.contiguous:
            return None
        return (self.cache.k[:, self.rows, :, :self.S].unbind(0), self.cache.v[:, self.rows, :, :self.S].unbind(0))

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store the new keys and values k, v (B, T, n_kv_head, D) at their positions, in place."""
        if self.targets is not None:
            self.targets[0][layer].copy_(k)
            self.targets[1][layer].copy_(v)
        else:
            kc, vc = self.cache.layers[layer]  # (slots, n_kv_head, max_len, D)
            where = (self.slot_t.unsqueeze(1).expand_as(self.pos), slice(None), self.pos)  # indexes (B, T, K, D)
            kc[where] = k.to(kc.dtype)
            vc[where] = v.to(vc.dtype)

    def attend(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        """q (B, n_head, T, D) against the slot's keys up to the new ones (written first) -> (B, n_head, T, D)."""
        if self.visible is not None:
            keys, values = self.visible[0][layer], self.visible[1][layer]  # (B, n_kv_head, S, D) each
        else:
            kc, vc = self.cache.layers[layer]
            keys, values = kc[self.rows, :, :self.S], vc[self.rows, :, :self.S]
        gqa = keys.size(1) != q.size(1)
        if self.T == 1 and self.start is not None:  # decode rows of one length: each sees all S keys
            return F.scaled_dot_product_attention(q, keys, values, enable_gqa=gqa)
        if self.mask is None:  # fresh prefill: S == T
            return F.scaled_dot_product_attention(q, keys, values, is_causal=True, enable_gqa=gqa)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=self.mask, enable_gqa=gqa)

    def layer(self, i: int) -> LayerCache:
        return LayerCache(self, i)

    def advance(self) -> None:
        for s in self.slots:
            self.cache.lengths[s] += self.T


class LayerCache:
    """One layer's view of a CachedStep, for the training modules' Attention.forward (the reference path)."""

    def __init__(self, step: CachedStep, layer: int):
        self.step, self.layer = step, layer

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q (B, n_head, T, D), new k, v (B, n_kv_head, T, D): store k, v, attend -> (B, n_head, T, D)."""
        self.step.write(self.layer, k.transpose(1, 2), v.transpose(1, 2))
        return self.step.attend(self.layer, q.to(self.step.cache.kv.dtype))


# ---------------------------------------------------------------------------------------------------------------------
# the fused inference path


@dataclass
class _BlockWeights:
    # matrices as contiguous (in, out): transposed copies; sqrt(in) is folded in with the norm weight (see _normalize)
    qkv: torch.Tensor  # (C, n_head * D + 2 * n_kv_head * D): q | k | v, attn_norm weight folded into the rows
    o: torch.Tensor  # (n_head * D, C)
    gate_up: torch.Tensor  # (C, 2 * intermediate): gate | up, mlp_norm weight folded in
    down: torch.Tensor  # (intermediate, C)


@dataclass
class InferenceWeights:
    key: tuple
    autocast: bool  # the matrices are in the autocast dtype
    blocks: list[_BlockWeights]
    head: torch.Tensor  # (C, vocab), final norm weight folded in
    qk_norm: torch.Tensor  # (n_layer, n_head + n_kv_head, D) fp32: q_norm's weight per query head, then k_norm's,
    # times sqrt(D)
    qk_norm_rolled: torch.Tensor  # the same rolled by D / 2 along D: rotate_half(y * w) = rotate_half(y) * it
    eps: tuple[torch.Tensor, torch.Tensor]  # 0-dim fp32: n_embd * norm_eps, head_dim * norm_eps (see _normalize)
    cos: torch.Tensor  # (rope_len, D) fp32: cos(pos * freq) over both halves
    sin: torch.Tensor  # (rope_len, D) fp32: -sin over the first half, sin over the second (rotate_half's sign)


def weights_key(model: torch.nn.Module) -> tuple:
    """Changes whenever a parameter or buffer of `model` is modified in place or moved (its version counter and
    storage): what cached weights and cached keys/values were computed from. The tensor lists are collected once
    (walking the modules costs more than a decode step's Python work); `.to()` and load_state_dict keep the
    Parameter objects and change their storage or version. Inference tensors have no version counter (and cannot be
    modified in place outside inference mode); their storage is in the key."""
    lists = model.__dict__.get("_weight_tensors")
    if lists is None:
        tensors = [*model.parameters(), *model.buffers()]
        lists = model.__dict__["_weight_tensors"] = (tensors, [t for t in tensors if not t.is_inference()])
    tensors, versioned = lists
    return (*[t.data_ptr() for t in tensors], *[t._version for t in versioned])


def inference_weights(model) -> InferenceWeights:
    """The model's fused inference weights, rebuilt when a parameter or buffer changed or the autocast dtype did."""
    device = model.rope_cos.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
    key = (dtype, weights_key(model))
    cached = model.__dict__.get("_inference_weights")
    if cached is not None and cached.key == key:
        return cached
    with torch.no_grad(), torch.autocast(device, enabled=False):
        def mat(w: torch.Tensor, norm: torch.Tensor | None = None) -> torch.Tensor:
            """w.T contiguous (in, out), so x @ it is F.linear(x, w): a (1, C) row times a row-major (C, out) matrix
            runs about twice as fast on CPU as against the transposed view (MKL, small shapes). With `norm`, the
            weight of the RMSNorm before it times sqrt(in) is folded into the rows."""
            if norm is not None:  # W @ (xhat * g) == (W * g) @ xhat
                w = w * (norm.float() * w.size(1) ** 0.5).to(w.dtype)
            return (w.to(dtype) if dtype is not None else w).t().contiguous()

        blocks, qk_norm = [], []
        for b in model.blocks:
            a, m = b.attn, b.mlp
            H, K = a.n_head, a.n_kv_head
            blocks.append(_BlockWeights(
                qkv=mat(torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]), b.attn_norm.weight),
                o=mat(a.o_proj.weight), gate_up=mat(torch.cat([m.gate_proj.weight, m.up_proj.weight]),
                                                    b.mlp_norm.weight),
                down=mat(m.down_proj.weight)))
            qk_norm.append(torch.cat([a.q_norm.weight.float().expand(H, -1), a.k_norm.weight.float().expand(K, -1)]))
        qk = torch.stack(qk_norm) * qk_norm[0].size(-1) ** 0.5  # (n_layer, H + K, D)
        cos, sin = model.rope_cos.float(), model.rope_sin.float()
        weights = InferenceWeights(key, dtype is not None, blocks, mat(model.head_weight(), model.norm.weight),
                                   qk, qk.roll(qk.size(-1) // 2, -1),
                                   tuple(torch.tensor(n * model.config.norm_eps, dtype=torch.float32, device=qk.device)
                                         for n in (model.config.n_embd, qk.size(-1))),
                                   torch.cat([cos, cos], -1), torch.cat([-sin, sin], -1))
    model.__dict__["_inference_weights"] = weights  # a plain attribute: not a parameter, buffer or state_dict entry
    return weights


def _normalize(x: torch.Tensor, eps: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """RMSNorm over the last dimension (n wide) without its weight and without the factor sqrt(n), both folded into
    what follows: x / sqrt(sum(x^2) + n eps) == (x / sqrt(mean(x^2) + eps)) / sqrt(n). Computed in fp32, returned in
    `dtype`. Written out: F.rms_norm dispatches more small ops, and a decode step is mostly small ops."""
    xf = x if x.dtype == torch.float32 else x.float()
    y = xf * (xf * xf).sum(-1, keepdim=True).add_(eps).rsqrt_()  # eps: n * norm_eps, a 0-dim fp32 tensor (a
    # Python float would be wrapped into a tensor on every call)
    return y if dtype == torch.float32 else y.to(dtype)


def _residual(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, autocast: bool) -> torch.Tensor:
    """x + y @ weight: one addmm, except under autocast, where addmm would round the fp32 residual stream."""
    return x + torch.mm(y, weight) if autocast else torch.addmm(x, y, weight)


def forward_fused(model, idx: torch.Tensor, cache: KVCache, slots: list[int], last_only: bool) -> torch.Tensor:
    """GPT.forward_cached's fused path: idx (B, T) appended to `slots` -> logits (B, T or 1, vocab) fp32. Rows are
    kept 2-D (B * T, width) so that every projection is one mm on pre-transposed weights. Inference only: autograd is
    turned off here unless the caller did (the weight copies may come from an inference_mode caller, which autograd
    refuses)."""
    return forward_mixed(model, cache, [(idx, slots, last_only)])[0]


def forward_mixed(model, cache: KVCache, parts: list[tuple[torch.Tensor, list[int], bool]]) -> list[torch.Tensor]:
    """Several cached forwards in one pass: parts [(idx (B, T), slots, last_only)] on distinct slots -> their logits,
    as forward_fused gives each. The rows of all parts go through every projection together (the weights are read
    once: a prefill chunk riding along with a decode step costs its tokens' arithmetic, not a second pass over the
    model); RoPE, the cache write and attention run per part."""
    if torch.is_grad_enabled():
        with torch.no_grad():
            return _forward_mixed(model, cache, parts)
    return _forward_mixed(model, cache, parts)


def _forward_mixed(model, cache: KVCache, parts: list[tuple[torch.Tensor, list[int], bool]]) -> list[torch.Tensor]:
    cfg = model.config
    H, K, D = cfg.n_head, cfg.n_kv_head, cfg.head_dim
    I = cfg.intermediate_size  # noqa: E741
    w = inference_weights(model)
    eps, eps_head = w.eps
    shapes, steps, tables, offset = [], [], [], 0
    for idx, slots, _ in parts:
        B, T = idx.shape
        step = CachedStep(cache, list(slots), T, idx.device)
        if step.start is not None:  # one length: a slice of the tables for all rows
            cos = w.cos[step.start:step.start + T].view(T, 1, 1, D)
            sin = w.sin[step.start:step.start + T].view(T, 1, 1, D)
        else:
            cos, sin = w.cos[step.pos].view(B, T, 1, 1, D), w.sin[step.pos].view(B, T, 1, 1, D)
        # q/k norm weights times the RoPE tables, every layer at once: (B or 1, T, n_layer, H + K, D), unbound per
        # layer
        tables.append(((cos * w.qk_norm).unbind(-3), (sin * w.qk_norm_rolled).unbind(-3)))
        shapes.append((B, T, offset))
        steps.append(step)
        offset += B * T
    ids = parts[0][0].view(-1) if len(parts) == 1 else torch.cat([idx.view(-1) for idx, _, _ in parts])
    x = F.embedding(ids, model.embed_tokens.weight)  # (N, C), the parts' rows one after another
    kv_dtype = cache.kv.dtype
    for i, bw in enumerate(w.blocks):
        qkv_rows = torch.mm(_normalize(x, eps, x.dtype), bw.qkv)  # (N, n_head * D + 2 * n_kv_head * D)
        ys = []
        for (B, T, off), step, (qk_cos, qk_sin) in zip(shapes, steps, tables):
            rows = qkv_rows if len(parts) == 1 else qkv_rows[off:off + B * T]
            qkv = rows.view(B, T, H + 2 * K, D)  # (B, T, n_head + 2 n_kv_head, D)
            qk = _normalize(qkv[:, :, :H + K], eps_head)  # (B, T, n_head + n_kv_head, D) fp32, unweighted
            # weighted, then NEOX RoPE: y cos + rotate_half(y) sin with y = qk * weight; rotate_half(qk * weight) ==
            # roll(qk) * rolled weight, times the signed sin table
            qk = torch.addcmul(qk * qk_cos[i], qk.roll(D // 2, -1), qk_sin[i])
            step.write(i, qk[:, :, H:], qkv[:, :, H + K:])
            q = qk[:, :, :H].transpose(1, 2)  # (B, n_head, T, D)
            y = step.attend(i, q if q.dtype == kv_dtype else q.to(kv_dtype))  # (B, n_head, T, D)
            ys.append(y.reshape(B, H * D) if T == 1 else y.transpose(1, 2).reshape(B * T, H * D))  # T = 1: same order
        x = _residual(x, ys[0] if len(ys) == 1 else torch.cat(ys), bw.o, w.autocast)  # (N, C): x + attention out
        gate_up = torch.mm(_normalize(x, eps, x.dtype), bw.gate_up)  # (N, 2 * intermediate)
        x = _residual(x, F.silu(gate_up[:, :I]).mul_(gate_up[:, I:]), bw.down, w.autocast)
    heads, sizes = [], []  # the rows each part wants logits for
    for (B, T, off), (_, _, last_only) in zip(shapes, parts):
        rows = x if len(parts) == 1 else x[off:off + B * T]
        heads.append(rows.view(B, T, -1)[:, -1] if last_only and T > 1 else rows)  # (B or B * T, C)
        sizes.append(B if last_only else B * T)
    for step in steps:
        step.advance()
    logits = torch.mm(_normalize(heads[0] if len(heads) == 1 else torch.cat(heads), eps, x.dtype), w.head)
    logits = logits if logits.dtype == torch.float32 else logits.float()  # (rows, vocab)
    chunks = [logits] if len(parts) == 1 else logits.split(sizes)
    return [c.view(B, 1 if last_only else T, -1) for c, (B, T, _), (_, _, last_only) in zip(chunks, shapes, parts)]
