"""Blocks 1..L-1 of the vision tower ("the trunk"), run once for every method that shares them.

Every baseline runs the trunk unchanged but GCLIP, which replaces a c_proj row in blocks 8..11 and
keeps the attention maps of its fusion blocks (docs/method.md §4). Several methods on the same pixels
therefore share the embedding and every block before the first one where their weights differ
(all of it for vanilla, MaskCLIP, SCLIP, ClearCLIP, NACLIP and ProxyCLIP; blocks 1..7 with GCLIP).
`run_trunks` runs each block once per distinct set of weights, in the same calls as a method run
alone (`fsa.vision.run_blocks`, one block at a time), so every method's tokens are bit for bit the
ones it gets alone.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from .config import MethodOptions
from .vision import run_blocks


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


@dataclass
class TowerPlan:
    """How blocks 1..L-1 run for a method: replaced weights and captured maps, by 0-based block."""

    overrides: dict[int, dict[str, Tensor]] = field(default_factory=dict)
    capture: list[int] = field(default_factory=list)


def tower_plan(blocks: Sequence[nn.Module], method: str, options: MethodOptions) -> TowerPlan:
    """GCLIP's suppressed c_proj rows and fusion blocks; nothing for the other methods."""
    if method != "gclip":
        return TowerPlan()
    cfg = options.gclip
    depth = len(blocks)
    overrides = {}
    if cfg.channel_suppression:
        for b in cfg.resolved_suppression_blocks(depth):
            if b < depth:  # the last block has no FFN in GCLIP
                overrides[b - 1] = {"mlp.c_proj.weight": suppressed_c_proj(blocks[b - 1].mlp.c_proj.weight)}
    capture = [b - 1 for b in cfg.resolved_fusion_blocks(depth)] if cfg.attention_fusion else []
    return TowerPlan(overrides, capture)


@dataclass
class TrunkNeed:
    """What one method needs from the trunk: its plan, and the 0-based blocks whose entering tokens it keeps."""

    plan: TowerPlan
    keep: frozenset = frozenset()


@dataclass
class Trunk:
    """A method's trunk: the tokens entering the last block, and what it asked for on the way."""

    x: Tensor  #: (B, L, D)
    clip_grid: tuple[int, int]
    entering: dict[int, Tensor]  #: 0-based block → tokens entering it
    maps: dict[int, Tensor]  #: 0-based block → its head-averaged softmax(q kᵀ s), (B, L, L)


def _same(a: Optional[dict[str, Tensor]], b: Optional[dict[str, Tensor]]) -> bool:
    if not a or not b:
        return not a and not b
    return a.keys() == b.keys() and all(a[k] is b[k] or torch.equal(a[k], b[k]) for k in a)


def run_trunks(visual: nn.Module, x: Tensor, clip_grid: tuple[int, int], needs: Sequence[TrunkNeed]) -> list[Trunk]:
    """The trunk of every method in `needs` from the same embedded tokens x (B, L, D) (`fsa.vision.embed_tokens`),
    each block run once per distinct weights: → one `Trunk` per need, equal bit for bit to running that need
    alone."""
    blocks = list(visual.transformer.resblocks)
    entering: list[dict[int, Tensor]] = [{} for _ in needs]
    maps: list[dict[int, Tensor]] = [{} for _ in needs]
    groups: list[tuple[list[int], Tensor]] = [(list(range(len(needs))), x)]
    for i, block in enumerate(blocks[:-1]):
        split: list[tuple[list[int], Tensor]] = []
        for members, tokens in groups:
            parts: list[tuple[Optional[dict[str, Tensor]], list[int]]] = []
            for j in members:
                weights = needs[j].plan.overrides.get(i)
                for part in parts:
                    if _same(part[0], weights):
                        part[1].append(j)
                        break
                else:
                    parts.append((weights, [j]))
            for weights, part in parts:
                capture = [j for j in part if i in needs[j].plan.capture]
                for j in part:
                    if i in needs[j].keep:
                        entering[j][i] = tokens
                out, got = run_blocks([block], tokens, weight_overrides={0: weights} if weights else None,
                                      capture=[0] if capture else [])
                for j in capture:
                    maps[j][i] = got[0]
                split.append((part, out))
        groups = split
    result: list[Optional[Trunk]] = [None] * len(needs)
    for members, tokens in groups:
        for j in members:
            result[j] = Trunk(tokens, clip_grid, entering[j], maps[j])
    return result  # type: ignore[return-value]
