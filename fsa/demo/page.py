"""The demo's page: its components and element ids, the wiring of every event to a `DemoApp` method, the
names of the four public endpoints (/segment, /attention, /compare_all, /score), and `main`.

Start it with `python app.py` or `python -m fsa.demo`. Per-user data (what a click on the last forward pass
needs) lives in a per-session `gr.State`; the only shared object is a `DemoApp`, which holds the model caches.

Environment: FSA_MODEL (backbone, default ViT-B-16; `tiny-test` = random weights for tests),
GRADIO_SERVER_NAME / GRADIO_SERVER_PORT (or PORT), and the `RuntimeLimits` variables FSA_CONCURRENCY,
FSA_SESSION_TTL, FSA_MAX_PIXELS, FSA_MAX_CLASSES, FSA_TEMP_TTL (see the README's settings table).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import gradio as gr

from ..config import METHOD_DEFAULTS, METHOD_LABELS, METHODS, default_lambda
from .forms import (
    ITERATIONS_MAX, MEAN_HEADS, PAPER_ITERATIONS, PAPER_SIMILARITY, SIMILARITY_CHOICES, head_choices, pass_choices,
)
from .guards import check_number_inputs, decoded_image_input, friendly_errors
from .handlers import DEFAULT_PROXY, DemoApp, proxy_choices
from .server import launch_options, server_options
from .views import HEATMAP_FORMAT, NO_STEPS_MESSAGE

#: The example pictures ship beside the package, in the repository's examples/ folder.
EXAMPLES_DIR = Path(__file__).resolve().parents[2] / "examples"
#: (file, vocabulary, method) shown under the inputs; sources and licences in examples/SOURCES.md
EXAMPLES: list[tuple[str, str, str]] = [
    ("astronaut.jpg", "astronaut; person, american flag; flag, spacecraft model, background", "clearclip"),
    ("coffee.jpg", "coffee; espresso, cup; mug, saucer; plate, spoon, table; wood", "sclip"),
    ("chelsea_cat.jpg", "cat; kitten, floor; ground, background", "maskclip"),
    ("rocket.jpg", "rocket, smoke; exhaust plume, sky, launch tower, trees; forest", "naclip"),
    ("camera.png", "man; person, camera, tripod, grass; lawn, sky, building", "proxyclip"),
    ("hubble_deep_field.jpg", "galaxy, star, background", "clearclip"),
]
TITLE = "FSA: Feedback Self-adaptive Attention for CLIP segmentation"
INTRO = """\
Training-free open-vocabulary segmentation with CLIP. A baseline (MaskCLIP, SCLIP, ClearCLIP, NACLIP,
ProxyCLIP, GCLIP or vanilla CLIP) labels every patch; **FSA** (ICCV 2025) feeds those predictions back
into CLIP's last attention block: patches whose class distributions agree attend to each other, and the
baseline's own attention is blended in. Left: the baseline; right: baseline + FSA, from one forward pass.
**Click** a point on the image or a mask to see the attention of that patch before and after FSA.
Vocabulary: classes separated by commas, synonyms by `;`, optional `background`."""

BEYOND_INTRO = """\
The paper runs **one** feedback pass into the **last** block, with a **KL** similarity. These switches ask what
the paper leaves open; any value other than the first one is **not the paper's method** and the run summary says so.
They apply to *Segment* and `/segment`; *Compare all baselines*, `/attention` and `/score` keep the paper's
settings. The step-by-step view below works for the paper's settings too."""


