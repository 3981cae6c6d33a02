"""Results → what the page shows: the mask panels and the run summary, the clicked patch's maps and
description, the compare-all grid, the score table and error maps, and the feedback played step by step.
Pure drawing and wording: no model work, no session state kept."""
from __future__ import annotations

from typing import Optional

import cv2
import gradio as gr
import numpy as np

import fsa
from .. import visualize as viz
from ..config import METHOD_LABELS
from .forms import beyond_paper_switches, head_choices, parse_head, parse_pass, pass_choices


NO_RUN_MESSAGE = "Run a segmentation first (press “Segment”), then click a point on the image or on a mask."
NO_RUN_SCORE_MESSAGE = "Run a segmentation first (press “Segment”), then score it against a reference mask."
NO_STEPS_MESSAGE = ("Segment, then click a point on the image or on a mask: its patch's feedback is played here "
                    "step by step.")

#: File format of the four attention heatmaps sent back for every click: photo-like pictures, where a
#: PNG takes ~125 ms to encode at 640×480 and 490 KB, a JPEG ~3 ms and 90 KB. Masks, the compare grid
#: and the Π chart stay PNG (exact class colours, text).
HEATMAP_FORMAT = "jpeg"
#: Classes the Π chart of a click shows at most (the most probable ones, when the vocabulary is longer).
CHART_MAX_BARS = 12
#: Width of one cell of the compare-all grid (fsa.visualize.compare_grid's default).
COMPARE_CELL_WIDTH = 256


def compare_cell(result, colors: np.ndarray) -> np.ndarray:
    """One cell of the compare-all grid: the mask over the image, COMPARE_CELL_WIDTH pixels wide."""
    panel = viz.segmentation_panel(result.image, result.labels, result.class_names, colors=colors)
    h, w = panel.shape[:2]
    if w == COMPARE_CELL_WIDTH:
        return panel
    size = (COMPARE_CELL_WIDTH, max(1, round(h * COMPARE_CELL_WIDTH / w)))
    return cv2.resize(panel, size, interpolation=cv2.INTER_AREA if w > COMPARE_CELL_WIDTH else cv2.INTER_LINEAR)


_SIMILARITY_FORMULAS = {
    "kl": ("Ŝ[i] = 1/(1 + KL(Π_i‖Π_j))", ""),
    "sym_kl": ("Ŝ[i] = 1/(1 + ½(KL(Π_i‖Π_j) + KL(Π_j‖Π_i)))", " Symmetric KL: beyond the paper."),
    "js": ("Ŝ[i] = 1/(1 + JS(Π_i, Π_j))", " Jensen–Shannon: beyond the paper."),
}


def feedback_step_lines(exp, iteration: int, head: Optional[int] = None) -> list[str]:
    """One line of plain text per step of feedback pass `iteration` (1-based) of a PatchExplanation."""
    cfg = exp.feedback or fsa.FeedbackConfig()
    it = exp.iterations[iteration - 1]
    n = it.kept.size
    source = "the baseline" if iteration == 1 else f"FSA's pass {iteration - 1} (beyond the paper)"

    def top(names, values):
        j = int(np.argmax(values))
        return f"{names[j]} {values[j]:.2f}"

    lines = []
    if it.feedback_logits is not None:
        lines.append(f"1. Z = {cfg.feedback_scale:g}·cos: what {source} predicts for this patch, one logit per "
                     f"text query (highest: {top(exp.query_names, it.feedback_logits)}).")
    else:
        lines.append(f"1. Z = {cfg.feedback_scale:g}·cos: what {source} predicts for this patch.")
    if it.isolation_logits is not None:
        lines.append(f"2. U = {cfg.isolation_scale:g}·cos under uniform attention: what the block predicts when "
                     f"every token attends to every token equally, the ‘everything attends to everything’ bias "
                     f"(highest: {top(exp.query_names, it.isolation_logits)}).")
        pi_formula, pi_what = "Π = softmax(Z − U)", "with that bias removed"
    else:
        lines.append("2. U: attention isolation is off, so no bias is subtracted (an ablation of the paper).")
        pi_formula, pi_what = "Π = softmax(Z)", "as the feedback sees it (no bias removed)"
    lines.append(f"3. {pi_formula}: the patch's class distribution {pi_what}; a class takes its best synonym "
                 f"(most likely: {top(exp.class_names, it.class_probs)}).")
    formula, note = _SIMILARITY_FORMULAS.get(cfg.similarity, ("Ŝ[i]", ""))
    lines.append(f"4. {formula}: how much each patch j agrees with the query patch (1 = the same distribution; "
                 f"here {float(it.similarity.min()):.3f} to 1).{note}")
    kept = int(it.kept.sum())
    if cfg.pruning:
        lines.append(f"5. Kept set: top-p pruning (p = {cfg.p:g}) keeps the {kept} of {n} patches that agree most; "
                     f"the dimmed rest get no attention.")
    else:
        lines.append(f"5. Kept set: pruning is off, so all {n} patches stay (an ablation of the paper).")
    lines.append(f"6. A_new[i] = softmax(Ŝ·exp({cfg.lam:g}·Ŝ)) over the kept set: attention from agreement "
                 f"(largest weight {float(it.attn_new.max()):.3f}).")
    blocks = [b.block for b in it.blocks]
    where = f"block {blocks[-1]}"
    if len(blocks) > 1:
        where += (f"; blocks {', '.join(map(str, blocks[:-1]))} blend the same A_new with their own A₀ "
                  f"(beyond the paper)")
    head_text = "mean over heads" if head is None else f"head {head + 1}"
    if cfg.ensemble:
        lines.append(f"7. A_ens[i] = (A_new·A₀ + A₀·A_new + A_new)/3: blended with the baseline's attention "
                     f"A₀, this is what FSA uses ({where}; {head_text}).")
    else:
        lines.append(f"7. A_ens[i]: the adaptation ensemble is off, so FSA uses A_new[i] itself, without the "
                     f"baseline's attention (an ablation of the paper; {where}).")
    return lines


