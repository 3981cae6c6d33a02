"""Text features of query names: 80 OpenAI ImageNet templates, averaged (docs/method.md §1)."""
from __future__ import annotations

import threading
from typing import Callable, Optional, Sequence

import open_clip
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

from .backbones import LoadedClip
from .hub import Progress, report_progress

#: The 80 OpenAI ImageNet prompt templates as format strings ("a bad photo of a {}.", ...).
TEMPLATES: tuple[str, ...] = tuple(template("{}") for template in OPENAI_IMAGENET_TEMPLATES)
assert len(TEMPLATES) == 80, f"expected the 80 OpenAI templates, open_clip has {len(TEMPLATES)}"


def encode_prompts(model: nn.Module, tokens: Tensor) -> Tensor:
    """(N, L) token ids → (N, E) text features: ``model.encode_text(tokens)``, run over the first T
    positions only, T = 1 + the last end-of-text position in the batch.

    CLIP's text tower is causal and pools the end-of-text token, which attends only to the tokens
    before it: the padding after it changes nothing but costs most of the work (a prompt is ~10 of
    the 77 tokens). Equal up to float rounding; a model of another kind runs ``encode_text`` as is.
    """
    if not _is_causal_argmax_clip(model) or tokens.shape[1] != model.positional_embedding.shape[0]:
        return model.encode_text(tokens)
    length = int(tokens.argmax(dim=-1).max()) + 1  # argmax: the end-of-text id is the largest id
    tokens = tokens[:, :length]
    cast_dtype = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens).to(cast_dtype) + model.positional_embedding[:length].to(cast_dtype)
    x = model.transformer(x, attn_mask=model.attn_mask[:length, :length])
    x = model.ln_final(x)
    x = x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]
    return model.text_projection(x) if isinstance(model.text_projection, nn.Linear) else x @ model.text_projection


def _is_causal_argmax_clip(model: nn.Module) -> bool:
    """An open_clip ``CLIP`` whose text tower is causal and pools the end-of-text token by argmax."""
    mask = getattr(model, "attn_mask", None)
    if not isinstance(model, open_clip.CLIP) or getattr(model, "text_pool_type", None) != "argmax" or mask is None:
        return False
    future = torch.ones_like(mask, dtype=torch.bool).triu(1)
    return bool(torch.isneginf(mask[future]).all()) and bool((mask[~future] == 0).all())


def prompts(name: str) -> list[str]:
    """The 80 prompts of one query name."""
    return [template.format(name) for template in TEMPLATES]


class TextFeatureCache:
    """Per-(model, name) text features; safe to share between threads.

    ``names_per_batch`` names (x80 prompts) go through the text encoder at once. ``on_encoded`` is
    called after a call that encoded new names, e.g. to give the text tower's freed activations back
    to the OS before the image's work takes its share (the demo app does).
    """

    def __init__(self, names_per_batch: int = 8, on_encoded: Optional[Callable[[], None]] = None) -> None:
        if names_per_batch < 1:
            raise ValueError("names_per_batch must be >= 1")
        self.names_per_batch = names_per_batch
        self.on_encoded = on_encoded
        self._lock = threading.Lock()
        self._features: dict[tuple[str, str], torch.Tensor] = {}

    def __len__(self) -> int:
        with self._lock:
            return len(self._features)

    def clear(self) -> None:
        with self._lock:
            self._features.clear()

    @torch.no_grad()
    def encode(self, clip: LoadedClip, names: Sequence[str], progress: Optional[Progress] = None) -> torch.Tensor:
        """(K, E) float32 on ``clip.device``: row k = normalize(mean_t normalize(encode_text(t(names[k]))))
        (`encode_prompts`).

        Only names not cached for ``clip.key`` are encoded. Holding the lock while encoding keeps
        two requests for the same names from encoding them twice.
        """
        names = [str(n) for n in names]
        embed_dim = clip.model.text_projection.shape[-1]
        if not names:
            return torch.empty(0, embed_dim, dtype=torch.float32, device=clip.device)
        with self._lock:
            missing = list(dict.fromkeys(n for n in names if (clip.key, n) not in self._features))
            for start in range(0, len(missing), self.names_per_batch):
                batch = missing[start:start + self.names_per_batch]
                # no "k of n" beside the page's percentage, which is the whole run's: it read as nonsense
                message = f"Encoding {len(missing)} new class name{'s' if len(missing) > 1 else ''} ({start} done)"
                report_progress(progress, start / len(missing), message)
                tokens = clip.tokenizer([p for name in batch for p in prompts(name)]).to(clip.device)
                per_prompt = F.normalize(encode_prompts(clip.model, tokens).float(), dim=-1)  # (B*80, E)
                per_name = F.normalize(per_prompt.view(len(batch), len(TEMPLATES), -1).mean(dim=1), dim=-1)
                for name, feature in zip(batch, per_name):
                    self._features[(clip.key, name)] = feature
            if missing:
                report_progress(progress, 1.0, f"Encoded {len(missing)} class name(s)")
                if self.on_encoded is not None:
                    self.on_encoded()
            return torch.stack([self._features[(clip.key, n)] for n in names])
