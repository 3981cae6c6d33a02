"""The memory budgets of a public deployment: `RuntimeLimits` from the environment, the class budget
and the attention budget of a batch of windows, checked against a `fsa.planning.RequestPlan` before any
model work. No Gradio here: the handlers turn an `OverBudget` refusal into a message."""
from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Mapping, Optional, Sequence

from ..config import METHOD_DEFAULTS, SegmentSettings
from ..images import DEFAULT_MAX_PIXELS
from ..planning import RequestPlan, WindowPlan


def _env_number(environ: Mapping[str, str], name: str, default, kind: type):
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = kind(float(raw)) if kind is int and float(raw).is_integer() else kind(raw)
    except ValueError:
        value = None
    if value is None or not value > 0:
        raise ValueError(f"{name}={raw!r} is not a positive {'whole ' if kind is int else ''}number; "
                         f"unset it for the default ({default})")
    return value


@dataclass(frozen=True)
class RuntimeLimits:
    """Bounds that keep a public deployment alive; `from_env` reads them from the environment.

    The defaults are sized for a free Hugging Face CPU Space (2 vCPU, 16 GB RAM) running ViT-B/16:
    one forward pass at a time, and no single request above ~1.5 GB of extra memory (measured with
    `python -m fsa loadtest`, see the README).
    """

    #: FSA_CONCURRENCY: forward passes at once (each up to ~0.6 GB above the server's level on ViT-B/16).
    concurrency: int = 1
    #: FSA_SESSION_TTL: seconds a session keeps its last pass after its last request; dropped at
    #: once when the page is closed.
    session_ttl: float = 900.0
    #: FSA_MAX_PIXELS: pixels decoded from an upload at most (JPEGs count after the decoder's 1/8
    #: reduction). 120 MP: a 10000×10000 photo passes; ≤ 5 bytes a pixel while decoding (a palette
    #: image expanded to RGBA), so ≤ 600 MB.
    max_pixels: int = DEFAULT_MAX_PIXELS
    #: FSA_MAX_CLASSES: text queries (class names and synonyms) at most, for a working image of
    #: `CLASS_BUDGET_PIXELS`; larger working images get proportionally fewer. The score maps cost
    #: ~8 bytes per query and working pixel (two float32 canvases, baseline and FSA, averaged in place;
    #: the decision works on 16 MB bands), besides the text tower's activations while new names are
    #: encoded: measured +584 MB with ViT-B/16 for 150 new queries on a 2000×1500 photo (597×448
    #: working pixels). 150: ADE20K's vocabulary fits; encoding 150 new names takes ~1 min on 2 vCPUs.
    max_classes: int = 150
    #: FSA_TEMP_TTL: seconds Gradio's temp files (uploads, the PNGs sent back) are kept.
    temp_ttl: float = 900.0

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> "RuntimeLimits":
        """The limits from FSA_CONCURRENCY, FSA_SESSION_TTL, FSA_MAX_PIXELS, FSA_MAX_CLASSES, FSA_TEMP_TTL;
        `ValueError` naming the variable when one is not a positive number."""
        d = cls()
        return cls(
            concurrency=_env_number(environ, "FSA_CONCURRENCY", d.concurrency, int),
            session_ttl=_env_number(environ, "FSA_SESSION_TTL", d.session_ttl, float),
            max_pixels=_env_number(environ, "FSA_MAX_PIXELS", d.max_pixels, int),
            max_classes=_env_number(environ, "FSA_MAX_CLASSES", d.max_classes, int),
            temp_ttl=_env_number(environ, "FSA_TEMP_TTL", d.temp_ttl, float),
        )

    @property
    def temp_sweep_every(self) -> float:
        """How often the temp folder is swept: files live at most temp_ttl + this."""
        return max(1.0, min(300.0, self.temp_ttl / 3))


#: Working pixels FSA_MAX_CLASSES is meant for: a 4:3 photo at the default short side (597 × 448).
CLASS_BUDGET_PIXELS = 597 * 448
#: Attention memory one batch of windows may take: heads × tokens² float32 matrices, ATTENTION_COPIES of
#: them alive at once. Measured on CPU with ViT-B/16: one 768×1024 window (3072 tokens) peaks at ~1.9
#: such matrices (0.85 GB above the rest of the request); the default 448-px windows take ~0.2 GB for a
#: batch of 4. The batch shrinks to fit; a single window above the budget is refused.
ATTENTION_BUDGET_BYTES = 2**30
ATTENTION_COPIES = 2
#: ProxyCLIP's N×N matrices over the proxy grid alive at once for one window: ONE affinity shared by all heads,
#: its softmax, and FSA's similarity, kept set, A_new and ensemble. Measured on CPU with ViT-B/16 at N = 4096
#: (SAM's 64×64 grid): 3.2 (baseline) and 6.9 (FSA, details kept) such float32 matrices per window.
PROXYCLIP_MATRICES = 8
#: Class names encoded at once (× 80 prompts). Measured on ViT-B/16, 40 new names: 2 a batch peak at +272 MB
#: in 16 s, 8 a batch at +365 MB in 20 s.
TEXT_NAMES_PER_BATCH = 2
#: Text features kept (≈2-4 KB each); the cache is emptied when it grows past this.
TEXT_CACHE_MAX_NAMES = 20_000


