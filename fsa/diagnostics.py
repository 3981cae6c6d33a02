"""What a user sees for a query patch (docs/method.md §5), without rerunning the network.

Per window only grid-level data are kept: the last block's q, k (or the proxy features), the
fused maps, the uniform-attention cosines (U), and per feedback pass Π, the cosines it came from
(Z) and the q, k of the blocks the pass re-ran; the N×N matrices of one window are recomputed from
them on the first query there and kept for the next clicks in the same window.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from .attention import attention_weights
from .config import FeedbackConfig
from .feedback import adapted_attention, output_similarity, prune_top_p
from .logits import FeedbackDetails, FeedbackStep
from .sliding import Window, nearest_window
from .vision import softmax_attention
from .vocabulary import Vocabulary, aggregate_synonyms


@dataclass
class BlockExplanation:
    """One adapted block's rows for the query patch in one feedback pass, on the attention grid."""

    block: int  #: 1-based block number
    attn_original: np.ndarray  #: (H, gh, gw) this block's A₀[i] in this pass (CLS column dropped)
    attn_ensemble: np.ndarray  #: (H, gh, gw) A_ens[i] (A_new[i] when the ensemble is off)
    cls_attention: Optional[np.ndarray] = None  #: (H,) A₀[i, CLS]


@dataclass
class IterationExplanation:
    """The feedback of one pass t (1-based) for the query patch, on the attention grid (gh, gw).

    In the order of docs/method.md §3: Z_i and U_i (per query, K = synonyms counted separately), Π_i,
    Ŝ[i], the kept set, A_new[i], and per adapted block A_ens[i].
    """

    iteration: int
    attn_new: np.ndarray  #: (gh, gw) A_new[i] of this pass
    similarity: np.ndarray  #: (gh, gw) Ŝ[i]
    kept: np.ndarray  #: (gh, gw) bool, the entries kept by pruning (all True with pruning off)
    class_probs: np.ndarray  #: (C,) Π_i this pass adapted with, maximum over each class's synonyms
    blocks: list[BlockExplanation]  #: the adapted blocks, ascending
    #: (K,) Z_i = feedback_scale · cos_i: the baseline's logits for pass 1, pass t−1's output's after
    #: (None for details made without the cosines)
    feedback_logits: Optional[np.ndarray] = None
    #: (K,) U_i = isolation_scale · cos_i under uniform attention (the same every pass); None with
    #: isolation off
    isolation_logits: Optional[np.ndarray] = None
    query_probs: Optional[np.ndarray] = None  #: (K,) Π_i per query, softmax(Z_i − U_i) (softmax(Z_i), isolation off)

    @property
    def attn_ensemble(self) -> np.ndarray:
        """(H, gh, gw) A_ens[i] of the highest adapted block (the last block by default)."""
        return self.blocks[-1].attn_ensemble


@dataclass
class PatchExplanation:
    """Rows of the attention maps for one query patch, on the window's attention grid (gh, gw).

    The fields without a pass in their name are the last pass's; `iterations` holds every pass
    (one with the paper's settings) and, per pass, every adapted block.
    """

    window: Window  #: the extent the grid covers, in pixels of the result's image (past the border if padded)
    grid: tuple[int, int]
    patch: tuple[int, int]  #: (row, col) of the query patch
    num_heads: int
    attn_original: np.ndarray  #: (H, gh, gw) the baseline's last-block A₀[i] per head (CLS column dropped)
    attn_new: np.ndarray  #: (gh, gw) A_new[i]
    #: (H, gh, gw) A_ens[i] per head (A_new[i] when the ensemble is off) in the highest adapted
    #: block (the last block by default)
    attn_ensemble: np.ndarray
    similarity: np.ndarray  #: (gh, gw) Ŝ[i]
    kept: np.ndarray  #: (gh, gw) bool, the entries kept by pruning (all True with pruning off)
    class_probs: np.ndarray  #: (C,) Π_i, maximum over each class's synonyms
    class_names: list[str]
    cls_attention: Optional[np.ndarray] = None  #: (H,) A₀[i, CLS], the mass the dropped column held
    iterations: list[IterationExplanation] = field(default_factory=list)
    query_names: list[str] = field(default_factory=list)  #: (K,) the text queries of Z, U, query_probs
    query_classes: list[int] = field(default_factory=list)  #: (K,) index into class_names of each query
    feedback: Optional[FeedbackConfig] = None  #: the FSA settings of the run

    @staticmethod
    def head_view(maps: np.ndarray, head: Optional[int] = None) -> np.ndarray:
        """(H, gh, gw) → (gh, gw): the mean over heads (head None) or one head."""
        if head is None:
            return maps.mean(axis=0)
        if not 0 <= head < maps.shape[0]:
            raise ValueError(f"head {head} out of range 0..{maps.shape[0] - 1}")
        return maps[head]


