"""Patch logits of a baseline, with or without FSA: the vision tower end to end (docs/method.md §2-§4).

Beyond the paper's single pass into the last block, `FeedbackConfig` opens three questions the
paper leaves open, each a switch whose default is the paper:

- `similarity`: the divergence behind Ŝ (fsa.feedback.output_similarity).
- `iterations` k ≥ 1: pass t adapts with Π_t = softmax(20·Z_{t−1} − 35·U), Z_{t−1} the patch
  cosines of pass t−1's output (Z_0: the baseline's). U, the uniform-attention branch, is computed
  once from the baseline. A_ens of every pass uses the baseline's A₀ (with `blocks` that re-run
  earlier blocks: the A₀ of the re-run, see below), never the previous pass's A_ens.
- `blocks`: the 1-based blocks that receive the adapted attention (None = the last, L). One
  A_new (from Π_t) is shared by every adapted block of pass t. When the first adapted block is
  b₀ < L, each pass re-runs blocks b₀..L from the baseline's tokens entering b₀:
    * adapted block b < L: A₀ is that block's own softmax(q kᵀ s) on the re-run tokens, per
      head, L×L with CLS (A_new embedded as diag(1, A_new)); the block keeps its residual and
      FFN: x + ls_1(out_proj(A_ens v)), then + ls_2(mlp(ln_2(·)));
    * a block b₀ < b < L that is not adapted runs unchanged;
    * the last block runs the baseline's own variant on the re-run tokens (its A₀ computed from
      them, its residual/FFN rule); when L is adapted, A_ens uses that A₀.
  GCLIP on the re-run keeps its suppressed c_proj rows in every block, adapted or not, and fuses
  the head-averaged softmax(q kᵀ s) of its fusion blocks as computed on the re-run's tokens (the
  block's own A₀, also when that block is adapted; blocks before b₀ are the baseline's).
  ProxyCLIP refuses blocks other than the last: its last-block attention and Π live on the proxy
  grid while earlier blocks attend on the CLIP grid, and no resampling rule comes from the paper.

An ablation sweep (`compute_sweep_logits`) shares the network work across several settings: the
encoder and the baseline run once, each setting then runs only its own feedback passes. Several
methods on the same pixels (`compute_methods_logits`, compare-all) share blocks 1..L-1 too
(`fsa.trunk.run_trunks`: once per distinct weights) and the last block's q, k, v where their trunk
tokens are the same; each method's results stay bit for bit those it gets alone.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from .attention import BaseAttention, baseline_attention
from .config import METHOD_DEFAULTS, FeedbackConfig, MethodOptions, check_method
from .feedback import UpsampledValues, adapt_values, adapted_mixing, class_distribution, feedback_attention
from .trunk import TowerPlan, Trunk, TrunkNeed, run_trunks, tower_plan
from .vision import (block_qkv, compute_dtype, embed_tokens, finish_block, finish_last_block, finish_last_block_mixed,
                     project_tokens, run_blocks, softmax_attention)


@dataclass
class FeedbackStep:
    """One feedback pass (iteration t = position + 1), as much as the diagnostics need to redo it.

    pi: (B, N, K) the class distribution Π_t the pass adapted with. block_qk: 1-based block →
    (q, k), each (B, H, L, d), on the tokens that entered that block in this pass, for the blocks
    the pass re-ran whose attention a diagnostic view needs (the adapted ones, GCLIP's fusion
    blocks); a block absent here saw the baseline's tokens (FeedbackDetails.q/k, fused_maps).
    z_cos: (B, N, K) the patch cosines behind this pass's feedback logits Z = feedback_scale · z_cos:
    the baseline's output for pass 1, pass t−1's output after (None in details made without it).
    """

    pi: Tensor
    block_qk: dict[int, tuple[Tensor, Tensor]] = field(default_factory=dict)
    z_cos: Optional[Tensor] = None


@dataclass
class FeedbackDetails:
    """What a diagnostic view needs to redo any row of the attention maps without the network.

    q, k: (B, H, L, d) of the baseline's last block; pi: (B, N, K) the class distribution Π of the
    last pass; proxy_features (B, C, I, J) and fused_maps [(B, L, L)] (the baseline's, in the order
    of fused_blocks) where the method uses them; steps: one `FeedbackStep` per pass (iteration);
    depth: blocks in the vision tower; u_cos: the patch cosines under uniform attention behind the
    isolation logits U = isolation_scale · u_cos, (B, N, K) with a residual, else (B, 1, K) (every
    row is the same), None with isolation off.
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
    steps: list[FeedbackStep] = field(default_factory=list)
    depth: int = 0
    fused_blocks: tuple[int, ...] = ()  #: 1-based GCLIP fusion blocks of fused_maps
    u_cos: Optional[Tensor] = None

    def adapted_blocks(self) -> tuple[int, ...]:
        """1-based blocks that received the adapted attention (the last block by default)."""
        return self.feedback.blocks or (self.depth,)

    def select(self, index: int) -> "FeedbackDetails":
        """The details of one image of the batch, detached and on the CPU, in tensors of their own."""
        def one(t: Optional[Tensor]) -> Optional[Tensor]:
            # A copy: a slice keeps the whole batch's storage alive (q, k: all of qkv), in a session's memory
            # and in its pickle; .cpu() alone returns the same tensor on the CPU.
            return None if t is None else t[index:index + 1].detach().to("cpu", copy=True)

        steps = [FeedbackStep(one(s.pi), {b: (one(q), one(k)) for b, (q, k) in s.block_qk.items()},
                              one(s.z_cos)) for s in self.steps]
        return FeedbackDetails(
            self.method, self.grid, self.clip_grid, self.cls_token, one(self.q), one(self.k),
            steps[-1].pi if steps else one(self.pi), self.feedback, self.options, one(self.proxy_features),
            [one(m) for m in self.fused_maps], steps, self.depth, self.fused_blocks, one(self.u_cos),
        )


