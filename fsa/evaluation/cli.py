"""`python -m fsa evaluate`: the published protocol on the 8 benchmarks, baseline and FSA in one run.

    python -m fsa evaluate voc21 --data-root ~/data --method proxyclip
    torchrun --nproc_per_node 4 -m fsa evaluate ade20k --data-root ~/data --method clearclip
    python -m fsa evaluate --all --data-root ~/data --method sclip
    python -m fsa evaluate voc21 --data-root ~/data --method clearclip --sweep lam=1,3,5 --sweep p=0.3,0.45
"""
from __future__ import annotations

import argparse
import csv
import math
import sys
from pathlib import Path
from typing import Optional, Sequence

from ..config import METHOD_LABELS, METHODS, PROXIES, PROXY_LABELS, TINY_TEST
from .presets import BENCHMARK_ORDER
from .sweep import SWEEP_AXES, SweepError, normalize_sweep, parse_sweep_option, setting_label, sweep_grid

DEFAULT_OUTPUT = Path("out") / "eval"


def build_parser(parser_class=argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser = parser_class(
        prog="python -m fsa evaluate",
        description="Score a method and method + FSA (one forward pass) on a benchmark with the published "
                    "mmseg protocol: mIoU, aAcc, mAcc. Under torchrun, images are sharded over the processes.")
    parser.add_argument("benchmark", nargs="?", choices=BENCHMARK_ORDER, metavar="BENCHMARK",
                        help=f"one of {', '.join(BENCHMARK_ORDER)} (or --all)")
    parser.add_argument("--all", action="store_true", help="run the 8 benchmarks and print the paper-style table")
    parser.add_argument("--data-root", required=True, help="folder holding the datasets (see the README's layout)")
    parser.add_argument("--method", default="proxyclip", choices=METHODS, help="baseline (default proxyclip)")
    parser.add_argument("--backbone", default=None,
                        help=f"ViT-B-16, ViT-L-14, ViT-H-14 or {TINY_TEST} (default: $FSA_MODEL or ViT-B-16)")
    parser.add_argument("--checkpoint", default=None, help="local CLIP weights file")
    parser.add_argument("--proxy", default="dino-b8",
                        help=f"ProxyCLIP's vision model: {', '.join(PROXIES)} (default dino-b8; FSA's λ defaults "
                             "to 4.5 with mae-b16, as published)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--no-fsa", action="store_true", help="score the baseline alone")
    parser.add_argument("--lam", type=float, default=None,
                        help="FSA λ (default: 3.0; 2.3 for ViT-H-14; 4.5 for ProxyCLIP with the MAE proxy)")
    parser.add_argument("--p", type=float, default=0.45, help="FSA top-p of the pruning (default 0.45)")
    parser.add_argument("--sweep", action="append", type=_sweep_option, default=[], metavar="NAME=V1,V2,...",
                        help="ablation: score FSA with each value of NAME (repeat for a grid, their Cartesian "
                             f"product) against one baseline pass per image; NAME: {', '.join(SWEEP_AXES)} "
                             "(lam, p: numbers; similarity: kl, sym_kl, js; iterations: >= 1; blocks: 1-based "
                             "numbers joined by '+', or last; isolation, pruning, ensemble: on, off). Prints "
                             "the ablation table and writes it to OUTPUT/ablation.md and .csv")
    parser.add_argument("--protocol", default="published", choices=("published", "ours"),
                        help="published: each method's released settings per benchmark (default); "
                             "ours: fsa.METHOD_DEFAULTS everywhere")
    parser.add_argument("--short-side", type=int, default=None, help="override the preset's short side")
    parser.add_argument("--crop", type=int, default=None, help="override the preset's window crop (0 = whole image)")
    parser.add_argument("--stride", type=int, default=None, help="override the preset's window stride")
    parser.add_argument("--logit-scale", type=float, default=None, help="override the preset's logit scale")
    parser.add_argument("--prob-thd", type=float, default=None,
                        help="override the preset's probability threshold (background benchmarks only)")
    parser.add_argument("--pamr", action="store_true",
                        help="refine with PAMR (10 iterations, dilations 8 and 16), as NACLIP's numbers with PAMR")
    parser.add_argument("--names", default=None, help="class-name file replacing the shipped one (one line per class)")
    parser.add_argument("--limit", type=int, default=None, help="score only the first N images")
    parser.add_argument("--output", default=None,
                        help=f"folder for per-image records, settings and results (default {DEFAULT_OUTPUT}/...)")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run from --output's records")
    parser.add_argument("--save-predictions", default=None,
                        help="write DIR/baseline/<id>.png and DIR/fsa/<id>.png (label PNGs; with --sweep "
                             "DIR/<setting key>/<id>.png)")
    parser.add_argument("--json", default=None, help="write the scores as JSON to this file")
    parser.add_argument("--skip-bad", action="store_true", help="skip unreadable or inconsistent images and list them")
    parser.add_argument("-v", "--verbose", action="store_true", help="also print per-class IoU")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _sweep_option(text: str) -> tuple[str, tuple]:
    """argparse type of --sweep: its errors become one-line usage errors."""
    try:
        return parse_sweep_option(text)
    except SweepError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def main(argv: Optional[Sequence[str]] = None, parser_class=argparse.ArgumentParser) -> int:
    from ..backbones import resolve_backbone_name, vision_depth
    from ..config import FeedbackConfig, default_lambda
    from ..proxies import resolve_proxy_name
    from .records import write_json_atomic
    from .runner import EvalConfig, Evaluator

    parser = build_parser(parser_class)
    args = parser.parse_args(argv)
    if args.all == (args.benchmark is not None):
        parser.error("name one BENCHMARK or pass --all")
    backbone = resolve_backbone_name(args.backbone)
    proxy = resolve_proxy_name(args.proxy) if args.method == "proxyclip" else None
    feedback = None
    if not args.no_fsa:  # λ and p checked before any work
        feedback = FeedbackConfig(lam=default_lambda(backbone, proxy) if args.lam is None else args.lam, p=args.p)
    sweep: tuple = ()
    if args.sweep:  # every setting of the grid checked before any model loads
        if args.no_fsa:
            parser.error("--sweep varies FSA's settings; drop --no-fsa")
        try:
            sweep = normalize_sweep(args.sweep)
            sweep_grid(feedback, sweep, depth=vision_depth(backbone), method=args.method)
        except SweepError as exc:
            parser.error(str(exc))
    benchmarks = list(BENCHMARK_ORDER) if args.all else [args.benchmark]
    base_output = Path(args.output) if args.output else DEFAULT_OUTPUT
    configs = []
    for bench in benchmarks:
        tag = f"{bench}-{_run_name(args.method, proxy)}-{backbone}"
        output = base_output / tag if (args.all or not args.output) else base_output
        save = Path(args.save_predictions) / bench if (args.save_predictions and args.all) else args.save_predictions
        configs.append(EvalConfig(
            bench, Path(args.data_root), args.method, backbone=backbone, checkpoint=args.checkpoint, proxy=args.proxy,
            device=args.device, fsa=not args.no_fsa, lam=args.lam, p=args.p, protocol=args.protocol,
            short_side=args.short_side, crop=args.crop, stride=args.stride, logit_scale=args.logit_scale,
            prob_thd=args.prob_thd, names_file=Path(args.names) if args.names else None, limit=args.limit,
            output=output, resume=args.resume, save_predictions=Path(save) if save else None,
            skip_bad=args.skip_bad, pamr=args.pamr, sweep=sweep))
    if args.all:  # every dataset present before hours of work start
        from . import datasets

        missing = []
        for config in configs:
            try:
                datasets.list_samples(datasets.get_benchmark(config.benchmark), config.data_root)
            except datasets.DatasetError as exc:
                missing.append(str(exc).split("\n")[0])
        if missing:
            raise FileNotFoundError("--all needs every benchmark; missing: " + " | ".join(missing))

    results = []
    for config in configs:
        try:
            result = Evaluator(config, progress=not args.no_progress).run()
        except KeyboardInterrupt:
            if _is_main():
                print(f"fsa: {config.benchmark}: the images scored so far are kept in {config.output}; "
                      "run the same command with --resume to continue", file=sys.stderr)
            raise
        results.append(result)
        if _is_main():
            print(format_result(result, verbose=args.verbose))
            if result.skipped:
                print(f"skipped {len(result.skipped)} image(s):")
                for image_id, reason in result.skipped:
                    print(f"  {image_id}: {reason}")
            if result.sweep:
                output = Path(config.output)
                output.mkdir(parents=True, exist_ok=True)
                (output / "ablation.md").write_text(ablation_table(result) + "\n")
                write_ablation_csv(output / "ablation.csv", result)
                print(f"ablation table written to {output / 'ablation.md'} and {output / 'ablation.csv'}")
    if _is_main():
        if args.json:
            data = results[0].to_json() if len(results) == 1 else [r.to_json() for r in results]
            write_json_atomic(Path(args.json), data)
        if args.all:
            table = paper_table(results)
            print(table)
            base_output.mkdir(parents=True, exist_ok=True)
            stem = base_output / f"table-{_run_name(args.method, proxy)}-{backbone}"
            stem.with_suffix(".md").write_text(table + "\n")
            write_csv(stem.with_suffix(".csv"), results)
            print(f"table written to {stem}.md and {stem}.csv")
    return 0


def _run_name(method: str, proxy: Optional[str]) -> str:
    """The method in output names: ProxyCLIP with a proxy other than the default names it."""
    return method if proxy in (None, "dino-b8") else f"{method}-{proxy}"


def method_label(result) -> str:
    """The method as tables name it: "ProxyCLIP (SAM ViT-B/16)" for ProxyCLIP, with its proxy."""
    label = METHOD_LABELS[result.method]
    proxy = getattr(result, "proxy", None)
    return f"{label} ({PROXY_LABELS.get(proxy, proxy)})" if proxy else label


def _is_main() -> bool:
    import os

    return int(os.environ.get("RANK", "0")) == 0


def _fmt(value: Optional[float]) -> str:
    return "  n/a" if value is None or math.isnan(value) else f"{value:6.2f}"


def format_result(result, *, verbose: bool = False) -> str:
    """The scores of one evaluation as a small text table (a sweep: its ablation table)."""
    if result.sweep:
        return _format_sweep(result, verbose=verbose)
    label = method_label(result)
    sources = sorted({p["source"] for p in result.settings["presets"].values()})
    lines = [f"{label}{' + FSA' if result.fsa else ''} on {result.benchmark} ({result.backbone}, {result.images} images, "
             f"{result.settings['protocol']} protocol: {', '.join(sources)}, {result.seconds:.0f} s)"]
    if result.backbone == TINY_TEST:
        lines.append(f"note: {TINY_TEST} has random weights; these scores mean nothing")
    header = f"{'metric':<8} {'baseline':>8}" + (f" {'FSA':>8} {'Δ':>8}" if result.fsa else "")
    lines.append(header)
    for name, attr in (("mIoU", "miou"), ("aAcc", "aacc"), ("mAcc", "macc")):
        base = getattr(result.baseline, attr)
        row = f"{name:<8} {_fmt(base):>8}"
        if result.fsa:
            value = getattr(result.fsa, attr)
            row += f" {_fmt(value):>8} {_delta(value, base):>8}"
        lines.append(row)
    if verbose:
        width = max(len(n) for n in result.class_names)
        lines.append(f"{'class':<{width}} {'IoU':>8}" + (f" {'FSA':>8} {'Δ':>8}" if result.fsa else ""))
        for i, name in enumerate(result.class_names):
            base = result.baseline.iou[i]
            row = f"{name:<{width}} {_fmt(base):>8}"
            if result.fsa:
                row += f" {_fmt(result.fsa.iou[i]):>8} {_delta(result.fsa.iou[i], base):>8}"
            lines.append(row)
    return "\n".join(lines)


BEYOND_PAPER = "(beyond the paper)"


def ablation_rows(result) -> list[tuple[str, str, object, str, bool]]:
    """(label, key, scores, ΔmIoU text, beyond the paper) per row: the baseline, then each sweep setting."""
    rows = [(f"{method_label(result)} (baseline)", "baseline", result.baseline, "", False)]
    for key, value in result.sweep.items():
        beyond = key in result.beyond_paper
        label = f"+ FSA {setting_label(result.sweep_settings[key])}" + (f" {BEYOND_PAPER}" if beyond else "")
        rows.append((label, key, value, _delta(value.miou, result.baseline.miou), beyond))
    return rows


def _cell(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.2f}"


def ablation_table(result) -> str:
    """Markdown ablation table of a sweep: rows the baseline and each setting; mIoU, aAcc, mAcc, ΔmIoU."""
    lines = [f"{method_label(result)} + FSA on {result.benchmark} ({result.backbone}, {result.images} images)",
             "", "| setting | mIoU | aAcc | mAcc | ΔmIoU |", "|---|---:|---:|---:|---:|"]
    for label, _, value, delta, _ in ablation_rows(result):
        lines.append(f"| {label} | {_cell(value.miou)} | {_cell(value.aacc)} | {_cell(value.macc)} | {delta} |")
    return "\n".join(lines)


def write_ablation_csv(path: Path, result) -> None:
    """The ablation table as CSV (unrounded scores; one column per swept axis)."""
    axes = list(next(iter(result.sweep_settings.values()), {}))
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["setting", "key", *axes, "mIoU", "aAcc", "mAcc", "delta_mIoU", "beyond_paper"])
        for label, key, value, _, beyond in ablation_rows(result):
            setting = result.sweep_settings.get(key, {})
            delta = "" if key == "baseline" else value.miou - result.baseline.miou
            writer.writerow([label, key, *(setting.get(a, "") for a in axes), value.miou, value.aacc, value.macc,
                             delta, beyond])


