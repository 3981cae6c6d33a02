"""CLIP backbone loading: names, weights (HF cache / hub / local file), the tiny test model, a cache.

Weights come through huggingface_hub. Offline, a plain ``hf_hub_download`` retries for ~25 s per
file before it gives up; :func:`fetch_hub_file` instead looks in the cache first, then probes the
hub for a few seconds, and raises :class:`WeightsUnavailableError` with the ways out.
"""
from __future__ import annotations

import os
import threading
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence, Union

import huggingface_hub
import open_clip
import torch
from huggingface_hub import constants as hf_constants
from huggingface_hub.errors import RemoteEntryNotFoundError
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from open_clip.model import CLIPTextCfg, CLIPVisionCfg

from .config import BACKBONES, TINY_TEST

if TYPE_CHECKING:  # pragma: no cover - import cycle at runtime (proxies imports this module)
    from .proxies import ProxyModel

#: ``progress(fraction in [0, 1], message)``, as Gradio's ``gr.Progress`` takes it.
Progress = Callable[[float, str], None]
DeviceLike = Union[str, torch.device, None]

#: Seconds the reachability probe of the hub may take before we call it unreachable.
HUB_PROBE_TIMEOUT_S = 3.0


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights are neither cached nor downloadable (or a given checkpoint is unusable)."""


@dataclass(frozen=True)
class _Spec:
    name: str  #: canonical name (config.BACKBONES or TINY_TEST)
    arch: str  #: open_clip architecture
    tag: str  #: open_clip pretrained tag ("" for the test model)


# OpenAI weights were trained with QuickGELU: the "-quickgelu" configs, never plain "ViT-B-16".
_SPECS = MappingProxyType({
    "ViT-B-16": _Spec("ViT-B-16", "ViT-B-16-quickgelu", "openai"),
    "ViT-L-14": _Spec("ViT-L-14", "ViT-L-14-quickgelu", "openai"),
    "ViT-H-14": _Spec("ViT-H-14", "ViT-H-14", "laion2b_s32b_b79k"),
    TINY_TEST: _Spec(TINY_TEST, "", ""),
})
assert set(BACKBONES) | {TINY_TEST} == set(_SPECS)


def _alias_key(name: str) -> str:
    """'ViT-B/16', 'vit_b_16', 'vitb16' -> 'vitb16'."""
    return "".join(ch for ch in name.lower() if ch.isalnum())


_ALIASES = MappingProxyType({_alias_key(n): n for n in _SPECS} | {"tiny": TINY_TEST, "test": TINY_TEST})


def resolve_backbone_name(name: Optional[str]) -> str:
    """Canonical backbone name; None/"" -> ``$FSA_MODEL`` or "ViT-B-16". Unknown -> ``ValueError``."""
    raw = name or os.environ.get("FSA_MODEL") or "ViT-B-16"
    canonical = _ALIASES.get(_alias_key(raw))
    if canonical is None:
        raise ValueError(f"unknown backbone {raw!r}; choose one of {', '.join((*BACKBONES, TINY_TEST))}")
    return canonical


def tiny_test_hint() -> str:
    """The last way out of a missing-weights error: try the random-weights test model.

    Suggests setting FSA_MODEL=tiny-test only where it is not already set: then the real backbone
    (or proxy) was asked for explicitly, and the way out is to choose the test model instead.
    """
    if _ALIASES.get(_alias_key(os.environ.get("FSA_MODEL") or "")) == TINY_TEST:
        return (f"or choose the {TINY_TEST} backbone (--backbone {TINY_TEST}, or the Backbone menu of the app; "
                f"FSA_MODEL is already {TINY_TEST}) to try it with random weights")
    return f"or set FSA_MODEL={TINY_TEST} to try the app with random weights"


def resolve_device(device: DeviceLike = None) -> torch.device:
    """None -> cuda if available else cpu. Asking for CUDA without one is a ``ValueError``."""
    if device is None or device == "":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"invalid device {str(device)!r}; use cpu, cuda or cuda:N") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {str(device)!r} requested but CUDA is not available; use --device cpu")
        if dev.index is None:  # "cuda" and "cuda:0" must share cache entries
            dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def model_dtype(device: torch.device) -> torch.dtype:
    """fp16 on CUDA (as the published code runs), fp32 elsewhere."""
    return torch.float16 if device.type == "cuda" else torch.float32


def report_progress(progress: Optional[Progress], fraction: float, message: str) -> None:
    """Call ``progress`` if there is one."""
    if progress is not None:
        progress(fraction, message)


# --------------------------------------------------------------------------- Hugging Face files
def _hub_unreachable(timeout: Optional[float] = None) -> Optional[str]:
    """None if the hub endpoint answers within ``timeout`` s (default HUB_PROBE_TIMEOUT_S), else why not.

    Runs in a daemon thread so that a slow DNS lookup (not covered by socket timeouts) cannot
    block us either. urllib honours HTTPS_PROXY like huggingface_hub does; HF_ENDPOINT is honoured
    through huggingface_hub's constants.
    """
    timeout = HUB_PROBE_TIMEOUT_S if timeout is None else timeout
    outcome: dict[str, str] = {}

    def probe() -> None:
        try:
            request = urllib.request.Request(hf_constants.ENDPOINT, method="HEAD")
            urllib.request.urlopen(request, timeout=timeout).close()
        except urllib.error.HTTPError:
            pass  # any HTTP status means the server is there
        except Exception as exc:  # noqa: BLE001 - every failure means "unreachable"
            outcome["error"] = str(getattr(exc, "reason", None) or exc) or type(exc).__name__

    thread = threading.Thread(target=probe, name="fsa-hub-probe", daemon=True)
    thread.start()
    thread.join(timeout + 1.0)
    if thread.is_alive():
        return f"no answer within {timeout:g} s"
    return outcome.get("error")


def fetch_hub_file(
    repo_id: str,
    filenames: Sequence[str],
    *,
    what: str,
    alternatives: str,
    progress: Optional[Progress] = None,
) -> str:
    """Local path of the first of ``filenames`` (preferred format first) of HF repo ``repo_id``.

    Order: the HF cache (no network); else, unless HF_HUB_OFFLINE is set and if the hub answers a
    quick probe, a download. Otherwise :class:`WeightsUnavailableError` naming ``what`` (e.g.
    "ViT-B-16 CLIP"), the repo and file, and the ways out (``alternatives`` is appended).
    """
    for filename in filenames:
        cached = huggingface_hub.try_to_load_from_cache(repo_id, filename)
        if isinstance(cached, str):
            return cached

    where = f"{what} weights ({repo_id}, file {filenames[0]})"
    fixes = (
        f"on a machine with internet run `hf download {repo_id} {filenames[0]}` "
        f"(older clients: `huggingface-cli download ...`) and copy its cache here or point HF_HOME at it, "
        f"{alternatives}"
    )
    cache = hf_constants.HF_HUB_CACHE
    if huggingface_hub.is_offline_mode():
        raise WeightsUnavailableError(
            f"{where} are not in the Hugging Face cache {cache} and HF_HUB_OFFLINE is set: "
            f"unset HF_HUB_OFFLINE to download them, or {fixes}"
        )
    reason = _hub_unreachable()
    if reason is not None:
        raise WeightsUnavailableError(
            f"{where} are not in the Hugging Face cache {cache} and {hf_constants.ENDPOINT} is unreachable "
            f"({reason}): {fixes}"
        )
    report_progress(progress, 0.05, f"Downloading {what} weights from {repo_id}")
    for filename in filenames:
        try:
            return huggingface_hub.hf_hub_download(repo_id, filename)
        except RemoteEntryNotFoundError:
            continue  # the repo has the other format
        except Exception as exc:  # noqa: BLE001 - network/auth/disk errors all mean "unavailable"
            raise WeightsUnavailableError(f"downloading {where} failed ({type(exc).__name__}: {exc}); {fixes}") from exc
    raise WeightsUnavailableError(f"{repo_id} has none of {', '.join(filenames)}; {fixes}")


# --------------------------------------------------------------------------- CLIP
@dataclass
class LoadedClip:
    """An eval-mode, frozen open_clip CLIP with what the pipeline needs to use it."""

    model: open_clip.CLIP
    tokenizer: Callable[[list[str]], torch.Tensor]  #: list of K strings -> (K, context_length) int64
    name: str  #: canonical backbone name
    is_test_model: bool  #: random weights (tiny-test): outputs are meaningless
    device: torch.device
    dtype: torch.dtype  #: fp16 on CUDA, fp32 on CPU
    mean: tuple[float, float, float]  #: RGB normalisation of the pixels in [0, 1]
    std: tuple[float, float, float]
    patch_size: int
    key: str  #: unique per (name, weights, device, dtype): cache key for models and text features


#: Residual blocks of the tiny test model's vision tower.
TINY_TEST_VISION_LAYERS = 4


def vision_depth(name: Optional[str] = None) -> int:
    """Residual blocks of the backbone's vision tower (12 for ViT-B-16), from its architecture's
    open_clip config: nothing is built or downloaded. ``name``: see :func:`resolve_backbone_name`."""
    spec = _SPECS[resolve_backbone_name(name)]
    if spec.name == TINY_TEST:
        return TINY_TEST_VISION_LAYERS
    return int(open_clip.get_model_config(spec.arch)["vision_cfg"]["layers"])


def tiny_test_clip(seed: int = 0) -> open_clip.CLIP:
    """A small random ``open_clip.CLIP`` (ViT patch 16, 4x64; text 2x64 with the real BPE vocab).

    The global RNG is left untouched (``fork_rng``). open_clip's own init gives non-degenerate
    features. Returned in train mode, fp32, on CPU: :func:`load_clip` freezes it.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return open_clip.CLIP(
            embed_dim=32,
            vision_cfg=CLIPVisionCfg(image_size=224, patch_size=16, width=64, layers=TINY_TEST_VISION_LAYERS,
                                     head_width=16),
            text_cfg=CLIPTextCfg(context_length=77, vocab_size=49408, width=64, heads=4, layers=2),
        )