def build_demo(app: Optional[DemoApp] = None) -> gr.Blocks:
    """The page, wired to `app` (created from the environment when None). Queue included; launch it with
    `launch_options(app.limits)` for the temp-folder sweeper."""
    app = app or DemoApp()
    limits = app.limits
    d0 = METHOD_DEFAULTS["clearclip"]
    wrap = friendly_errors
    # delete_cache: Gradio deletes its temp files (uploads, PNGs sent back) older than temp_ttl, every
    # temp_sweep_every seconds, and all of them when the server stops.
    with gr.Blocks(title="FSA segmentation demo", analytics_enabled=False,
                   delete_cache=(int(limits.temp_sweep_every), max(1, int(limits.temp_ttl)))) as demo:
        # The session's last pass: dropped after session_ttl without a request, or when the page closes
        # (`end_session` below; Gradio alone would keep a closed session's state for an hour).
        record = gr.State(None, time_to_live=limits.session_ttl, delete_callback=app.forget)
        gr.Markdown(f"# {TITLE}\n{INTRO}", elem_id="header")
        gr.Markdown(app.status_markdown(), elem_id="model-status")
        with gr.Row():
            with gr.Column(scale=2, min_width=320):
                image = decoded_image_input(gr.Image(label="Image", type="filepath", image_mode=None,
                                                      sources=["upload", "clipboard", "webcam"],
                                                      elem_id="image-input"))
                classes = gr.Textbox(label="Vocabulary", lines=2, elem_id="classes",
                                     placeholder="cat; kitten, sofa, background",
                                     info="Classes separated by commas, synonyms by “;”; add “background” "
                                          "for a catch-all class.")
                with gr.Row():
                    method = gr.Dropdown([(METHOD_LABELS[m], m) for m in METHODS], value="clearclip",
                                         label="Baseline", elem_id="method")
                    backbone = gr.Dropdown(app.backbone_choices(), value=app.default_backbone, label="Backbone",
                                           elem_id="backbone",
                                           info="Other backbones download their weights on first use.")
                # ProxyCLIP's proxy vision model: shown only when ProxyCLIP is the baseline
                proxy = gr.Dropdown(proxy_choices(), value=DEFAULT_PROXY, label="ProxyCLIP proxy", elem_id="proxy",
                                    visible=False, info="The vision model whose patch affinity ProxyCLIP uses; "
                                                        "SAM (64×64 grid) is slow on a CPU.")
                fsa_on = gr.Checkbox(True, label="FSA (feedback self-adaptive attention)", elem_id="fsa-toggle")
                with gr.Accordion("FSA parts", open=False, elem_id="fsa-parts"):
                    with gr.Row():
                        isolation = gr.Checkbox(True, label="Attention isolation", elem_id="fsa-isolation")
                        pruning = gr.Checkbox(True, label="Confidence-based pruning", elem_id="fsa-pruning")
                        ensemble = gr.Checkbox(True, label="Adaptation ensemble", elem_id="fsa-ensemble")
                    lam = gr.Slider(0.0, 10.0, value=default_lambda(app.default_backbone), step=0.1,
                                    label="λ (scaling of the similarity)", elem_id="fsa-lambda")
                    p = gr.Slider(0.05, 1.0, value=0.45, step=0.01, label="p (top-p kept by pruning)",
                                  elem_id="fsa-p")
                with gr.Accordion("Advanced settings", open=False, elem_id="advanced"):
                    short_side = gr.Number(app.short_side_for("clearclip"), label="Short side (pixels)",
                                           precision=0, minimum=16, maximum=2048, elem_id="short-side")
                    with gr.Row():
                        crop = gr.Number(d0.crop, label="Window crop (px, 0 = whole image)", precision=0,
                                         minimum=0, elem_id="crop")
                        stride = gr.Number(d0.stride, label="Window stride (px)", precision=0, minimum=1,
                                           elem_id="stride")
                    with gr.Row():
                        logit_scale = gr.Number(d0.logit_scale, label="Logit scale τ", minimum=0.1,
                                                elem_id="logit-scale")
                        bg_threshold = gr.Slider(0.0, 0.99, value=0.0, step=0.01, elem_id="bg-threshold",
                                                 label="Background threshold (best probability below → background)")
                with gr.Row():
                    run = gr.Button("Segment", variant="primary", elem_id="run")
                    compare = gr.Button("Compare all baselines", elem_id="compare-all")
                gr.Examples([[str(EXAMPLES_DIR / f), v, m] for f, v, m in EXAMPLES], inputs=[image, classes, method],
                            label="Examples (public domain / CC0, see examples/SOURCES.md)", cache_examples=False,
                            elem_id="examples")
            with gr.Column(scale=3, min_width=480):
                with gr.Row():
                    mask_baseline = gr.Image(label="Baseline", type="numpy", format="png", interactive=False,
                                             elem_id="mask-baseline")
                    mask_fsa = gr.Image(label="Baseline + FSA", type="numpy", format="png", interactive=False,
                                        elem_id="mask-fsa")
                run_info = gr.Markdown("Pick an image and a vocabulary, then press “Segment”.", label="Summary",
                                       elem_id="run-info")
                gr.Markdown("### Clicked patch")
                with gr.Row():
                    head = gr.Dropdown(head_choices(app.num_heads), value=MEAN_HEADS, label="Attention head",
                                       elem_id="head", scale=1)
                    attn_info = gr.Markdown("Click a point on the image or on a mask to inspect its patch.",
                                            label="Patch description", elem_id="attn-info")
                with gr.Row():
                    attn_original = gr.Image(label="Baseline attention row A₀[i]", type="numpy", format=HEATMAP_FORMAT,
                                             interactive=False, elem_id="attn-original")
                    attn_new = gr.Image(label="A_new[i] (from the output similarity)", type="numpy", format=HEATMAP_FORMAT,
                                        interactive=False, elem_id="attn-new")
                with gr.Row():
                    attn_adapted = gr.Image(label="Adapted attention A_ens[i]", type="numpy", format=HEATMAP_FORMAT,
                                            interactive=False, elem_id="attn-adapted")
                    attn_similarity = gr.Image(label="Similarity Ŝ[i] (dimmed: pruned)", type="numpy",
                                               format=HEATMAP_FORMAT, interactive=False, elem_id="attn-similarity")
                class_probs = gr.Image(label="Π_i: class distribution after isolation", type="numpy",
                                       format="png", interactive=False, elem_id="class-probs")
        with gr.Accordion("Compare all baselines", open=True, elem_id="compare-section"):
            compare_grid = gr.Image(label="Every baseline, without and with FSA", type="numpy", format="png",
                                    interactive=False, elem_id="compare-grid")
            compare_info = gr.Markdown("", label="Compare notes", elem_id="compare-info")
        with gr.Accordion("Score against a reference mask", open=False, elem_id="score-section"):
            gr.Markdown("Upload the ground truth of the image you segmented: a PNG of class indices in the order "
                        "of the vocabulary (255 = ignore), or a colour PNG in the app's class colours (black, "
                        "white and transparent = ignore), of the image's exact size. The last run is scored.")
            with gr.Row():
                score_reference = gr.File(label="Reference mask (PNG)", file_types=["image"], type="filepath",
                                          elem_id="score-reference", scale=2)
                score_button = gr.Button("Score", elem_id="score-run", scale=1)
            score_table = gr.Markdown("", label="Per-class IoU", elem_id="score-table")
            score_errors = gr.Image(label="Error maps (red: wrong)", type="numpy", format="png", interactive=False,
                                    elem_id="score-errors")
            api_score = gr.Button("api-score", visible=False)
        with gr.Accordion("Explore beyond the paper", open=False, elem_id="beyond-section") as beyond_section:
            gr.Markdown(BEYOND_INTRO)
            with gr.Row():
                beyond_similarity = gr.Radio(SIMILARITY_CHOICES, value=PAPER_SIMILARITY, elem_id="beyond-similarity",
                                             label="Output similarity Ŝ (other than KL: beyond the paper)")
                beyond_iterations = gr.Slider(1, ITERATIONS_MAX, value=PAPER_ITERATIONS, step=1,
                                              label="Feedback passes (1 = the paper; more: beyond the paper)",
                                              elem_id="beyond-iterations")
                beyond_blocks = gr.Textbox("", label="Adapted blocks (other than the last: beyond the paper)",
                                           placeholder="empty = the last block (the paper); “last two”; "
                                                       "“11, 12”",
                                           elem_id="beyond-blocks")
            gr.Markdown("### Feedback step by step\nFor the clicked patch: each step of one feedback pass, "
                        "in order, with one line saying what it is (the gallery's arrows go from step to step).")
            steps_pass = gr.Radio(pass_choices(1), value=pass_choices(1)[0], label="Feedback pass",
                                  elem_id="steps-pass")
            steps_text = gr.Markdown(NO_STEPS_MESSAGE, elem_id="steps-text")
            steps_gallery = gr.Gallery(label="Feedback step by step", columns=4, preview=True, format="png",
                                       object_fit="contain", elem_id="steps-gallery")
        # Hidden inputs of the /attention endpoint and triggers of the two API endpoints.
        with gr.Row(visible=False):
            query_x = gr.Number(label="x", elem_id="query-x")
            query_y = gr.Number(label="y", elem_id="query-y")
            api_segment = gr.Button("api-segment")
            api_attention = gr.Button("api-attention")

        attention = [attn_original, attn_new, attn_adapted, attn_similarity, class_probs, attn_info]
        # Forward passes queue in one group of FSA_CONCURRENCY; show_progress="full" puts the queue position
        # and the progress bar on the outputs. Clicks on a cached pass cost milliseconds: they have groups
        # of their own and never wait behind forward passes.
        model_job = dict(concurrency_id="model", concurrency_limit=limits.concurrency, show_progress="full")
        run_inputs = [record, image, classes, method, backbone, fsa_on, isolation, pruning, ensemble, lam, p,
                      short_side, crop, stride, logit_scale, bg_threshold]
        beyond = [beyond_similarity, beyond_iterations, beyond_blocks]
        run_inputs += beyond + [proxy]
        run.click(wrap(app.run), run_inputs, [mask_baseline, mask_fsa, run_info, record] + attention,
                  api_visibility="private", show_progress_on=[mask_baseline, mask_fsa], **model_job)
        compare.click(wrap(app.compare_all), [image, classes, backbone, fsa_on, isolation, pruning, ensemble, lam, p,
                                              short_side, bg_threshold, proxy], [compare_grid, compare_info],
                      api_name="compare_all", show_progress_on=[compare_grid], **model_job)
        click_outputs = attention + [head, record]
        click_job = dict(api_visibility="private", concurrency_id="click", concurrency_limit=4,
                         show_progress_on=[attn_original, attn_adapted])
        image.select(wrap(app.click_input), [record, head], click_outputs, **click_job)
        for mask in (mask_baseline, mask_fsa):
            mask.select(wrap(app.click_mask), [record, head], click_outputs, **click_job)
        head.input(wrap(app.change_head), [record, head], attention + [head], **click_job)
        method.change(app.method_defaults, method, [short_side, crop, stride, logit_scale],
                      api_visibility="private", queue=False)
        backbone.change(app.backbone_defaults, [backbone, method, proxy], lam, api_visibility="private", queue=False)
        proxy.change(app.backbone_defaults, [backbone, method, proxy], lam, api_visibility="private", queue=False)
        method.change(app.proxy_visibility, [method, backbone, proxy], [proxy, lam], api_visibility="private",
                      queue=False)
        api_segment.click(wrap(app.api_segment),
                          [record, image, classes, method, fsa_on, isolation, pruning, ensemble, lam, p] + beyond
                          + [proxy],
                          [mask_baseline, mask_fsa, run_info, record], api_name="segment", **model_job)
        # /attention answers from the session's cached pass without the model; when it has to run a pass it
        # takes a model slot itself (DemoApp._model_slot), so it stays out of the "model" queue.
        api_attention.click(wrap(app.api_attention), [record, image, classes, method, query_x, query_y, head],
                            attention + [record], api_name="attention", concurrency_id="attention",
                            concurrency_limit=8, show_progress="full")

        score_button.click(wrap(app.score), [record, score_reference], [score_table, score_errors],
                           api_name="score_button", api_visibility="private", concurrency_limit=4)
        # /score, like /attention, answers from the cached pass without the model and takes a model slot
        # itself when it must run one.
        api_score.click(wrap(app.api_score), [record, image, classes, method, score_reference],
                        [score_table, score_errors, record], api_name="score", concurrency_id="score",
                        concurrency_limit=4, show_progress="full")
        # Feedback step by step: redrawn whenever the clicked-patch description changes (a click, the head
        # selector, or a new run that clears it) and when another pass is picked.
        steps_outputs = [steps_gallery, steps_text, steps_pass]
        # Drawn only while the section is open (it costs several times a click): on opening, and then on
        # every change; closed, a click leaves the gallery as it was.
        steps_job = dict(api_visibility="private", concurrency_limit=4)
        steps_inputs = [record, steps_pass, head]
        steps_shown = gr.State(False)
        beyond_section.expand(lambda: True, None, steps_shown, api_visibility="private", queue=False).then(
            wrap(app.feedback_steps), steps_inputs, steps_outputs, **steps_job)
        beyond_section.collapse(lambda: False, None, steps_shown, api_visibility="private", queue=False)
        attn_info.change(wrap(app.feedback_steps_if_shown), steps_inputs + [steps_shown], steps_outputs, **steps_job)
        steps_pass.input(wrap(app.feedback_steps), steps_inputs, steps_outputs, **steps_job)


        async def end_session(request: gr.Request) -> None:
            """The page closed: drop the session's state now, and the ~110 KB of page config Gradio keeps
            per session. Async, so that it runs on the event loop between the state holder's sweeps."""
            holder = getattr(getattr(demo, "server_app", None), "state_holder", None)
            session = request.session_hash
            if holder is None or not session:
                return
            holder.delete_state(session)
            with holder.lock:
                holder.session_data.pop(session, None)
                holder.time_last_used.pop(session, None)

        demo.unload(end_session)
    check_number_inputs(demo)
    demo.queue(max_size=64, default_concurrency_limit=2)
    return demo


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    app = DemoApp()
    demo = build_demo(app)
    demo.launch(**server_options(), **launch_options(app.limits))
