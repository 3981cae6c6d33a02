"""The CLIP vision tower, taken apart so the last block can be swapped (docs/method.md §1, §2).

Blocks 1..L-1 run as open_clip defines them; the last block is split into its parts
(`block_qkv`, `finish_last_block`) so that the attention in between can be any matrix, and
`finish_block` does the same for an earlier block (FSA fed back into it, `FeedbackConfig.blocks`).
"""
from __future__ import annotations

import math
from typing import Iterable, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype attention matrices and the feedback maths use: float32 or wider."""
    return torch.promote_types(dtype, torch.float32)


def pretrain_grid(visual: nn.Module) -> tuple[int, int]:
    """Patch grid (g0h, g0w) the positional embedding was trained for."""
    n = visual.positional_embedding.shape[0] - 1
    grid = getattr(visual, "grid_size", None)
    if grid is not None and grid[0] * grid[1] == n:
        return int(grid[0]), int(grid[1])
    side = math.isqrt(n)
    return side, side


def interpolate_pos_embed(pos: Tensor, g0: tuple[int, int], grid: tuple[int, int]) -> Tensor:
    """Positional embedding for a `gh×gw` grid from the `g0h×g0w` one.

    pos: (1 + g0h·g0w, D) → (1 + gh·gw, D). Bicubic with scale ((gh+0.1)/g0h, (gw+0.1)/g0w) and
    align_corners=False, the published FSA/ProxyCLIP rule; the +0.1 guards the output size
    against floating-point rounding. The CLS row is kept as is.
    """
    gh, gw = grid
    if (gh, gw) == tuple(g0):
        return pos
    cls_pos, patch_pos = pos[:1], pos[1:]
    dim = pos.shape[-1]
    patch_pos = patch_pos.reshape(1, g0[0], g0[1], dim).permute(0, 3, 1, 2)
    patch_pos = F.interpolate(
        patch_pos, scale_factor=((gh + 0.1) / g0[0], (gw + 0.1) / g0[1]), mode="bicubic", align_corners=False
    )
    if patch_pos.shape[-2:] != (gh, gw):  # cannot happen for sane grids; never silently misalign
        raise RuntimeError(f"positional embedding resized to {tuple(patch_pos.shape[-2:])}, expected {(gh, gw)}")
    return torch.cat([cls_pos, patch_pos.permute(0, 2, 3, 1).reshape(gh * gw, dim)], dim=0)


def embed_tokens(visual: nn.Module, pixels: Tensor) -> tuple[Tensor, tuple[int, int]]:
    """Patch embedding + CLS + positional embedding + ln_pre.

    pixels: (B, 3, H, W) normalised, in the model's dtype → tokens (B, 1 + gh·gw, D), grid (gh, gw).
    """
    x = visual.conv1(pixels)  # (B, D, gh, gw)
    gh, gw = x.shape[-2:]
    x = x.flatten(2).transpose(1, 2)
    cls = visual.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)
    x = torch.cat([cls, x], dim=1)
    pos = interpolate_pos_embed(visual.positional_embedding, pretrain_grid(visual), (gh, gw))
    x = x + pos.to(x.dtype)
    return visual.ln_pre(x), (int(gh), int(gw))


def split_heads(t: Tensor, num_heads: int) -> Tensor:
    """(B, L, H·d) → (B, H, L, d)."""
    b, n, c = t.shape
    return t.view(b, n, num_heads, c // num_heads).transpose(1, 2)


def merge_heads(t: Tensor) -> Tensor:
    """(B, H, L, d) → (B, L, H·d)."""
    b, h, n, d = t.shape
    return t.transpose(1, 2).reshape(b, n, h * d)


def block_qkv(block: nn.Module, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """q, k, v of a residual block on `ln_1(x)`: each (B, H, L, d)."""
    attn = block.attn
    qkv = F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias)
    q, k, v = qkv.chunk(3, dim=-1)
    return tuple(split_heads(t, attn.num_heads) for t in (q, k, v))  # type: ignore[return-value]


def softmax_attention(a: Tensor, b: Tensor, extra: Optional[Tensor] = None) -> Tensor:
    """softmax(a bᵀ·d^-1/2 [+ extra]) over the last axis, in float32 or wider.

    a, b: (B, H, L, d); extra broadcastable to (B, H, L, L) → (B, H, L, L).
    """
    dt = compute_dtype(a.dtype)
    logits = torch.matmul(a.to(dt), b.to(dt).transpose(-1, -2)) * a.shape[-1] ** -0.5
    if extra is not None:
        logits = logits + extra.to(dt)
    return logits.softmax(dim=-1)


def run_blocks(
    blocks: Iterable[nn.Module],
    x: Tensor,
    *,
    weight_overrides: Optional[Mapping[int, Mapping[str, Tensor]]] = None,
    capture: Iterable[int] = (),
) -> tuple[Tensor, dict[int, Tensor]]:
    """Run residual blocks unchanged; optionally with replaced weights, capturing attention maps.

    x: (B, L, D). `weight_overrides[i]` maps parameter names of block i (0-based) to tensors used
    instead of the block's own (the module is never modified). `capture` lists 0-based block
    indices whose head-averaged softmax(q kᵀ s) (B, L, L) is returned.
    Returns the tokens after the blocks and {index: map}.
    """
    overrides = weight_overrides or {}
    wanted = set(capture)
    maps: dict[int, Tensor] = {}
    for i, block in enumerate(blocks):
        if i in wanted:
            if any(name.startswith(("attn.", "ln_1.")) for name in overrides.get(i, {})):
                raise ValueError("captured blocks may not override attention weights")
            q, k, _ = block_qkv(block, x)
            maps[i] = softmax_attention(q, k).mean(dim=1)
        if i in overrides:
            x = functional_call(block, dict(overrides[i]), (x,), strict=False)
        else:
            x = block(x)
    return x, maps


def finish_last_block(block: nn.Module, x: Tensor, attn_values: Tensor, *, residual: bool, ffn: bool) -> Tensor:
    """The rest of the last block after attention.

    x: (B, L, D) tokens entering the block (used for the residual); attn_values: (B, H, M, d), the
    attention-weighted values. Returns O = [x +] out_proj(·) [+ mlp(ln_2(·))], shape (B, M, D).
    """
    out = block.attn.out_proj(merge_heads(attn_values).to(x.dtype))
    if residual:
        out = x + block.ls_1(out)
    if ffn:
        out = out + block.ls_2(block.mlp(block.ln_2(out)))
    return out


def finish_last_block_mixed(block: nn.Module, mixing: Tensor, coarse_values: Tensor, dtype: torch.dtype) -> Tensor:
    """The rest of a last block without residual and FFN whose attention-weighted values are M·v_c (ProxyCLIP
    with FSA: `fsa.feedback.adapted_mixing`): out_proj(M·v_c) = M·out_proj(v_c), since every row of M sums to 1
    and the bias passes through; the projection then runs on the C coarse cells instead of the N tokens.

    mixing: (B, N, C); coarse_values: (B, H, C, d) → (B, N, D) in dtype (the tokens').
    """
    projected = block.attn.out_proj(merge_heads(coarse_values).to(dtype))  # (B, C, D)
    return torch.bmm(mixing, projected.to(mixing.dtype)).to(dtype)


#: Parameters of a residual block that act after its attention (what `finish_block` may override).
_AFTER_ATTENTION = ("attn.out_proj", "ls_1", "ln_2", "mlp", "ls_2")


def finish_block(
    block: nn.Module,
    x: Tensor,
    attn_values: Tensor,
    *,
    weight_overrides: Optional[Mapping[str, Tensor]] = None,
) -> Tensor:
    """A whole residual block after its attention: x + ls_1(out_proj(·)), then + ls_2(mlp(ln_2(·))).

    x: (B, L, D) tokens entering the block; attn_values: (B, H, L, d), the attention-weighted
    values. `weight_overrides` replaces parameters after the attention (e.g. "mlp.c_proj.weight")
    without modifying the module, as `run_blocks` does. → (B, L, D).
    """
    overrides = dict(weight_overrides or {})
    bad = [name for name in overrides if not name.startswith(tuple(p + "." for p in _AFTER_ATTENTION))]
    if bad:
        raise ValueError(f"finish_block can only override parameters after the attention, not {bad}")

    def call(path: str, t: Tensor) -> Tensor:
        sub = {name[len(path) + 1:]: w for name, w in overrides.items() if name.startswith(path + ".")}
        module = block.get_submodule(path)
        return functional_call(module, sub, (t,), strict=False) if sub else module(t)

    out = x + call("ls_1", call("attn.out_proj", merge_heads(attn_values).to(x.dtype)))
    return out + call("ls_2", call("mlp", call("ln_2", out)))


def project_tokens(visual: nn.Module, tokens: Tensor) -> Tensor:
    """head(O) = normalize(ln_post(O) @ proj): (B, M, D) → (B, M, E)."""
    feats = visual.ln_post(tokens)
    if visual.proj is not None:
        feats = feats @ visual.proj
    return F.normalize(feats, dim=-1)
