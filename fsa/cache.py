"""The model cache above both loaders: CLIP backbones (:mod:`fsa.backbones`) and ProxyCLIP's proxy
models (:mod:`fsa.proxies`), loaded once per key and shared between threads."""
from __future__ import annotations

import threading
from typing import Any, Callable, Optional

from . import backbones, proxies
from .backbones import LoadedClip, clip_cache_key
from .hub import DeviceLike, Progress
from .proxies import ProxyModel, proxy_cache_key


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
        return self._get(key, lambda: backbones.load_clip(name, checkpoint=checkpoint, device=device,
                                                          progress=progress))

    def get_proxy(
        self, name: str = "dino-b8", device: DeviceLike = None, progress: Optional[Progress] = None
    ) -> ProxyModel:
        """:func:`fsa.proxies.load_proxy` once per (proxy, device)."""
        key = "proxy|" + proxy_cache_key(name, device)
        return self._get(key, lambda: proxies.load_proxy(name, device=device, progress=progress))

    def keys(self) -> list[str]:
        """Keys of the loaded models (for diagnostics and tests)."""
        with self._lock:
            return list(self._items)

    def clear(self) -> None:
        """Drop every loaded model (frees their memory once nobody else holds them)."""
        with self._lock:
            self._items.clear()
