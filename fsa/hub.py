"""The floor under the model loaders: devices and dtypes, progress reports, and Hugging Face files.

Weights come through huggingface_hub. Offline, a plain ``hf_hub_download`` retries for ~25 s per
file before it gives up; :func:`fetch_hub_file` instead looks in the cache first, then probes the
hub for a few seconds, and raises :class:`WeightsUnavailableError` with the ways out.
Both loaders (:mod:`fsa.backbones` for CLIP, :mod:`fsa.proxies` for ProxyCLIP's proxies) stand on it;
it imports neither.
"""
from __future__ import annotations

import os
import threading
import urllib.error
import urllib.request
from typing import Callable, Optional, Sequence, Union

import huggingface_hub
import torch
from huggingface_hub import constants as hf_constants
from huggingface_hub.errors import RemoteEntryNotFoundError

from .config import TINY_TEST

#: ``progress(fraction in [0, 1], message)``, as Gradio's ``gr.Progress`` takes it.
Progress = Callable[[float, str], None]
DeviceLike = Union[str, torch.device, None]

#: Seconds the reachability probe of the hub may take before we call it unreachable.
HUB_PROBE_TIMEOUT_S = 3.0


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights are neither cached nor downloadable (or a given checkpoint is unusable)."""


def alias_key(name: str) -> str:
    """'ViT-B/16', 'vit_b_16', 'vitb16' -> 'vitb16'."""
    return "".join(ch for ch in name.lower() if ch.isalnum())


#: Names that choose the random-weights test model (after :func:`alias_key`).
TEST_MODEL_ALIASES = frozenset({alias_key(TINY_TEST), "tiny", "test"})


def tiny_test_hint() -> str:
    """The last way out of a missing-weights error: try the random-weights test model.

    Suggests setting FSA_MODEL=tiny-test only where it is not already set: then the real backbone
    (or proxy) was asked for explicitly, and the way out is to choose the test model instead.
    """
    if alias_key(os.environ.get("FSA_MODEL") or "") in TEST_MODEL_ALIASES:
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


