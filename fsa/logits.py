"""Patch logits of a baseline, with or without FSA: the vision tower end to end (method.md §2-§4)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor, nn

from .attention import BaseAttention, baseline_attention
from .config import METHOD_DEFAULTS, FeedbackConfig, MethodOptions, check_method
from .feedback import adapted_attention, apply_new, class_distribution, ensemble_apply, output_similarity, prune_top_p
from .vision import block_qkv, compute_dtype, embed_tokens, finish_last_block, project_tokens, run_blocks


@dataclass
class FeedbackDetails:
    """What a diagnostic view needs to redo any row of the attention maps without the network.

    q, k: (B, H, L, d) of the last block; pi: (B, N, K) the class distribution Π; proxy_features
    (B, C, I, J) and fused_maps [(B, L, L)] where the method uses them.
    """

    method: str
    grid: tuple[int, int]  #: grid of the attention's patch tokens (the proxy grid for proxyclip)
    clip_grid: tuple[int, int]
    cls_token: bool
    q: Tensor
    k: Tensor
    pi: Tensor
    feedback: FeedbackConfig
    options: MethodOptions
    proxy_features: Optional[Tensor] = None
    fused_maps: list[Tensor] = field(default_factory=list)

    def select(self, index: int) -> "FeedbackDetails":
        """The details of one image of the batch, detached and on the CPU."""
        def one(t: Optional[Tensor]) -> Optional[Tensor]:
            return None if t is None else t[index:index + 1].detach().cpu()

        return FeedbackDetails(
            self.method, self.grid, self.clip_grid, self.cls_token, one(self.q), one(self.k), one(self.pi),
            self.feedback, self.options, one(self.proxy_features), [one(m) for m in self.fused_maps],
        )


@dataclass
class PatchLogits:
    """Cosines (B, K, h, w) of the baseline and, when FSA ran, of baseline + FSA."""

    baseline: Tensor
    fsa: Optional[Tensor]
    grid: tuple[int, int]
    details: Optional[FeedbackDetails] = None


def suppressed_c_proj(weight: Tensor) -> Tensor:
    """GCLIP channel suppression: the row of largest L2 norm rescaled to the others' mean norm.

    weight: (D, D_mlp) → a new tensor; the input is never modified.
    """
    norms = weight.norm(dim=1)
    top = int(norms.argmax())
    others = torch.cat([norms[:top], norms[top + 1:]])
    out = weight.clone()
    out[top] = out[top] * (others.mean() / norms[top])
    return out


def _encode_to_last_block(visual: nn.Module, pixels: Tensor, method: str, options: MethodOptions):
    """Tokens entering the last block, the grid, and GCLIP's fused maps."""
    x, grid = embed_tokens(visual, pixels)
    blocks = list(visual.transformer.resblocks)
    body = blocks[:-1]
    if method != "gclip":
        x, _ = run_blocks(body, x)
        return x, grid, []
    cfg = options.gclip
    depth = len(blocks)
    overrides = {}
    if cfg.channel_suppression:
        for b in cfg.resolved_suppression_blocks(depth):
            if b < depth:  # the last block has no FFN in GCLIP
                overrides[b - 1] = {"mlp.c_proj.weight": suppressed_c_proj(blocks[b - 1].mlp.c_proj.weight)}
    capture = [b - 1 for b in cfg.resolved_fusion_blocks(depth)] if cfg.attention_fusion else []
    x, maps = run_blocks(body, x, weight_overrides=overrides, capture=capture)
    return x, grid, [maps[i] for i in capture]


def _patch_cosines(visual: nn.Module, tokens: Tensor, text: Tensor, cls_token: bool) -> Tensor:
    """(B, M, D) block output → cosines (B, N, K) of the patch tokens with text (K, E)."""
    feats = project_tokens(visual, tokens)
    if cls_token:
        feats = feats[:, 1:]
    dt = compute_dtype(feats.dtype)
    return feats.to(dt) @ text.to(device=feats.device, dtype=dt).T


