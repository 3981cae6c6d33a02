"""The proxy models' architectures and weights: builders, positional rules and strict checkpoint loading.

What :mod:`fsa.proxies` runs, kept apart from it so that each stays one concern:
- :func:`dino_position_table` and :func:`mae_position_table`: the published resampling rules of the
  positional tables (timm's own rule, antialiased, differs from both);
- :func:`build_proxy_model`: the timm container of a proxy family (ViT-B for the real proxies, small
  seeded random stand-ins for ``tiny-test``), weights not loaded;
- :func:`read_proxy_state` and :func:`load_proxy_state`: a local checkpoint (timm's hub file or the
  original release file) into that container, strictly: every key present with its shape, or a
  :class:`~fsa.hub.WeightsUnavailableError` naming the file, before any weight is copied.
"""
from __future__ import annotations

import math
from functools import partial
from types import MappingProxyType
from typing import Mapping

import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from timm.models.vision_transformer import VisionTransformer
from timm.layers import resample_abs_pos_embed_nhwc
from timm.models.vision_transformer_sam import (
    VisionTransformerSAM, checkpoint_filter_fn as sam_filter_fn, get_decomposed_rel_pos_bias, window_partition,
    window_unpartition,
)

from .hub import WeightsUnavailableError

#: Proxy families: how the published ProxyCLIP/FSA code runs each (see fsa.proxies.ProxyModel).
FAMILIES = ("dino", "dinov2", "mae", "sam")
#: SAM's image encoder always sees 1024 × 1024 pixels (the published code squashes every window to it).
SAM_INPUT_SIDE = 1024
#: Attention matrices SAM's global blocks build at once (`sam_features`): one per head and image, each
#: 4096 × 4096 float32 (64 MiB) plus its relative-position bias. timm builds all 12 heads' at once: 1.7 GB
#: for one window (measured), which no memory budget of a CPU server allows.
SAM_HEADS_AT_ONCE = 2
#: The real proxies in timm's registry; each one's weights are the hub repo ``timm/<name>``.
TIMM_NAMES = MappingProxyType({
    "dino": "vit_base_patch8_224.dino",
    "dinov2": "vit_base_patch14_reg4_dinov2.lvd142m",
    "mae": "vit_base_patch16_224.mae",  # MAE's mae_pretrain_vit_base.pth (the encoder), same key names
    "sam": "samvit_base_patch16.sa1b",  # SAM's sam_vit_b_01ec64.pth image encoder, keys renamed by timm
})


# --------------------------------------------------------------------------- positional tables
def _square_side(table: Tensor) -> int:
    if table.ndim != 3 or table.shape[0] != 1:
        raise ValueError(f"expected a (1, 1 + S*S, C) positional table, got shape {tuple(table.shape)}")
    side = math.isqrt(table.shape[1] - 1)
    if side * side != table.shape[1] - 1:
        raise ValueError(f"positional table has {table.shape[1] - 1} patch rows, not a square grid")
    return side