def _checkpoint_path(checkpoint: Optional[str]) -> Optional[str]:
    """``checkpoint`` or ``$FSA_CHECKPOINT``, absolute; a missing file is a ``FileNotFoundError``."""
    raw = checkpoint or os.environ.get("FSA_CHECKPOINT") or None
    if raw is None:
        return None
    path = Path(raw).expanduser().resolve()
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {raw} (check --checkpoint / FSA_CHECKPOINT)")
    return str(path)


def clip_cache_key(name: Optional[str] = None, checkpoint: Optional[str] = None, device: DeviceLike = None) -> str:
    """The ``LoadedClip.key`` that ``load_clip`` with these arguments produces (resolves env defaults)."""
    spec = _SPECS[resolve_backbone_name(name)]
    dev = resolve_device(device)
    weights = _checkpoint_path(checkpoint) or spec.tag or "seed0"
    return f"{spec.name}|{weights}|{dev}|{model_dtype(dev)}".replace("torch.", "")


def _weights_error(path: str, spec_name: str, exc: Exception) -> WeightsUnavailableError:
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return WeightsUnavailableError(
        f"could not load {path} as {spec_name} weights ({type(exc).__name__}: {first[:300]}); "
        f"pass an open_clip state dict (.safetensors/.bin/.pt) of {spec_name} or choose the matching backbone"
    )