@dataclass
class PatchLogits:
    """Cosines (B, K, h, w) of the baseline and, when FSA ran, of baseline + FSA."""

    baseline: Tensor
    fsa: Optional[Tensor]
    grid: tuple[int, int]
    details: Optional[FeedbackDetails] = None


def resolve_feedback_blocks(feedback: FeedbackConfig, depth: int, method: str) -> tuple[int, ...]:
    """The 1-based blocks FSA adapts, checked against the tower's depth and the method.

    Raises ValueError for blocks outside 1..depth, and for proxyclip with any block but the last.
    """
    blocks = feedback.blocks or (depth,)
    bad = [b for b in blocks if not 1 <= b <= depth]
    if bad:
        raise ValueError(f"FeedbackConfig.blocks {bad} outside 1..{depth} for a {depth}-block vision tower")
    if check_method(method) == "proxyclip" and blocks != (depth,):
        raise ValueError("proxyclip: FeedbackConfig.blocks can only be the last block (None or "
                         f"({depth},)): its attention and Π are on the proxy grid, earlier blocks on the CLIP grid")
    return tuple(blocks)


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


def _rerun_pass(
    visual: nn.Module,
    x_start: Tensor,
    start: int,
    plan: TowerPlan,
    baseline_maps: dict[int, Tensor],
    a_new: Tensor,
    adapted: tuple[int, ...],
    feedback: FeedbackConfig,
    method: str,
    clip_grid: tuple[int, int],
    proxy_features: Optional[Tensor],
    options: MethodOptions,
) -> tuple[Tensor, dict[int, tuple[Tensor, Tensor]]]:
    """One feedback pass that re-runs blocks start+1..L (1-based) from x_start (module docstring).

    x_start: (B, L, D) the baseline's tokens entering block start+1; a_new: (B, N, N) on the CLIP
    grid. Returns the last block's output (B, M, D) and {1-based block: (q, k)} of the re-run's
    adapted blocks and GCLIP fusion blocks.
    """
    blocks = list(visual.transformer.resblocks)
    depth = len(blocks)
    rule = METHOD_DEFAULTS[method]
    maps = {i: m for i, m in baseline_maps.items() if i < start}
    qk: dict[int, tuple[Tensor, Tensor]] = {}
    x = x_start
    for i in range(start, depth - 1):
        block, number = blocks[i], i + 1
        overrides = plan.overrides.get(i, {})
        if number not in adapted and i not in plan.capture:
            x, _ = run_blocks([block], x, weight_overrides={0: overrides} if overrides else None)
            continue
        q, k, v = block_qkv(block, x)
        a0 = softmax_attention(q, k)  # (B, H, L, L): the block's own attention on the re-run tokens
        qk[number] = (q, k)
        if i in plan.capture:
            maps[i] = a0.mean(dim=1)
        if number in adapted:
            mixed = adapt_values(a_new, a0, v, feedback, cls_token=True)
            x = finish_block(block, x, mixed, weight_overrides=overrides)
        else:
            x, _ = run_blocks([block], x, weight_overrides={0: overrides} if overrides else None)
        del a0
    last = blocks[-1]
    q, k, v = block_qkv(last, x)
    base = baseline_attention(method, q, k, v, clip_grid, proxy_features=proxy_features,
                              fused_maps=[maps[i] for i in plan.capture], options=options)
    if depth in adapted:
        qk[depth] = (q, k)
        mixed = adapt_values(a_new, base.weights, base.values, feedback, cls_token=base.cls_token)
    else:
        mixed = base.apply(base.values)
    return finish_last_block(last, x, mixed, residual=rule.residual, ffn=rule.ffn), qk