def mask_images(baseline, fsa_result) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """The baseline and FSA masks over the image, each with a legend of the classes present."""
    names = baseline.class_names
    colors = viz.class_colors(names)

    def panel(result):
        if result is None:
            return None
        body = viz.segmentation_panel(result.image, result.labels, names, colors=colors)
        font = max(14, round(body.shape[1] / 30))
        return viz.with_legend(body, names, colors, present=np.unique(result.labels), font_size=font)

    return panel(baseline), panel(fsa_result)


def run_summary(res, settings, proxy_label: Optional[str] = None) -> str:
    """One line about a pass (`res`: the FSA result when FSA ran, else the baseline's); `proxy_label`: ProxyCLIP's
    proxy (e.g. "SAM ViT-B/16"), named with its grid."""
    label = METHOD_LABELS[res.method] + (" + FSA" if res.fsa_enabled else " (FSA off)")
    crop = settings.resolved_crop()
    if len(res.windows) == 1:
        layout = "one window over the whole image"
    else:
        layout = f"{len(res.windows)} windows ({crop} px crop, stride {settings.resolved_stride()})"
    timings = ", ".join(f"{k} {v:.2f} s" for k, v in res.timings.items())
    gh, gw = res.grid
    grid = f"patch grid **{gh}×{gw}** per window"
    if proxy_label and res.method == "proxyclip":
        label += f" with {proxy_label} proxy"
        grid = f"**{gh}×{gw}** grid per window (CLIP's {res.clip_grid[0]}×{res.clip_grid[1]})"
    line = (f"**{label}** on {res.backbone} · {grid}, {layout} (image resized "
            f"to {res.working_size[1]}×{res.working_size[0]}) · timings: {timings}")
    notes = list(res.notes)
    if res.is_test_model:
        notes.append("random test weights: the masks are meaningless")
    beyond = beyond_paper_switches(settings.feedback if res.fsa_enabled else None)
    if beyond:
        line += (f"\n\n**Not the paper's method, beyond the paper: {', '.join(beyond)}** (the paper: similarity "
                 f"kl, 1 iteration, the last block).")
    return line + "".join(f"\n\nNote: {n}" for n in notes)