def load_clip(
    name: Optional[str] = None,
    *,
    checkpoint: Optional[str] = None,
    device: DeviceLike = None,
    progress: Optional[Progress] = None,
) -> LoadedClip:
    """Build a CLIP backbone with its weights.

    ``name``: see :func:`resolve_backbone_name`. ``checkpoint`` (or ``$FSA_CHECKPOINT``): a local
    state-dict file for that architecture instead of the hub weights. Fails fast offline with
    :class:`WeightsUnavailableError`.
    """
    spec = _SPECS[resolve_backbone_name(name)]
    path = _checkpoint_path(checkpoint)
    dev = resolve_device(device)
    dtype = model_dtype(dev)
    key = clip_cache_key(spec.name, path, dev)
    report_progress(progress, 0.0, f"Loading {spec.name}")

    if spec.name == TINY_TEST:
        model = tiny_test_clip()
        if path is not None:
            try:
                open_clip.load_checkpoint(model, path)
            except Exception as exc:  # noqa: BLE001 - pickle/safetensors/shape errors alike
                raise _weights_error(path, spec.name, exc) from exc
        tokenizer = open_clip.get_tokenizer("ViT-B-16")  # bundled BPE vocab, no download
        mean, std = OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
    else:
        cfg = open_clip.get_pretrained_cfg(spec.arch, spec.tag)
        if path is None:
            # 'org/repo/' (trailing slash) = default file name; open_clip prefers safetensors.
            repo_id, filename = cfg["hf_hub"].rstrip("/"), "open_clip_model.safetensors"
            path = fetch_hub_file(
                repo_id,
                (filename, "open_clip_pytorch_model.bin"),
                what=f"{spec.name} CLIP",
                alternatives="or pass a local checkpoint with --checkpoint PATH / FSA_CHECKPOINT, " + tiny_test_hint(),
                progress=progress,
            )
        report_progress(progress, 0.6, f"Building {spec.name}")
        try:  # a file path as `pretrained`: open_clip loads it strictly into the architecture
            model = open_clip.create_model(spec.arch, pretrained=path)
        except Exception as exc:  # noqa: BLE001 - pickle/safetensors/shape errors alike
            raise _weights_error(path, spec.name, exc) from exc
        tokenizer = open_clip.get_tokenizer(spec.arch)
        mean, std = cfg.get("mean", OPENAI_DATASET_MEAN), cfg.get("std", OPENAI_DATASET_STD)

    model = model.to(device=dev, dtype=dtype).eval().requires_grad_(False)
    report_progress(progress, 1.0, f"{spec.name} ready")
    return LoadedClip(
        model=model,
        tokenizer=tokenizer,
        name=spec.name,
        is_test_model=spec.name == TINY_TEST,
        device=dev,
        dtype=dtype,
        mean=tuple(float(m) for m in mean),
        std=tuple(float(s) for s in std),
        patch_size=int(model.visual.patch_size[0]),
        key=key,
    )