@dataclass
class SweepLogits:
    """Cosines (B, K, h, w) of the baseline and of each FSA setting of a sweep, from one network pass."""

    baseline: Tensor
    fsa: list[Tensor]  #: one per FeedbackConfig, in the order given
    grid: tuple[int, int]


@dataclass
class _Forward:
    """What `_forward` computed: patch cosines (B, N, K) of the baseline and of each FSA setting."""

    baseline: Tensor
    fsa: list[Tensor]
    grid: tuple[int, int]
    details: list[FeedbackDetails]  #: one per setting when kept, else empty


@dataclass(frozen=True)
class MethodRun:
    """One method of `compute_methods_logits`: its FSA settings (none: the baseline alone), options and
    proxy features (B, C, I, J) for proxyclip; keep_details keeps `FeedbackDetails` per setting."""

    method: str
    feedbacks: tuple[FeedbackConfig, ...] = ()
    options: Optional[MethodOptions] = None
    proxy_features: Optional[Tensor] = None
    keep_details: bool = False


@dataclass
class _Prepared:
    method: str
    options: MethodOptions
    adapted_per: list[tuple[int, ...]]  #: 1-based adapted blocks per setting
    starts: list[int]  #: 0-based first block each setting re-runs; depth - 1: the last block alone
    plan: TowerPlan


def _prepare(blocks: list[nn.Module], run: MethodRun) -> _Prepared:
    method = check_method(run.method)
    options = run.options or MethodOptions()
    depth = len(blocks)
    adapted_per = [resolve_feedback_blocks(fb, depth, method) for fb in run.feedbacks]
    return _Prepared(method, options, adapted_per, [adapted[0] - 1 for adapted in adapted_per],
                     tower_plan(blocks, method, options))


def _forward_many(model: nn.Module, pixels: Tensor, text_features: Tensor, runs: Sequence[MethodRun]) -> list[_Forward]:
    """Every run's `_forward` on the same pixels, the trunk shared (`fsa.trunk.run_trunks`): each result
    is bit for bit the one its run gets alone. All runs are checked before any work."""
    blocks = list(model.visual.transformer.resblocks)
    depth = len(blocks)
    prepared = [_prepare(blocks, run) for run in runs]
    needs = [TrunkNeed(p.plan, frozenset(s for s in p.starts if s < depth - 1)) for p in prepared]
    x, clip_grid = embed_tokens(model.visual, pixels)
    trunks = run_trunks(model.visual, x, clip_grid, needs)
    shared: dict = {}  # the last block's q, k, v and the uniform branch, per trunk tokens: the same for such methods
    return [_head(model, trunk, text_features, prep, run, shared) for trunk, prep, run in zip(trunks, prepared, runs)]


def _forward(
    model: nn.Module,
    pixels: Tensor,
    text_features: Tensor,
    method: str,
    feedbacks: Sequence[FeedbackConfig],
    *,
    proxy_features: Optional[Tensor],
    options: Optional[MethodOptions],
    keep_details: bool,
) -> _Forward:
    """The encoder and the baseline once, then each setting's feedback passes (module docstring).

    The trunk keeps the tokens entering every distinct first re-run block of the settings; running the
    blocks one at a time is the same arithmetic as at once, so every setting's output is the one it gets
    alone. All settings are checked before any work.
    """
    run = MethodRun(method, tuple(feedbacks), options, proxy_features, keep_details)
    return _forward_many(model, pixels, text_features, [run])[0]