def attention_views(record, head: Optional[str], common_scale: bool = False, colorbars: bool = False):
    """The clicked patch of a session's `RunRecord` → (A₀ row, A_new, A_ens, Ŝ with kept set, Π chart,
    description, head selector update). The heatmaps have the image's size, or with `colorbars` (the page) a
    colour bar below; with `common_scale` the three attention rows (A₀, A_new, A_ens) share one scale, so that
    their strengths compare."""
    if record is None or record.point is None:
        raise gr.Error(NO_RUN_MESSAGE, title="Nothing to inspect yet")
    if record.diagnostics is None:
        raise gr.Error("The attention maps come from the FSA pass: switch FSA on and press “Segment” again.",
                       title="FSA is off")
    x, y = record.point
    exp = record.explain(x, y)
    h = parse_head(head)
    if h is not None and h >= exp.num_heads:
        h = None
    image, win, patch = record.image, exp.window, exp.patch
    rows = [exp.head_view(exp.attn_original, h), exp.attn_new, exp.head_view(exp.attn_ensemble, h)]
    shared = (0.0, max(float(np.max(r)) for r in rows)) if common_scale else None

    def drawn(grid_map, kept=None, bounds=None):
        lo, hi = bounds or (float(np.min(grid_map)), float(np.max(grid_map)))
        picture = viz.heatmap_overlay(image, win, grid_map, patch, kept=kept, vmin=lo, vmax=hi)
        if not colorbars:
            return picture
        return viz.with_colorbar(picture, lo, hi, font_size=max(12, round(picture.shape[1] / 40)))

    original, new, adapted = (drawn(r, bounds=shared) for r in rows)
    similarity = drawn(exp.similarity, kept=exp.kept)
    chart = viz.class_bar_chart(exp.class_names, exp.class_probs, viz.class_colors(exp.class_names),
                                max_bars=CHART_MAX_BARS)
    best = exp.class_names[int(np.argmax(exp.class_probs))]
    head_text = "mean over heads" if h is None else f"head {h + 1} of {exp.num_heads}"
    ih, iw = image.shape[:2]
    x0, x1, y0, y1 = max(0, win.x0), min(iw, win.x1), max(0, win.y0), min(ih, win.y1)
    padded = ("; its grid also covers the zero padding past the border"
              if (x0, x1, y0, y1) != (win.x0, win.x1, win.y0, win.y1) else "")
    scale = ("A₀, A_new and A_ens share one colour scale" if common_scale
             else "each map is scaled to its own range (its colour bar says which)")
    row, col = record.patch_at(x, y)
    rows, cols = record.patch_grid()
    text = (f"Query patch at row {row}, column {col} of the image's {rows}×{cols} patch grid (numbered from 1): "
            f"patch {patch[0] + 1}, {patch[1] + 1} of a {exp.grid[0]}×{exp.grid[1]} grid, in the window "
            f"x {x0}–{x1}, y {y0}–{y1}{padded} (point x={x:.0f}, y={y:.0f}); {head_text}; "
            f"{int(exp.kept.sum())} of {exp.kept.size} patches kept by pruning; most likely class under Π: "
            f"**{best}**. The cyan square is the query patch; {scale}.")
    choices = head_choices(exp.num_heads)
    head_update = gr.update(choices=choices, value=choices[0] if h is None else choices[h + 1])
    return original, new, adapted, similarity, chart, text, head_update


def compare_view(names, rows, backbone: str, is_test_model: bool, fsa_on: bool, settings=None
                 ) -> tuple[np.ndarray, str]:
    """The compare-all grid and its notes from `(method, [baseline cell, FSA cell] or None, seconds, error)`
    rows (`compare_cell`): baselines as columns, without / with FSA as rows, the legend on top. `settings`:
    the FSA settings used (a `fsa.FeedbackConfig`), named in the notes."""
    colors = viz.class_colors(names)
    pairs, labels, notes = [], [], []
    for method, pair, seconds, error in rows:
        if error is not None:
            notes.append(f"{METHOD_LABELS[method]} skipped: {error}")
            continue
        labels.append(METHOD_LABELS[method])
        pairs.append(pair)
    timings = ", ".join(f"{METHOD_LABELS[m]} {s:.1f} s" for m, pair, s, e in rows if e is None)
    width = len(pairs) * COMPARE_CELL_WIDTH + (len(pairs) + 1) * 4
    grid = viz.compare_grid([[p[0] for p in pairs], [p[1] for p in pairs]], ["without FSA (baseline)",
                            "with FSA (baseline + FSA)"], labels, cell_width=COMPARE_CELL_WIDTH,
                            header=viz.legend(names, colors, width=width, font_size=22))
    text = f"{len(pairs)} baselines on {backbone}" + (" (random test weights)" if is_test_model else "")
    if settings is not None:
        parts = [f"λ = {settings.lam:g}", f"p = {settings.p:g}"] + [
            f"{name} {'on' if on else 'off'}" for name, on in (("isolation", settings.isolation),
                                                               ("pruning", settings.pruning),
                                                               ("ensemble", settings.ensemble))]
        text += f"; FSA settings: {', '.join(parts)}; each baseline with its own window and logit-scale defaults"
    if not fsa_on:
        text += "; the FSA switch is off, but this view always shows both rows"
    text += f". Seconds per baseline: {timings}."
    return grid, text + "".join(f"\n\n{n}" for n in notes)


