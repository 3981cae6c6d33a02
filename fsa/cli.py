"""Command line: ``python -m fsa segment IMAGE --classes "cat; kitten, sofa"``, ``evaluate``, ``prepare``, ``bench``.

Failures print one line on stderr (the problem and the fix) and exit non-zero; set FSA_DEBUG=1
for the traceback.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from .config import METHODS, PROXIES, PROXY_LABELS, TINY_TEST

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class _Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors (no usage block)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m fsa", description="Training-free CLIP segmentation with FSA (ICCV 2025).")
    commands = parser.add_subparsers(dest="command", metavar="{segment,evaluate,prepare,bench,loadtest}")
    seg = commands.add_parser("segment", help="segment one image into the given classes",
                              description="Segment IMAGE; write a colour mask PNG and print each class's pixel share.")
    seg.add_argument("image", metavar="IMAGE", help="image file (PNG, JPEG, WebP, TIFF, ...)")
    seg.add_argument("--classes", required=True,
                     help='classes separated by commas or new lines, synonyms by ";", '
                          'e.g. "cat; kitten, sofa, background"')
    seg.add_argument("--method", default="clearclip", help=f"baseline: {', '.join(METHODS)} (default clearclip)")
    seg.add_argument("--no-fsa", action="store_true", help="run the baseline alone, without the FSA plug-in")
    seg.add_argument("--backbone", default=None,
                     help=f"ViT-B-16, ViT-L-14, ViT-H-14 or {TINY_TEST} (default: $FSA_MODEL or ViT-B-16)")
    seg.add_argument("--checkpoint", default=None,
                     help="local CLIP weights file (default: $FSA_CHECKPOINT or the HF hub)")
    seg.add_argument("--proxy", default=None,
                     help=f"ProxyCLIP's vision model: {', '.join(PROXIES)} (default dino-b8; with {TINY_TEST}, "
                          "its random stand-in)")
    seg.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    seg.add_argument("--short-side", type=int, default=None,
                     help="resize so the short side has this many pixels (default: the method's, 336 for sclip, "
                          "naclip and proxyclip, 448 otherwise)")
    seg.add_argument("--crop", type=int, default=None,
                     help="sliding-window crop in pixels; 0 = whole image (default: per method)")
    seg.add_argument("--stride", type=int, default=None, help="sliding-window stride in pixels (default: per method)")
    seg.add_argument("--threshold", type=float, default=0.0,
                     help="pixels whose best probability is below become background")
    seg.add_argument("--lam", type=float, default=None,
                     help="FSA λ (default: 3.0; 2.3 for ViT-H-14; 4.5 for ProxyCLIP with the MAE proxy)")
    seg.add_argument("--p", type=float, default=0.45, help="FSA top-p of the pruning (default 0.45)")
    seg.add_argument("--out", default="mask.png", help="colour mask PNG to write (default mask.png)")
    seg.add_argument("-v", "--verbose", action="store_true", help="print loading progress on stderr")
    commands.add_parser("evaluate", help="score a method with and without FSA on a benchmark "
                        "(python -m fsa evaluate --help)", add_help=False)
    commands.add_parser("prepare", help="convert raw COCO / Cityscapes labels to the evaluation layout "
                        "(python -m fsa prepare --help)", add_help=False)
    commands.add_parser("bench", help="time the attention variants (python -m fsa bench --help)", add_help=False)
    commands.add_parser("loadtest", help="load-test the app on this machine (python -m fsa loadtest --help)",
                        add_help=False)
    return parser


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


#: The option that sets each validated settings field, to name it in the error.
_OPTION_OF_FIELD = {
    "FeedbackConfig.lam": "--lam", "FeedbackConfig.p": "--p", "SegmentSettings.short_side": "--short-side",
    "SegmentSettings.crop": "--crop", "SegmentSettings.stride": "--stride",
    "SegmentSettings.prob_threshold": "--threshold",
}
#: What the --out errors suggest (Pillow writes all of them for an RGB mask).
_SUGGESTED_SUFFIXES = ".png (lossless, recommended), .webp, .bmp, .tif, .jpg"


def _settings_from_args(args: argparse.Namespace, backbone: str):
    """(FeedbackConfig or None, SegmentSettings); a bad value is a ``ValueError`` naming its option."""
    from .config import FeedbackConfig, SegmentSettings, default_lambda

    try:
        # λ and p are checked with --no-fsa too: a bad value is a mistake either way.
        proxy = (args.proxy or "dino-b8") if str(args.method).lower() == "proxyclip" else None
        feedback = FeedbackConfig(lam=default_lambda(backbone, proxy) if args.lam is None else args.lam, p=args.p)
        settings = SegmentSettings(method=args.method, feedback=None if args.no_fsa else feedback,
                                   short_side=args.short_side, crop=args.crop, stride=args.stride,
                                   prob_threshold=args.threshold)
    except ValueError as exc:
        text = str(exc)
        option = next((opt for name, opt in _OPTION_OF_FIELD.items() if text.startswith(name + " ")), None)
        if option is None:
            raise
        raise ValueError(f"{option}: {text}") from None
    return settings.feedback, settings


def check_output_path(raw: str) -> Path:
    """The mask file ``--out`` names, if Pillow can write an RGB image there; else ``ValueError`` or
    ``FileNotFoundError`` saying why. Checked before any model loads, so no run is wasted."""
    import io

    from PIL import Image

    out = Path(raw).expanduser()
    if out.is_dir():
        raise ValueError(f"--out {raw} is a folder; give a file name, e.g. --out {out / 'mask.png'}")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"output folder {out.parent} does not exist; create it or choose another --out")
    if not os.access(out.parent, os.W_OK):
        raise ValueError(f"output folder {out.parent} is not writable; choose another --out")
    if not out.suffix:
        raise ValueError(f"--out {raw} has no file extension, so the image format is unknown; "
                         f"end it with {_SUGGESTED_SUFFIXES}")
    Image.init()
    image_format = Image.registered_extensions().get(out.suffix.lower())
    writable = image_format is not None and image_format in Image.SAVE
    if writable:
        try:  # some formats are registered but cannot hold an RGB image (XBM), or are read-only stubs
            Image.new("RGB", (2, 2)).save(io.BytesIO(), format=image_format)
        except Exception:  # noqa: BLE001 - any failure means "not this format"
            writable = False
    if not writable:
        raise ValueError(f"--out {raw}: cannot write a colour mask as {out.suffix!r}; "
                         f"end the name with {_SUGGESTED_SUFFIXES}")
    return out


def _segment(args: argparse.Namespace) -> int:
    import numpy as np
    from PIL import Image

    from .backbones import resolve_backbone_name
    from .hub import resolve_device
    from .images import to_rgb_uint8
    from .segmenter import Segmenter
    from .visualize import colorize
    from .vocabulary import parse_vocabulary

    # Everything a user can get wrong is checked before any model loads.
    backbone = resolve_backbone_name(args.backbone)
    if args.proxy is not None:
        from .proxies import resolve_proxy_name

        args.proxy = resolve_proxy_name(args.proxy)
    feedback, settings = _settings_from_args(args, backbone)
    out = check_output_path(args.out)
    device = resolve_device(args.device)
    parse_vocabulary(args.classes)
    rgb = to_rgb_uint8(args.image)

    def progress(fraction: float, message: str) -> None:
        if args.verbose:
            print(f"[{fraction:4.0%}] {message}", file=sys.stderr, flush=True)

    started = time.perf_counter()
    segmenter = Segmenter(backbone, checkpoint=args.checkpoint, device=device, proxy=args.proxy or "dino-b8")
    result = segmenter.segment(rgb, args.classes, settings, progress=progress)
    wall = time.perf_counter() - started

    mask = colorize(result.labels, len(result.class_names))
    Image.fromarray(np.ascontiguousarray(mask)).save(out)

    title = f"{settings.method}{'' if feedback is None else ' + FSA'} on {result.backbone}"
    if settings.method == "proxyclip":
        title += f" with the {PROXY_LABELS[segmenter.proxy_name]} proxy ({segmenter.proxy_name}, grid " \
                 f"{result.grid[0]}×{result.grid[1]})"
    if result.is_test_model:
        title += f" ({TINY_TEST}: random weights, the segmentation is meaningless)"
    print(title)
    shares = result.class_shares()
    width = max(len("class"), *(len(name) for name in shares))
    print(f"{'class':<{width}}  share")
    for name, share in sorted(shares.items(), key=lambda item: -item[1]):
        print(f"{name:<{width}}  {100.0 * share:5.1f} %")
    for note in result.notes:
        print(f"note: {note}")
    timing = ", ".join(f"{key} {seconds:.2f} s" for key, seconds in result.timings.items())
    print(f"timings: {timing}; wall {wall:.2f} s")
    print(f"mask written to {out} ({mask.shape[1]}×{mask.shape[0]})")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``python -m fsa``; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":
        from .bench import main as bench_main

        return bench_main(argv[1:])
    if argv and argv[0] == "evaluate":
        from .evaluation.cli import main as evaluate_main

        return _guarded(lambda: evaluate_main(argv[1:], parser_class=_Parser))
    if argv and argv[0] == "loadtest":
        from .demo.loadtest import main as loadtest_main

        return loadtest_main(argv[1:])
    if argv and argv[0] == "prepare":
        from .evaluation.prepare import main as prepare_main

        return prepare_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.error("choose a command: segment, evaluate, prepare, bench or loadtest")
    return _guarded(lambda: _segment(args))


def _guarded(run) -> int:
    """Run a command; every failure becomes one line on stderr, unless FSA_DEBUG is set."""
    try:
        return run()
    except KeyboardInterrupt:
        print("fsa: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - every failure becomes one line, unless debugging
        if os.environ.get("FSA_DEBUG"):
            raise
        # WeightsUnavailableError by name: importing it here could itself fail.
        known = isinstance(exc, (ValueError, OSError)) or any(
            cls.__name__ == "WeightsUnavailableError" for cls in type(exc).__mro__)
        prefix = "" if known else f"{type(exc).__name__}: "
        suffix = "" if known else " (set FSA_DEBUG=1 for the traceback)"
        print(f"fsa: error: {prefix}{_one_line(exc)}{suffix}", file=sys.stderr)
        return EXIT_ERROR
