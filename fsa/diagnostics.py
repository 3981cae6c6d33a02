"""What a user sees for a query patch (method.md §5), without rerunning the network.

Per window only the last block's q, k (or the proxy features), Π and the fused maps are kept; the
N×N matrices of one window are recomputed from them on the first query there and kept for the
next clicks in the same window.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from .attention import attention_weights
from .feedback import adapted_attention, output_similarity, prune_top_p
from .logits import FeedbackDetails
from .sliding import Window, nearest_window
from .vocabulary import Vocabulary, aggregate_synonyms


@dataclass
class PatchExplanation:
    """Rows of the attention maps for one query patch, on the window's attention grid (gh, gw)."""

    window: Window  #: in pixels of the result's image
    grid: tuple[int, int]
    patch: tuple[int, int]  #: (row, col) of the query patch
    num_heads: int
    attn_original: np.ndarray  #: (H, gh, gw) A₀[i] per head (CLS column dropped)
    attn_new: np.ndarray  #: (gh, gw) A_new[i]
    attn_ensemble: np.ndarray  #: (H, gh, gw) A_ens[i] per head (A_new[i] when the ensemble is off)
    similarity: np.ndarray  #: (gh, gw) Ŝ[i]
    kept: np.ndarray  #: (gh, gw) bool, the entries kept by pruning (all True with pruning off)
    class_probs: np.ndarray  #: (C,) Π_i, maximum over each class's synonyms
    class_names: list[str]
    cls_attention: Optional[np.ndarray] = None  #: (H,) A₀[i, CLS], the mass the dropped column held

    @staticmethod
    def head_view(maps: np.ndarray, head: Optional[int] = None) -> np.ndarray:
        """(H, gh, gw) → (gh, gw): the mean over heads (head None) or one head."""
        if head is None:
            return maps.mean(axis=0)
        if not 0 <= head < maps.shape[0]:
            raise ValueError(f"head {head} out of range 0..{maps.shape[0] - 1}")
        return maps[head]


@dataclass
class _WindowMatrices:
    a0: Optional[Tensor]  # (H or 1, M, M) or None (identity)
    a_new: Tensor  # (N, N)
    sim: Tensor  # (N, N)
    keep: Optional[Tensor]  # (N, N) bool or None


class DiagnosticsStore:
    """Per-window feedback details of one segmentation, answering `explain(x, y)`."""

    def __init__(self, windows: Sequence[Window], details: Sequence[FeedbackDetails], scale: tuple[float, float],
                 vocabulary: Vocabulary):
        """windows: on the working image; scale: (sy, sx) from the result's image to the working image."""
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
            a0 = attention_weights(d.method, d.q, d.k, d.clip_grid, proxy_features=d.proxy_features,
                                   fused_maps=d.fused_maps, options=d.options)
            sim = output_similarity(d.pi, d.feedback.eps)
            keep = prune_top_p(sim, d.feedback.p) if d.feedback.pruning else None
            a_new = adapted_attention(sim, keep, d.feedback.lam)
            mats = _WindowMatrices(None if a0 is None else a0[0], a_new[0], sim[0], None if keep is None else keep[0])
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
        t = p + 1 if d.cls_token else p
        heads = d.q.shape[1]
        n = gh * gw

        a_new_row = mats.a_new[p]
        new_embedded = torch.cat([a_new_row.new_zeros(1), a_new_row]) if d.cls_token else a_new_row
        if mats.a0 is None:  # MaskCLIP: A₀ = I, so A_ens = A_new
            a0_rows = torch.zeros(heads, new_embedded.numel(), dtype=a_new_row.dtype)
            a0_rows[:, t] = 1.0
            ens_rows = new_embedded.expand(heads, -1)
        else:
            a0_rows = mats.a0[:, t].expand(heads, -1)
            if d.feedback.ensemble:
                a0_full = mats.a0.expand(heads, -1, -1)
                # (A_new A₀)[t] = e_t A₀ ; (A₀ A_new)[t] = A₀[t] diag(1, A_new) ; + A_new[t]
                left = torch.einsum("m,hmn->hn", new_embedded, a0_full)
                patch_part = a0_rows[:, -n:] @ mats.a_new
                right = torch.cat([a0_rows[:, :1], patch_part], dim=1) if d.cls_token else patch_part
                ens_rows = (left + right + new_embedded) / 3.0
            else:
                ens_rows = new_embedded.expand(heads, -1)

        def grid_of(rows: Tensor) -> np.ndarray:
            return rows[..., -n:].reshape(*rows.shape[:-1], gh, gw).float().numpy()

        per_class = aggregate_synonyms(d.pi[0, p], self.vocabulary, dim=0)
        keep_row = mats.keep[p] if mats.keep is not None else torch.ones(n, dtype=torch.bool)
        sy, sx = self.scale
        win = self.windows[index]
        return PatchExplanation(
            window=win.scaled(1.0 / sy, 1.0 / sx),
            grid=(gh, gw),
            patch=(row, col),
            num_heads=heads,
            attn_original=grid_of(a0_rows),
            attn_new=grid_of(a_new_row),
            attn_ensemble=grid_of(ens_rows),
            similarity=grid_of(mats.sim[p]),
            kept=keep_row.reshape(gh, gw).numpy(),
            class_probs=per_class.float().numpy(),
            class_names=list(self.vocabulary.class_names),
            cls_attention=a0_rows[:, 0].float().numpy() if d.cls_token else None,
        )