def score_view(record, report, reference: np.ndarray, note: str = "") -> tuple[str, np.ndarray]:
    """A `fsa.scoring` report of a session's pass → (IoU table as markdown, error maps)."""
    baseline, fsa_masks = record.masks()
    label = METHOD_LABELS.get(record.method, record.method)
    results = [(label, baseline, report.baseline)]
    if fsa_masks is not None:
        results.append((f"{label} + FSA", fsa_masks, report.fsa))
    maps = viz.error_maps(record.image, [r.labels for _, r, _ in results], reference,
                          [f"{name}: {100 - s.aacc:.1f}% wrong" for name, _, s in results])
    return report.markdown(label) + (f"\n\n{note}" if note else ""), maps


def feedback_steps_view(record, iteration, head):
    """"Feedback step by step": the 7 pictures (with their lines as captions) of one feedback pass for the
    clicked patch, the lines as text, and the pass selector."""
    if record is None or record.point is None or record.diagnostics is None:
        message = NO_STEPS_MESSAGE
        if record is not None and record.diagnostics is None:
            message = "FSA is off: switch it on and press “Segment” to see its feedback step by step."
        return [], message, gr.update(choices=pass_choices(1), value=pass_choices(1)[0])
    exp = record.explain(*record.point)
    count = len(exp.iterations)
    t = parse_pass(iteration, count)
    it = exp.iterations[t - 1]
    h = parse_head(head)
    if h is not None and h >= exp.num_heads:
        h = None
    colors = viz.class_colors(record.class_names)[:len(exp.class_names)]
    query_colors = colors[exp.query_classes] if exp.query_classes else None
    panels = viz.feedback_step_panels(
        record.image, exp.window, exp.patch, query_names=exp.query_names,
        feedback_logits=(it.feedback_logits if it.feedback_logits is not None
                         else np.zeros(len(exp.query_names))),
        isolation_logits=it.isolation_logits, class_names=exp.class_names, class_probs=it.class_probs,
        similarity=it.similarity, kept=it.kept, attn_new=it.attn_new,
        attn_ensemble=exp.head_view(it.attn_ensemble, h), query_colors=query_colors, colors=colors)
    lines = feedback_step_lines(exp, t, h)
    beyond = beyond_paper_switches(exp.feedback)
    header = (f"**Pass {t} of {count}** for the query patch at row {exp.patch[0]}, column {exp.patch[1]}: how "
              f"its attention moves from the baseline's A₀[i] (under “Clicked patch”) to FSA's A_ens[i] "
              f"(step 7).")
    if t > 1:
        header += f" This pass feeds back pass {t - 1}'s output instead of the baseline's (beyond the paper)."
    if beyond:
        header += f" Not the paper's method, beyond the paper: {', '.join(beyond)}."
    text = header + "\n\n" + "\n".join(lines)
    choices = pass_choices(count)
    return list(zip(panels, lines)), text, gr.update(choices=choices, value=choices[t - 1])


# --------------------------------------------------------------------------- accessible companions
#: text colours of the HTML legends, on their white background: 16:1 and 7:1 (WCAG AA asks ≥ 4.5:1)
LEGEND_TEXT = "#1f1f1f"
LEGEND_ABSENT_TEXT = "#595959"
LEGEND_BACKGROUND = "#ffffff"
#: classes named in a mask's alt text at most (the largest ones)
ALT_TEXT_CLASSES = 3


def _hex(color) -> str:
    return "#" + "".join(f"{int(c):02x}" for c in color[:3])


def _escape(text: str) -> str:
    return str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


def class_shares(labels: np.ndarray, n: int) -> np.ndarray:
    """(n,) fraction of the pixels of `labels` given to each class."""
    counts = np.bincount(np.asarray(labels).reshape(-1).astype(np.int64), minlength=n)[:n]
    return counts / max(1, int(counts.sum()))