def class_budget(working_hw: tuple[int, int], max_classes: int) -> int:
    """Text queries (class names and synonyms) allowed on a working image of `working_hw` (h, w): FSA_MAX_CLASSES
    up to CLASS_BUDGET_PIXELS, proportionally fewer above."""
    wh, ww = working_hw
    return min(max_classes, int(max_classes * CLASS_BUDGET_PIXELS // max(1, wh * ww)))


def class_budget_message(queries: int, working_hw: tuple[int, int], max_classes: int) -> Optional[str]:
    """Why `queries` text queries on a working image of `working_hw` exceed the budget, or None."""
    wh, ww = working_hw
    allowed = class_budget(working_hw, max_classes)
    if queries <= allowed:
        return None
    if allowed < 1:
        return (f"The image is resized to {ww}×{wh} pixels for the network, too large for this server's "
                f"memory budget: lower the short side (Advanced settings).")
    where = "" if allowed == max_classes else (f" for a {ww}×{wh} working image (lower the short side in "
                                               f"Advanced settings to allow more)")
    return (f"The vocabulary has {queries} names (class names and synonyms); this server takes at most "
            f"{allowed}{where}. Remove some names (limit FSA_MAX_CLASSES={max_classes}).")


def attention_bytes(tokens: int, heads: int) -> int:
    """Bytes of one window's attention: `heads` (tokens + 1)² float32 matrices, ATTENTION_COPIES of each."""
    return heads * (tokens + 1) ** 2 * 4 * ATTENTION_COPIES


def window_batch_for(tokens: int, heads: int, requested: int) -> int:
    """Windows per forward pass so that their attention stays within ATTENTION_BUDGET_BYTES (0: none fits)."""
    return max(0, min(requested, ATTENTION_BUDGET_BYTES // attention_bytes(tokens, heads)))


def window_needs(windows: WindowPlan) -> list[tuple[str, int]]:
    """(what, bytes) of each attention one window of `windows` builds, one after the other: CLIP's heads over its
    patches; with ProxyCLIP, the proxy's own forward (its heads over its own tokens: SAM's global blocks over
    4096, a few heads at a time) and the one N×N affinity over the proxy grid, shared by all heads."""
    gh, gw = windows.clip_grid
    needs = [(f"CLIP's attention ({windows.heads} heads over {gh}×{gw} patches)",
              attention_bytes(windows.clip_tokens, windows.heads))]
    if windows.proxy_grid is not None:
        ph, pw = windows.proxy_grid
        proxy = f"the {windows.proxy_label} proxy ({windows.proxy_name})"
        if windows.proxy_attention is not None:
            matrices, tokens = windows.proxy_attention
            needs.append((f"{proxy}'s own attention ({matrices} heads at once over {tokens} tokens)",
                          matrices * tokens ** 2 * 4 * ATTENTION_COPIES))
        needs.append((f"ProxyCLIP's {ph * pw}×{ph * pw} affinity over {proxy}'s {ph}×{pw} grid",
                      PROXYCLIP_MATRICES * (ph * pw) ** 2 * 4))
    return needs


class OverBudget(ValueError):
    """A request this server's limits refuse, with what to change."""


def fit_to_budget(plan: RequestPlan, limits: RuntimeLimits,
                  settings_list: Sequence[SegmentSettings]) -> list[SegmentSettings]:
    """`settings_list` (those `plan` was made for, in order), each with a window batch whose attention fits
    ATTENTION_BUDGET_BYTES; `OverBudget` when the vocabulary is over the class budget of the plan's working
    image, or when a single window does not fit."""
    message = class_budget_message(plan.queries, plan.working_size, limits.max_classes)
    if message is not None:
        raise OverBudget(message)
    fitted = []
    for settings, windows in zip(settings_list, plan.windows, strict=True):
        what, need = max(window_needs(windows), key=lambda item: item[1])
        batch = max(0, min(settings.window_batch, ATTENTION_BUDGET_BYTES // need))
        if batch < 1:
            win_h, win_w = windows.window_size
            advice = (f"Lower the window crop (the method's default is {METHOD_DEFAULTS[settings.method].crop}) or "
                      f"the short side in Advanced settings.")
            if windows.proxy_grid is None:
                raise OverBudget(f"A {win_w}×{win_h}-pixel window ({windows.tokens} patches) needs more attention "
                                 f"memory than this server allows. {advice}")
            advice = advice[:-1] + ", or pick another proxy (SAM's grid is 64×64 whatever the window)."
            raise OverBudget(
                f"A {win_w}×{win_h}-pixel window needs more attention memory than this server allows with the "
                f"{windows.proxy_label} proxy ({windows.proxy_name}): {what} takes {need / 2**20:.0f} MiB of the "
                f"{ATTENTION_BUDGET_BYTES / 2**20:.0f} MiB a batch of windows may use. {advice}")
        fitted.append(settings if batch == settings.window_batch else replace(settings, window_batch=batch))
    return fitted