def dino_position_table(table: Tensor, grid: tuple[int, int]) -> Tensor:
    """Published DINO's positional embedding for a ``rows × cols`` patch grid.

    table: (1, 1 + S·S, C), the CLS row first, then the stored S×S patch table (row-major);
    grid: (rows, cols). Returns (1, 1 + rows·cols, C) in ``table``'s dtype.

    The rule of facebookresearch/dino ``vision_transformer.py`` (``interpolate_pos_encoding``, the
    model ``torch.hub.load('facebookresearch/dino:main', 'dino_vitb8')`` builds and ProxyCLIP/FSA run):
    at the stored grid (224×224 input for ViT-B/8) the table as stored; otherwise the S×S patch table
    resampled by ``F.interpolate`` with bicubic interpolation, no antialiasing, ``align_corners=False``,
    given as ``scale_factor=((rows + 0.1) / S, (cols + 0.1) / S)`` (rows first; the factor, not only
    the output size, sets where the output samples the table) and computed in the table's dtype
    (fp16 on CUDA). The CLS row is unchanged. timm's ``dynamic_img_size`` resampling (exact output
    size, antialiased, in float32) gives other values at every other grid.
    """
    rows, cols = int(grid[0]), int(grid[1])
    side = _square_side(table)
    if rows < 1 or cols < 1:
        raise ValueError(f"patch grid must be positive, got {rows}x{cols}")
    if (rows, cols) == (side, side):
        return table
    dim = table.shape[-1]
    patch_table = table[:, 1:].reshape(1, side, side, dim).permute(0, 3, 1, 2)
    resampled = F.interpolate(
        patch_table, scale_factor=((rows + 0.1) / side, (cols + 0.1) / side), mode="bicubic", align_corners=False
    )
    if resampled.shape[-2:] != (rows, cols):  # the +0.1 is there so that floor() gives the grid
        raise RuntimeError(f"DINO positional resampling gave {tuple(resampled.shape[-2:])}, not {rows}x{cols}")
    return torch.cat([table[:, :1], resampled.permute(0, 2, 3, 1).reshape(1, rows * cols, dim)], dim=1)


def mae_position_table(table: Tensor, side: int) -> Tensor:
    """Published MAE's positional embedding for a ``side × side`` patch grid.

    table: (1, 1 + S·S, C) as stored (the CLS row first); returns (1, 1 + side², C) in its dtype.

    MAE's ``interpolate_pos_embed`` (facebookresearch/mae ``util/pos_embed.py``; FSA's
    ``mae/pos_embed.py``), which the published code runs once when it builds the model at
    ``img_size = slide_crop``: the S×S patch table resampled by ``F.interpolate(size=(side, side),
    mode="bicubic", align_corners=False)`` (no antialiasing) in the checkpoint's dtype, the CLS row
    unchanged; the table as stored when ``side == S``.
    """
    stored = _square_side(table)
    side = int(side)
    if side < 1:
        raise ValueError(f"patch grid side must be positive, got {side}")
    if side == stored:
        return table
    dim = table.shape[-1]
    patch_table = table[:, 1:].reshape(1, stored, stored, dim).permute(0, 3, 1, 2)
    resampled = F.interpolate(patch_table, size=(side, side), mode="bicubic", align_corners=False)
    return torch.cat([table[:, :1], resampled.permute(0, 2, 3, 1).flatten(1, 2)], dim=1)


# --------------------------------------------------------------------------- architectures
def _vit(**kwargs) -> VisionTransformer:
    return VisionTransformer(num_classes=0, dynamic_img_size=True, **kwargs)


def _sam(**kwargs) -> VisionTransformerSAM:
    # SAM's blocks use LayerNorm eps 1e-6; timm's registered samvit_* builds them with nn.LayerNorm's
    # 1e-5 (features ~5e-5 off the published ones) unless told. The neck's LayerNorm2d has 1e-6.
    return VisionTransformerSAM(img_size=SAM_INPUT_SIDE, patch_size=16, window_size=14, use_rel_pos=True,
                                num_classes=0, norm_layer=partial(nn.LayerNorm, eps=1e-6), **kwargs)