def mask_alt_text(title: str, class_names, labels: Optional[np.ndarray]) -> str:
    """Alt text of a mask picture: the method and its largest classes with their share of the image."""
    if labels is None:
        return f"{title}: no mask."
    shares = class_shares(labels, len(class_names))
    order = [int(i) for i in np.argsort(-shares, kind="stable") if shares[i] > 0][:ALT_TEXT_CLASSES]
    parts = ", ".join(f"{class_names[i]} {100 * shares[i]:.0f}%" for i in order)
    return f"{title} segmentation mask over the image; largest classes: {parts}."


def html_legend(title: str, class_names, colors, labels: Optional[np.ndarray], note: str = "") -> str:
    """An HTML legend of a mask: one colour swatch, name and share of the image per class, in the vocabulary's
    order; classes absent from the mask are marked "absent" in a grey that still has ≥ 4.5:1 contrast. `note`
    (e.g. why the mask is empty) replaces the items when given."""
    head = f'<div class="fsa-legend" role="group" aria-label="{_escape(title)} legend" ' \
           f'style="background:{LEGEND_BACKGROUND};color:{LEGEND_TEXT}">'
    if note or labels is None:
        return head + f'<p class="fsa-legend-note">{_escape(note or "No mask yet.")}</p></div>'
    shares = class_shares(labels, len(class_names))
    items = []
    for i, name in enumerate(class_names):
        present = shares[i] > 0
        style = "" if present else f' style="color:{LEGEND_ABSENT_TEXT}"'
        share = f" {100 * shares[i]:.0f}%" if present else " (absent)"
        items.append(f'<li{style}><span class="fsa-swatch" style="background:{_hex(colors[i])}" '
                     f'aria-hidden="true"></span>{_escape(name)}<span class="fsa-share">{share}</span></li>')
    return head + f'<ul>{"".join(items)}</ul></div>'


FSA_OFF_NOTE = ("FSA is off, so there is no “Baseline + FSA” mask: tick “FSA (feedback self-adaptive "
                "attention)” and press Segment.")


def mask_companions(record) -> tuple[dict, dict, str, str]:
    """Of a session's pass: (baseline mask update, FSA mask update) with their alt texts, and the two HTML
    legends. The FSA legend says why it is empty when FSA was off."""
    label = METHOD_LABELS.get(record.method, record.method)
    colors = viz.class_colors(record.class_names)
    names = record.class_names
    base_alt = mask_alt_text(f"Baseline ({label})", names, record.labels)
    fsa_title = f"Baseline + FSA ({label} + FSA)"
    if record.fsa_labels is None:
        fsa_alt, fsa_legend = f"{fsa_title}: empty, FSA is off.", html_legend(fsa_title, names, colors, None,
                                                                             FSA_OFF_NOTE)
    else:
        fsa_alt = mask_alt_text(fsa_title, names, record.fsa_labels)
        fsa_legend = html_legend(fsa_title, names, colors, record.fsa_labels)
    return (gr.update(alt_text=base_alt), gr.update(alt_text=fsa_alt),
            html_legend(f"Baseline ({label})", names, colors, record.labels), fsa_legend)


def budget_line(allowed: int, queries: Optional[int], working_hw: Optional[tuple[int, int]]) -> str:
    """The class budget under the vocabulary: "up to N names for this image", and whether the vocabulary fits."""
    if working_hw is None:
        text = (f"Up to {allowed} names (classes and synonyms) for a photo at the default size; larger images take "
                f"fewer.")
    else:
        text = (f"Up to **{allowed} names** (classes and synonyms) for this image "
                f"(worked on at {working_hw[1]}×{working_hw[0]} pixels).")
    if queries is not None:
        if queries > allowed:
            text += (f" ⚠️ The vocabulary has **{queries}**: remove {queries - allowed} or lower the short side "
                     f"(Advanced settings).")
        else:
            text += f" The vocabulary has {queries}."
    return text


def failure_summary(title: str, message: str, record) -> str:
    """The summary after a refused or failed run: why, and what the panels still show."""
    kept = ("The masks below are still those of the last run that worked; they stay clickable."
            if record is not None else "Nothing has been segmented yet.")
    return f"⚠️ **{title}.** {message}\n\n{kept}"


def point_marker(record) -> str:
    """Where the clicked point is, for the page's markers: "x y aspect" as fractions of the picture (x, y)
    and its height / width, or "" when no point is chosen."""
    if record is None or record.point is None:
        return ""
    h, w = record.image.shape[:2]
    x, y = record.point
    return f"{x / w:.5f} {y / h:.5f} {h / w:.5f}"