@dataclass
class _StepMatrices:
    a_new: Tensor  # (N, N)
    sim: Tensor  # (N, N)
    keep: Optional[Tensor]  # (N, N) bool or None
    #: 1-based adapted block → (its A₀ in this pass: (H or 1, M, M) or None for the identity, CLS token?)
    a0: dict[int, tuple[Optional[Tensor], bool]]


@dataclass
class _WindowMatrices:
    a0: Optional[Tensor]  # (H or 1, M, M) the baseline's last-block A₀, or None (identity)
    steps: list[_StepMatrices]


def _steps_of(d: FeedbackDetails) -> list[FeedbackStep]:
    return d.steps or [FeedbackStep(d.pi)]


def _block_a0(d: FeedbackDetails, step: FeedbackStep, block: int, baseline_a0: Optional[Tensor]):
    """(A₀ of `block` in this pass, (H or 1, M, M) or None, and whether token 0 is CLS)."""
    if block < d.depth:
        q, k = step.block_qk[block]
        return softmax_attention(q, k)[0], True
    if block not in step.block_qk:  # the last block saw the baseline's tokens
        return baseline_a0, d.cls_token
    q, k = step.block_qk[block]
    fused = [softmax_attention(*step.block_qk[b]).mean(dim=1) if b in step.block_qk else m
             for b, m in zip(d.fused_blocks, d.fused_maps)]
    a0 = attention_weights(d.method, q, k, d.clip_grid, proxy_features=d.proxy_features, fused_maps=fused,
                           options=d.options)
    return (None if a0 is None else a0[0]), d.cls_token


def _ensemble_rows(a0: Optional[Tensor], a_new: Tensor, p: int, heads: int, *, cls_token: bool,
                   ensemble: bool) -> tuple[Tensor, Tensor]:
    """Rows of query token p: A₀[t] (H, M) and A_ens[t] (H, M), t = p (+1 with CLS).

    a0: (H or 1, M, M) or None (identity); a_new: (N, N). A_ens = (A_new A₀ + A₀ A_new + A_new)/3
    with A_new embedded as diag(1, A_new) when token 0 is CLS; A_new alone with the ensemble off.
    """
    t = p + 1 if cls_token else p
    n = a_new.shape[-1]
    a_new_row = a_new[p]
    new_embedded = torch.cat([a_new_row.new_zeros(1), a_new_row]) if cls_token else a_new_row
    if a0 is None:  # MaskCLIP: A₀ = I, so A_ens = A_new
        a0_rows = torch.zeros(heads, new_embedded.numel(), dtype=a_new_row.dtype)
        a0_rows[:, t] = 1.0
        return a0_rows, new_embedded.expand(heads, -1)
    a0_rows = a0[:, t].expand(heads, -1)
    if not ensemble:
        return a0_rows, new_embedded.expand(heads, -1)
    a0_full = a0.expand(heads, -1, -1)
    # (A_new A₀)[t] = e_t A₀ ; (A₀ A_new)[t] = A₀[t] diag(1, A_new) ; + A_new[t]
    left = torch.einsum("m,hmn->hn", new_embedded.to(a0_full.dtype), a0_full)
    patch_part = a0_rows[:, -n:] @ a_new.to(a0_rows.dtype)
    right = torch.cat([a0_rows[:, :1], patch_part], dim=1) if cls_token else patch_part
    return a0_rows, (left + right + new_embedded) / 3.0


