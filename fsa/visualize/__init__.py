"""Drawing helpers for segmentation masks and attention maps (no UI, no maths).

Every function takes and returns plain numpy arrays: images are ``(H, W, 3) uint8`` RGB.
Text is drawn with Pillow and the DejaVu Sans font that matplotlib ships (so any class name
renders); the charts use matplotlib's object API with the Agg canvas (no pyplot, thread-safe).

- `fsa.visualize.colors`: the class palette, masks painted and blended, colour maps;
- `fsa.visualize.text`: legends, captions, colour bars, images side by side, text panels;
- `fsa.visualize.maps`: mask panels, the query patch, attention heatmaps, error maps, the compare-all grid;
- `fsa.visualize.charts`: the class-share and logit bars, the feedback step by step.
"""
from __future__ import annotations

from .charts import FEEDBACK_STEPS, class_bar_chart, feedback_step_panels, feedback_steps_figure, logit_bar_chart
from .colors import (ABSENT_TEXT_COLOR, BACKGROUND_COLOR, DIM_FACTOR, ERROR_COLOR, IGNORE_HATCH, MARKER_COLOR,
                     apply_colormap, class_colors, colorize, overlay, palette)
from .maps import compare_grid, error_key, error_map, error_maps, heatmap_overlay, patch_box, segmentation_panel
from .text import legend, side_by_side, text_panel, with_colorbar, with_legend

__all__ = [
    "ABSENT_TEXT_COLOR", "BACKGROUND_COLOR", "DIM_FACTOR", "ERROR_COLOR", "FEEDBACK_STEPS", "IGNORE_HATCH",
    "MARKER_COLOR", "apply_colormap", "class_bar_chart", "class_colors", "colorize", "compare_grid", "error_key",
    "error_map", "error_maps", "feedback_step_panels", "feedback_steps_figure", "heatmap_overlay", "legend",
    "logit_bar_chart", "overlay", "palette", "patch_box", "segmentation_panel", "side_by_side", "text_panel",
    "with_colorbar", "with_legend",
]