# --------------------------------------------------------------------------- cache
class ModelCache:
    """Loaded CLIP backbones and proxy models by key; safe to share between threads.

    One load per key: concurrent requests for the same model wait for the first one; requests for
    different models load in parallel. Failed loads are not cached.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: dict[str, Any] = {}
        self._loading: dict[str, threading.Lock] = {}

    def _get(self, key: str, load: Callable[[], Any]) -> Any:
        with self._lock:
            if key in self._items:
                return self._items[key]
            key_lock = self._loading.setdefault(key, threading.Lock())
        with key_lock:
            with self._lock:
                if key in self._items:
                    return self._items[key]
            value = load()
            with self._lock:
                self._items[key] = value
                self._loading.pop(key, None)
            return value

    def get_clip(
        self,
        name: Optional[str] = None,
        checkpoint: Optional[str] = None,
        device: DeviceLike = None,
        progress: Optional[Progress] = None,
    ) -> LoadedClip:
        """:func:`load_clip` once per (backbone, weights, device)."""
        key = "clip|" + clip_cache_key(name, checkpoint, device)
        return self._get(key, lambda: load_clip(name, checkpoint=checkpoint, device=device, progress=progress))

    def get_proxy(
        self, name: str = "dino-b8", device: DeviceLike = None, progress: Optional[Progress] = None
    ) -> "ProxyModel":
        """:func:`fsa.proxies.load_proxy` once per (proxy, device)."""
        from .proxies import load_proxy, proxy_cache_key

        key = "proxy|" + proxy_cache_key(name, device)
        return self._get(key, lambda: load_proxy(name, device=device, progress=progress))

    def keys(self) -> list[str]:
        """Keys of the loaded models (for diagnostics and tests)."""
        with self._lock:
            return list(self._items)

    def clear(self) -> None:
        """Drop every loaded model (frees their memory once nobody else holds them)."""
        with self._lock:
            self._items.clear()