def _uniform_cosines(visual, block, x, base: BaseAttention, text, residual: bool, ffn: bool) -> Tensor:
    """Cosines under uniform attention (step 2), from the mean value instead of an N×N matrix.

    → (B, N, K) with a residual (each token keeps its own), else (B, 1, K) (all rows are equal).
    """
    mean_v = base.values.mean(dim=2, keepdim=True)
    if residual:
        out = finish_last_block(block, x, mean_v.expand_as(base.values), residual=True, ffn=ffn)
        return _patch_cosines(visual, out, text, base.cls_token)
    out = finish_last_block(block, x, mean_v, residual=False, ffn=ffn)
    return _patch_cosines(visual, out, text, cls_token=False)


@torch.no_grad()
def compute_patch_logits(
    model: nn.Module,
    pixels: Tensor,
    text_features: Tensor,
    method: str,
    *,
    feedback: Optional[FeedbackConfig] = None,
    proxy_features: Optional[Tensor] = None,
    options: Optional[MethodOptions] = None,
    keep_details: bool = False,
) -> PatchLogits:
    """Baseline cosines and, with `feedback`, the FSA cosines from the same forward pass.

    The baseline's own output is FSA's feedback signal (Z), so the pair costs one network pass.
    pixels: (B, 3, H, W) normalised in the model's dtype; text_features: (K, E) L2-normalised.
    """
    method = check_method(method)
    options = options or MethodOptions()
    visual = model.visual
    rule = METHOD_DEFAULTS[method]
    x, clip_grid, fused = _encode_to_last_block(visual, pixels, method, options)
    last = visual.transformer.resblocks[-1]
    q, k, v = block_qkv(last, x)
    base = baseline_attention(method, q, k, v, clip_grid, proxy_features=proxy_features, fused_maps=fused,
                              options=options)
    a0_v = base.apply(base.values)
    out = finish_last_block(last, x, a0_v, residual=rule.residual, ffn=rule.ffn)
    cos = _patch_cosines(visual, out, text_features, base.cls_token)  # (B, N, K)
    gh, gw = base.grid

    def to_grid(c: Tensor) -> Tensor:
        return c.transpose(1, 2).reshape(c.shape[0], c.shape[2], gh, gw)

    if feedback is None:
        return PatchLogits(to_grid(cos), None, base.grid)

    u_cos = (_uniform_cosines(visual, last, x, base, text_features, rule.residual, rule.ffn)
             if feedback.isolation else None)
    pi = class_distribution(cos, u_cos, feedback)
    sim = output_similarity(pi, feedback.eps)
    keep = prune_top_p(sim, feedback.p) if feedback.pruning else None
    a_new = adapted_attention(sim, keep, feedback.lam)
    del sim, keep
    if feedback.ensemble:
        mixed = ensemble_apply(a_new, base.weights, base.values, cls_token=base.cls_token, a0_v=a0_v)
    else:
        mixed = apply_new(a_new, base.values, cls_token=base.cls_token)
    fsa_out = finish_last_block(last, x, mixed, residual=rule.residual, ffn=rule.ffn)
    fsa_cos = _patch_cosines(visual, fsa_out, text_features, base.cls_token)
    details = None
    if keep_details:
        details = FeedbackDetails(method, base.grid, clip_grid, base.cls_token, q, k, pi, feedback, options,
                                  proxy_features, list(fused))
    return PatchLogits(to_grid(cos), to_grid(fsa_cos), base.grid, details)


def patch_logits(
    model: nn.Module,
    pixels: Tensor,
    text_features: Tensor,
    method: str,
    *,
    feedback: Optional[FeedbackConfig] = None,
    proxy_features: Optional[Tensor] = None,
    options: Optional[MethodOptions] = None,
) -> Tensor:
    """Cosine similarities (B, K, h, w) of the final patch features with `text_features`.

    model: an open_clip CLIP; pixels: normalised (B, 3, H, W) in the model's dtype; text_features:
    (K, E) L2-normalised; method: one of fsa.METHODS; feedback: FSA settings or None for the
    baseline; proxy_features: (B, C, I, J) for proxyclip (then h×w is I×J). No upsampling, no softmax.
    """
    result = compute_patch_logits(model, pixels, text_features, method, feedback=feedback,
                                  proxy_features=proxy_features, options=options)
    return result.baseline if feedback is None else result.fsa