def _head(model: nn.Module, trunk: Trunk, text_features: Tensor, prep: _Prepared, run: MethodRun,
          shared: dict) -> _Forward:
    """The last block of a method on its trunk: the baseline, then each FSA setting's passes.

    shared: what methods on the same trunk tokens compute alike (q, k, v of the last block; the cosines under
    uniform attention for the same values and residual/FFN rule), kept by the first and reused: the same
    operations on the same tensors, so each method's results are those it gets alone."""
    method, options, plan = prep.method, prep.options, prep.plan
    feedbacks, proxy_features, keep_details = run.feedbacks, run.proxy_features, run.keep_details
    adapted_per, starts = prep.adapted_per, prep.starts
    visual = model.visual
    rule = METHOD_DEFAULTS[method]
    blocks = list(visual.transformer.resblocks)
    depth = len(blocks)
    x, clip_grid, entering, maps = trunk.x, trunk.clip_grid, trunk.entering, trunk.maps
    fused = [maps[i] for i in plan.capture]
    last = blocks[-1]
    key = id(x)
    if ("qkv", key) not in shared:
        shared[("qkv", key)] = (x, block_qkv(last, x))  # x kept so that its id is not reused
    q, k, v = shared[("qkv", key)][1]
    base = baseline_attention(method, q, k, v, clip_grid, proxy_features=proxy_features, fused_maps=fused,
                              options=options)
    a0_v = base.apply(base.values)
    upsampled = _upsampled_values(method, v, clip_grid, base.grid)
    out = finish_last_block(last, x, a0_v, residual=rule.residual, ffn=rule.ffn)
    cos = _patch_cosines(visual, out, text_features, base.cls_token)  # (B, N, K)
    result = _Forward(cos, [], base.grid, [])
    if not feedbacks:
        return result

    u_cos = None  # the same for every setting and pass
    if any(fb.isolation for fb in feedbacks):
        u_key = ("uniform", key, id(base.values), base.cls_token, rule.residual, rule.ffn)
        if u_key not in shared:
            shared[u_key] = (base.values, _uniform_cosines(visual, last, x, base, text_features, rule.residual,
                                                           rule.ffn))
        u_cos = shared[u_key][1]
    for feedback, adapted, start in zip(feedbacks, adapted_per, starts):
        steps: list[FeedbackStep] = []
        fsa_cos = cos
        for _ in range(feedback.iterations):
            z_cos = fsa_cos  # this pass's feedback signal: the baseline's output, then the previous pass's
            pi = class_distribution(z_cos, u_cos if feedback.isolation else None, feedback)
            a_new = feedback_attention(pi, feedback)
            if start >= depth - 1:  # the last block alone, always with the baseline's A₀
                mixing = None if rule.residual or rule.ffn else adapted_mixing(
                    a_new, base.weights, feedback, cls_token=base.cls_token, upsampled=upsampled)
                if mixing is not None:  # out_proj on the coarse grid's values, before the mixing
                    fsa_out = finish_last_block_mixed(last, mixing, upsampled.coarse, x.dtype)
                else:
                    mixed = adapt_values(a_new, base.weights, base.values, feedback, cls_token=base.cls_token,
                                         a0_v=a0_v, upsampled=upsampled)
                    fsa_out = finish_last_block(last, x, mixed, residual=rule.residual, ffn=rule.ffn)
                    del mixed
                block_qk = {}
                del mixing
            else:
                fsa_out, block_qk = _rerun_pass(visual, entering[start], start, plan, maps, a_new, adapted, feedback,
                                                method, clip_grid, proxy_features, options)
            del a_new
            fsa_cos = _patch_cosines(visual, fsa_out, text_features, base.cls_token)
            if keep_details:
                steps.append(FeedbackStep(pi, block_qk, z_cos))
        result.fsa.append(fsa_cos)
        if keep_details:
            result.details.append(FeedbackDetails(
                method, base.grid, clip_grid, base.cls_token, q, k, steps[-1].pi, feedback, options, proxy_features,
                list(fused), steps, depth, tuple(i + 1 for i in plan.capture),
                u_cos if feedback.isolation else None))
    return result