class DiagnosticsStore:
    """Per-window feedback details of one segmentation, answering `explain(x, y)`."""

    def __init__(self, windows: Sequence[Window], details: Sequence[FeedbackDetails], scale: tuple[float, float],
                 vocabulary: Vocabulary):
        """windows: the extent each window's grid covers on the working image (a padded window's includes
        its padding); scale: (sy, sx) from the result's image to the working image."""
        self.windows = list(windows)
        self.details = list(details)
        self.scale = scale
        self.vocabulary = vocabulary
        self._lock = threading.Lock()
        self._cached: tuple[int, _WindowMatrices] | None = None

    def __getstate__(self) -> dict:
        # Picklable (ZeroGPU sends results between processes): drop the lock and the recomputable cache.
        state = self.__dict__.copy()
        del state["_lock"]
        state["_cached"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _matrices(self, index: int) -> _WindowMatrices:
        with self._lock:
            if self._cached is not None and self._cached[0] == index:
                return self._cached[1]
            d = self.details[index]
            cfg = d.feedback
            a0 = attention_weights(d.method, d.q, d.k, d.clip_grid, proxy_features=d.proxy_features,
                                   fused_maps=d.fused_maps, options=d.options)
            a0 = None if a0 is None else a0[0]
            steps = []
            for step in _steps_of(d):
                sim = output_similarity(step.pi, cfg.eps, cfg.similarity)
                keep = prune_top_p(sim, cfg.p) if cfg.pruning else None
                a_new = adapted_attention(sim, keep, cfg.lam)
                if d.depth:
                    blocks = {b: _block_a0(d, step, b, a0) for b in d.adapted_blocks()}
                else:  # details without the tower's depth: the last block, the paper's setting
                    blocks = {0: (a0, d.cls_token)}
                steps.append(_StepMatrices(a_new[0], sim[0], None if keep is None else keep[0], blocks))
            mats = _WindowMatrices(a0, steps)
            self._cached = (index, mats)
            return mats

    def locate(self, x: float, y: float) -> tuple[int, tuple[int, int]]:
        """Window index and (row, col) of the query patch for a point in the result's image pixels."""
        sy, sx = self.scale
        xw, yw = x * sx, y * sy
        index = nearest_window(self.windows, xw, yw)
        win = self.windows[index]
        gh, gw = self.details[index].grid
        row = min(gh - 1, int((yw - win.y0) * gh / win.height))
        col = min(gw - 1, int((xw - win.x0) * gw / win.width))
        return index, (row, col)

    @torch.no_grad()
    def explain(self, x: float, y: float) -> PatchExplanation:
        index, (row, col) = self.locate(x, y)
        d = self.details[index]
        mats = self._matrices(index)
        gh, gw = d.grid
        p = row * gw + col
        heads = d.q.shape[1]
        n = gh * gw

        def grid_of(rows: Tensor) -> np.ndarray:
            return rows[..., -n:].reshape(*rows.shape[:-1], gh, gw).float().numpy()

        cfg = d.feedback
        u_logits = None
        if d.u_cos is not None:  # (1, N or 1, K): one row per patch with a residual, else one for all
            u_row = d.u_cos[0, p if d.u_cos.shape[1] > 1 else 0]
            u_logits = (cfg.isolation_scale * u_row.double()).numpy()
        iterations = []
        for number, (step, sm) in enumerate(zip(_steps_of(d), mats.steps), start=1):
            blocks = []
            for block, (a0, cls_token) in sm.a0.items():
                a0_rows, ens_rows = _ensemble_rows(a0, sm.a_new, p, heads, cls_token=cls_token,
                                                   ensemble=d.feedback.ensemble)
                blocks.append(BlockExplanation(block, grid_of(a0_rows), grid_of(ens_rows),
                                               a0_rows[:, 0].float().numpy() if cls_token else None))
            keep_row = sm.keep[p] if sm.keep is not None else torch.ones(n, dtype=torch.bool)
            iterations.append(IterationExplanation(
                iteration=number,
                attn_new=grid_of(sm.a_new[p]),
                similarity=grid_of(sm.sim[p]),
                kept=keep_row.reshape(gh, gw).numpy(),
                class_probs=aggregate_synonyms(step.pi[0, p], self.vocabulary, dim=0).float().numpy(),
                blocks=blocks,
                feedback_logits=(None if step.z_cos is None
                                 else (cfg.feedback_scale * step.z_cos[0, p].double()).numpy()),
                isolation_logits=u_logits,
                query_probs=step.pi[0, p].double().numpy(),
            ))
        final = iterations[-1]
        if mats.a0 is None:
            a0_rows = torch.zeros(heads, (n + 1) if d.cls_token else n)
            a0_rows[:, p + 1 if d.cls_token else p] = 1.0
        else:
            a0_rows = mats.a0[:, p + 1 if d.cls_token else p].expand(heads, -1)
        sy, sx = self.scale
        win = self.windows[index]
        return PatchExplanation(
            window=win.scaled(1.0 / sy, 1.0 / sx),
            grid=(gh, gw),
            patch=(row, col),
            num_heads=heads,
            attn_original=grid_of(a0_rows),
            attn_new=final.attn_new,
            attn_ensemble=final.blocks[-1].attn_ensemble,
            similarity=final.similarity,
            kept=final.kept,
            class_probs=final.class_probs,
            class_names=list(self.vocabulary.class_names),
            cls_attention=a0_rows[:, 0].float().numpy() if d.cls_token else None,
            iterations=iterations,
            query_names=list(self.vocabulary.queries),
            query_classes=list(self.vocabulary.query_to_class),
            feedback=cfg,
        )