def _format_sweep(result, *, verbose: bool) -> str:
    sources = sorted({p["source"] for p in result.settings["presets"].values()})
    lines = [f"sweep of {len(result.sweep)} FSA settings, {result.settings['protocol']} protocol: "
             f"{', '.join(sources)}, {result.seconds:.0f} s"]
    if result.backbone == TINY_TEST:
        lines.append(f"note: {TINY_TEST} has random weights; these scores mean nothing")
    lines.append(ablation_table(result))
    if verbose:
        rows = ablation_rows(result)
        width = max(len(n) for n in result.class_names)
        lines.append("")
        lines.extend(f"#{i}: {label}" for i, (label, *_) in enumerate(rows))
        lines.append(f"{'class IoU':<{width}} " + " ".join(f"{'#' + str(i):>7}" for i in range(len(rows))))
        for c, name in enumerate(result.class_names):
            lines.append(f"{name:<{width}} " + " ".join(f"{_fmt(value.iou[c]):>7}" for _, _, value, _, _ in rows))
    return "\n".join(lines)


def _delta(value: float, base: float) -> str:
    if math.isnan(value) or math.isnan(base):
        return "n/a"
    return f"{value - base:+.2f}"


def _rows(results):
    label = method_label(results[0])
    rows = [(label, [r.baseline.miou for r in results])]
    if all(r.fsa is not None for r in results):
        rows.append((f"{label} + FSA", [r.fsa.miou for r in results]))
    for key, setting in results[0].sweep_settings.items():  # a sweep: one row per setting
        if all(key in r.sweep for r in results):
            rows.append((f"{label} + FSA {setting_label(setting)}", [r.sweep[key].miou for r in results]))
    return rows


def paper_table(results) -> str:
    """Markdown: rows method and method + FSA, columns the benchmarks and their average (mIoU)."""
    names = [r.benchmark for r in results]
    lines = ["| method | " + " | ".join(names) + " | avg |", "|---" * (len(names) + 2) + "|"]
    for label, values in _rows(results):
        avg = sum(values) / len(values)
        lines.append(f"| {label} | " + " | ".join(f"{v:.2f}" for v in values) + f" | {avg:.2f} |")
    return "\n".join(lines)


def write_csv(path: Path, results) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["method"] + [r.benchmark for r in results] + ["avg"])
        for label, values in _rows(results):
            writer.writerow([label] + [f"{v:.2f}" for v in values] + [f"{sum(values) / len(values):.2f}"])


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