def _upsampled_values(method: str, v: Tensor, clip_grid: tuple[int, int],
                      grid: tuple[int, int]) -> Optional[UpsampledValues]:
    """ProxyCLIP's values are CLIP's (v: (B, H, 1 + gh·gw, d), CLS first) resized to the proxy grid: the
    ensemble can then work on the CLIP grid (fsa.feedback.ensemble_apply_upsampled). None otherwise."""
    if method != "proxyclip" or tuple(clip_grid) == tuple(grid):
        return None
    return UpsampledValues(v[:, :, 1:], tuple(clip_grid), tuple(grid))


def _to_grid(cos: Tensor, grid: tuple[int, int]) -> Tensor:
    """(B, N, K) → (B, K, h, w)."""
    return cos.transpose(1, 2).reshape(cos.shape[0], cos.shape[2], *grid)


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

    The baseline's own output is FSA's feedback signal (Z), so the pair costs one network pass
    (plus one last block per further iteration, or blocks b₀..L per pass when `feedback.blocks`
    starts at b₀ < L). Every pass t adapts with Π from pass t−1's output (the baseline's for t = 1),
    U computed once, and A_ens with the baseline's A₀ (the re-run's A₀ in re-run blocks): see the
    module docstring. Raises ValueError for blocks outside the tower, or other than the last for
    proxyclip.
    pixels: (B, 3, H, W) normalised in the model's dtype; text_features: (K, E) L2-normalised.
    """
    out = _forward(model, pixels, text_features, method, [] if feedback is None else [feedback],
                   proxy_features=proxy_features, options=options, keep_details=keep_details)
    if feedback is None:
        return PatchLogits(_to_grid(out.baseline, out.grid), None, out.grid)
    details = out.details[0] if keep_details else None
    return PatchLogits(_to_grid(out.baseline, out.grid), _to_grid(out.fsa[0], out.grid), out.grid, details)


@torch.no_grad()
def compute_sweep_logits(
    model: nn.Module,
    pixels: Tensor,
    text_features: Tensor,
    method: str,
    feedbacks: Sequence[FeedbackConfig],
    *,
    proxy_features: Optional[Tensor] = None,
    options: Optional[MethodOptions] = None,
) -> SweepLogits:
    """The baseline and every FSA setting of `feedbacks` with one encoder pass (an ablation sweep).

    The encoder and the baseline's last block run once; each setting then runs only its own
    feedback passes (the last block per iteration, or blocks b₀..L from the kept tokens entering b₀).
    `fsa[i]` equals `compute_patch_logits(..., feedback=feedbacks[i]).fsa` bit for bit, and
    `baseline` its `.baseline`. Every setting is checked (blocks) before any work.
    pixels: (B, 3, H, W) normalised in the model's dtype; text_features: (K, E) L2-normalised.
    """
    out = _forward(model, pixels, text_features, method, list(feedbacks), proxy_features=proxy_features,
                   options=options, keep_details=False)
    return SweepLogits(_to_grid(out.baseline, out.grid), [_to_grid(c, out.grid) for c in out.fsa], out.grid)


@dataclass
class MethodLogits:
    """Cosines (B, K, h, w) of one method's baseline and of each of its FSA settings (`compute_methods_logits`)."""

    baseline: Tensor
    fsa: list[Tensor]  #: one per FeedbackConfig of the run, in its order
    grid: tuple[int, int]
    details: list[FeedbackDetails]  #: one per setting when the run keeps them, else empty


@torch.no_grad()
def compute_methods_logits(model: nn.Module, pixels: Tensor, text_features: Tensor,
                           runs: Sequence[MethodRun]) -> list[MethodLogits]:
    """Several methods (each with any FSA settings) on the same pixels, the trunk shared: blocks 1..L-1 run
    once per distinct weights (all methods but GCLIP share them; GCLIP from its first suppressed block).

    Each result equals, bit for bit, `compute_sweep_logits` (or `compute_patch_logits`) of its run alone.
    pixels: (B, 3, H, W) normalised in the model's dtype; text_features: (K, E) L2-normalised.
    """
    outs = _forward_many(model, pixels, text_features, runs)
    return [MethodLogits(_to_grid(o.baseline, o.grid), [_to_grid(c, o.grid) for c in o.fsa], o.grid, o.details)
            for o in outs]


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
