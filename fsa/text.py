"""Text features of query names: 80 OpenAI ImageNet templates, averaged (method.md §1)."""
from __future__ import annotations

import threading
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

from .backbones import LoadedClip, Progress, report_progress

#: The 80 OpenAI ImageNet prompt templates as format strings ("a bad photo of a {}.", ...).
TEMPLATES: tuple[str, ...] = tuple(template("{}") for template in OPENAI_IMAGENET_TEMPLATES)
assert len(TEMPLATES) == 80, f"expected the 80 OpenAI templates, open_clip has {len(TEMPLATES)}"


def prompts(name: str) -> list[str]:
    """The 80 prompts of one query name."""
    return [template.format(name) for template in TEMPLATES]


class TextFeatureCache:
    """Per-(model, name) text features; safe to share between threads.

    ``names_per_batch`` names (x80 prompts) go through the text encoder at once.
    """

    def __init__(self, names_per_batch: int = 8) -> None:
        if names_per_batch < 1:
            raise ValueError("names_per_batch must be >= 1")
        self.names_per_batch = names_per_batch
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
        """(K, E) float32 on ``clip.device``: row k = normalize(mean_t normalize(encode_text(t(names[k])))).

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
                message = f"Encoding class names {start + 1}-{start + len(batch)} of {len(missing)}"
                report_progress(progress, start / len(missing), message)
                tokens = clip.tokenizer([p for name in batch for p in prompts(name)]).to(clip.device)
                per_prompt = F.normalize(clip.model.encode_text(tokens).float(), dim=-1)  # (B*80, E)
                per_name = F.normalize(per_prompt.view(len(batch), len(TEMPLATES), -1).mean(dim=1), dim=-1)
                for name, feature in zip(batch, per_name):
                    self._features[(clip.key, name)] = feature
            if missing:
                report_progress(progress, 1.0, f"Encoded {len(missing)} class name(s)")
            return torch.stack([self._features[(clip.key, n)] for n in names])