def _randomise_positions(model: nn.Module) -> None:
    """timm leaves SAM's positional and relative-position tables at zero: a stand-in gets random ones."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name == "pos_embed" or name.endswith(("rel_pos_h", "rel_pos_w")):
                param.normal_(0.0, 0.02)


def build_proxy_model(family: str, *, stand_in: bool, seed: int = 0) -> nn.Module:
    """The timm container of a proxy family, random weights (seeded; the global RNG is left untouched).

    stand_in=False: the real ViT-B architecture from timm's registry (:data:`TIMM_NAMES`), weights not
    loaded: DINO ViT-B/8, DINOv2 ViT-B/14 with registers, MAE ViT-B/16 (224 pre-training grid, a
    14×14 table), SAM ViT-B/16's image encoder (1024² input, windows of 14, global blocks 3, 6, 9, 12,
    neck 256) with SAM's LayerNorm eps 1e-6. stand_in=True: the same layout at width 32, depth 2,
    2 heads (SAM: global block 2, neck 32): the ``tiny-test`` proxies.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown proxy family {family!r}; one of {', '.join(FAMILIES)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if not stand_in:
            extra = dict(norm_layer=partial(nn.LayerNorm, eps=1e-6)) if family == "sam" else dict(dynamic_img_size=True)
            model = timm.create_model(TIMM_NAMES[family], pretrained=False, num_classes=0, **extra)
        else:
            size = dict(embed_dim=32, depth=2, num_heads=2)
            if family == "dino":
                model = _vit(img_size=224, patch_size=8, **size)
            elif family == "dinov2":
                model = _vit(img_size=224, patch_size=14, reg_tokens=4, no_embed_class=True, init_values=1e-5, **size)
            elif family == "mae":
                model = _vit(img_size=224, patch_size=16, **size)
            else:
                model = _sam(global_attn_indexes=(1,), neck_chans=32, **size)
        if family == "sam":
            _randomise_positions(model)
        return model


# --------------------------------------------------------------------------- SAM's forward
def _sam_attention(attn: nn.Module, x: Tensor, heads_at_once: int) -> Tensor:
    """timm's SAM ``Attention.forward`` on (B, H, W, C) tokens, its (B·heads) attentions `heads_at_once` at a
    time: each head's attention is computed as timm computes it (same bias, same kernel), only fewer of their
    N × N matrices are alive at once."""
    b, h, w, _ = x.shape
    n = h * w
    qkv = attn.qkv(x.reshape(b, n, -1)).view(b, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.reshape(3, b * attn.num_heads, n, -1).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    out = torch.empty_like(q)
    for s in range(0, q.shape[0], heads_at_once):
        qs, ks, vs = q[s:s + heads_at_once], k[s:s + heads_at_once], v[s:s + heads_at_once]
        bias = (get_decomposed_rel_pos_bias(qs, attn.rel_pos_h, attn.rel_pos_w, (h, w), (h, w))
                if attn.use_rel_pos else None)
        if attn.fused_attn:
            out[s:s + heads_at_once] = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=bias)
        else:
            scores = (qs * attn.scale) @ ks.transpose(-2, -1)
            if bias is not None:
                scores = scores + bias
            out[s:s + heads_at_once] = scores.softmax(dim=-1) @ vs
        del bias
    x = out.view(b, attn.num_heads, n, -1).transpose(1, 2).reshape(b, n, -1)
    return attn.proj(x).view(b, h, w, -1)


def sam_features(model: VisionTransformerSAM, x: Tensor, heads_at_once: int = SAM_HEADS_AT_ONCE) -> Tensor:
    """timm's ``VisionTransformerSAM.forward_features`` at inference (dropouts skipped): (B, 3, 1024, 1024) →
    (B, C, 64, 64) neck output, every block's attention run `heads_at_once` (image, head) pairs at a time
    (`_sam_attention`). The same features; measured on CPU (ViT-B, 2 at once), one window's forward peaks at
    +377 MiB instead of timm's +1676 MiB, two windows at +507 MiB instead of +3368 MiB."""
    if any(getattr(blk.attn, "rope", None) is not None for blk in model.blocks):
        return model.forward_features(x)  # not SAM's layout: timm's own forward
    x = model.patch_embed(x)
    if model.pos_embed is not None:
        x = x + resample_abs_pos_embed_nhwc(model.pos_embed, x.shape[1:3])
    x = model.norm_pre(model.patch_drop(model.pos_drop(x)))
    for blk in model.blocks:
        b, h, w, _ = x.shape
        shortcut, y, pad_hw = x, blk.norm1(x), None
        if blk.window_size > 0:
            y, pad_hw = window_partition(y, blk.window_size)
        y = blk.ls1(_sam_attention(blk.attn, y, heads_at_once))
        if blk.window_size > 0:
            y = window_unpartition(y, blk.window_size, (h, w), pad_hw)
        x = (shortcut + y).reshape(b, h * w, -1)
        x = (x + blk.ls2(blk.mlp(blk.norm2(x)))).reshape(b, h, w, -1)
    return model.neck(x.permute(0, 3, 1, 2))


# --------------------------------------------------------------------------- checkpoints
def read_proxy_state(path: str) -> dict[str, Tensor]:
    """The tensors of a checkpoint file: safetensors, or a torch pickle of tensors only
    (``weights_only``), unwrapped from a ``{'model': ...}`` or ``{'state_dict': ...}`` envelope
    (MAE's release files). Raises :class:`WeightsUnavailableError` naming the file."""
    try:
        if str(path).endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - pickle/safetensors/IO errors alike
        raise WeightsUnavailableError(
            f"could not read proxy checkpoint {path} ({type(exc).__name__}: {_first_line(exc)}); "
            "pass a .safetensors/.pth/.bin state dict (FSA_PROXY_CHECKPOINT)") from exc
    for envelope in ("model", "state_dict"):
        if isinstance(state, Mapping) and isinstance(state.get(envelope), Mapping):
            state = state[envelope]
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise WeightsUnavailableError(f"proxy checkpoint {path} is not a state dict of tensors")
    return dict(state)


def _family_keys(family: str, state: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """Release-file key names → the timm container's (names only, tensors untouched)."""
    if family == "sam":  # sam_vit_b_01ec64.pth: drop prompt encoder/mask decoder, strip image_encoder., lin → fc
        return sam_filter_fn(state, model)
    if family == "mae":  # MAE's full pre-training files also hold the decoder; the encoder is what runs
        return {k: v for k, v in state.items() if not k.startswith(("decoder_", "mask_token"))}
    return state


def _describe(state: Mapping[str, Tensor]) -> str:
    """What a checkpoint looks like, to say why it does not fit."""
    keys = set(state)
    if any(k.startswith(("image_encoder.", "neck.")) for k in keys):
        return "a SAM image encoder"
    weight = state.get("patch_embed.proj.weight")
    if weight is not None and weight.ndim == 4:
        blocks = len({k.split(".")[1] for k in keys if k.startswith("blocks.")})
        extra = ", with register tokens" if "reg_token" in keys else ""
        return f"a ViT with {weight.shape[-1]}-pixel patches, width {weight.shape[0]}, {blocks} blocks{extra}"
    return f"{len(keys)} tensors of another model (e.g. {', '.join(sorted(keys)[:3])})"


def load_proxy_state(model: nn.Module, family: str, path: str, *, what: str) -> None:
    """Load ``path`` into ``model`` strictly, or raise :class:`WeightsUnavailableError` naming the file
    and ``what`` was expected; nothing is copied unless every key is there with its shape."""
    raw = read_proxy_state(path)
    state = _family_keys(family, raw, model)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k} {tuple(state[k].shape)} (needs {tuple(v.shape)})" for k, v in expected.items()
             if k in state and state[k].shape != v.shape]
    if missing or unexpected or wrong:
        problems = []
        if missing:
            problems.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:2])})")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:2])})")
        if wrong:
            problems.append(f"{len(wrong)} of other shapes (e.g. {wrong[0]})")
        raise WeightsUnavailableError(
            f"proxy checkpoint {path} is not {what} weights: it looks like {_describe(raw)}; "
            f"{'; '.join(problems)}. Point FSA_PROXY_CHECKPOINT at the proxy's own file or choose the proxy "
            "this file belongs to")
    model.load_state_dict(state, strict=True)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]


__all__ = ["FAMILIES", "SAM_HEADS_AT_ONCE", "SAM_INPUT_SIDE", "TIMM_NAMES", "build_proxy_model", "dino_position_table",
           "load_proxy_state", "sam_features",
           "mae_position_table", "read_proxy_state"]
