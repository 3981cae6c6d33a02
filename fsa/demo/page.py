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
from typing import Optional

import gradio as gr

from ..config import METHOD_DEFAULTS, METHOD_LABELS, METHODS, default_lambda
from .forms import (
    ITERATIONS_MAX, MEAN_HEADS, PAPER_ITERATIONS, PAPER_SIMILARITY, SIMILARITY_CHOICES, head_choices, pass_choices,
)
from .guards import check_number_inputs, decoded_image_input, friendly_errors
from .handlers import DEFAULT_PROXY, DemoApp, proxy_choices
from .assets import CSS, EXAMPLES_DIR, JS
from .interactive import PageEvents
from .server import launch_options, server_options
from .views import HEATMAP_FORMAT, NO_STEPS_MESSAGE

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
Training-free open-vocabulary segmentation with CLIP: a baseline labels every patch, and **FSA** (ICCV 2025)
feeds those predictions back into CLIP's last attention block. Upload an image, name its classes, press
**Segment**; then **click** the image or a mask (or give a patch's row and column) to see that patch's attention
before and after FSA."""
ABOUT = """\
Baselines: MaskCLIP, SCLIP, ClearCLIP, NACLIP, ProxyCLIP, GCLIP or vanilla CLIP. FSA: patches whose class
distributions agree attend to each other, and the baseline's own attention is blended in. Left: the baseline;
right: baseline + FSA, from one forward pass. Vocabulary: classes separated by commas, synonyms by `;`,
optional `background`. Backbones other than the default download their weights on first use."""

BEYOND_INTRO = """\
The paper runs **one** feedback pass into the **last** block, with a **KL** similarity. These switches ask what
the paper leaves open; any value other than the first one is **not the paper's method** and the run summary says so.
They apply to *Segment* and `/segment`; *Compare all baselines*, `/attention` and `/score` keep the paper's
settings. *Feedback step by step* (under the clicked patch) follows them."""

#: One plain line for each part of FSA and its two numbers (docs/method.md has the maths).
HELP = {
    "isolation": "Removes the ‘every patch attends to every patch’ bias from the fed-back predictions "
                 "(Π = softmax(Z − U)).",
    "pruning": "Each patch keeps only the patches whose predictions agree most with its own (the top-p of Ŝ).",
    "ensemble": "Blends the new attention with the baseline's own: A_ens = (A_new·A₀ + A₀·A_new + A_new)/3.",
    "lambda": "How sharply agreement turns into attention: a larger λ puts it on the most similar patches.",
    "p": "The share of the similarity that pruning keeps: a smaller p keeps fewer patches.",
}

def build_demo(app: Optional[DemoApp] = None) -> gr.Blocks:
    """The page, wired to `app` (created from the environment when None). Queue included; launch it with
    `launch_options(app.limits)` for the temp-folder sweeper."""
    app = app or DemoApp()
    events = PageEvents(app)
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
        measured = gr.State(None)  # (image, short side, working size) of the budget line
        # The page's style and script travel with the page itself (not with launch()), so that every way of
        # launching it gets them.
        gr.HTML(f"<style>{CSS}</style>", js_on_load=JS, container=False, padding=False, elem_id="page-style")
        gr.Markdown(f"## {TITLE}\n{INTRO}", elem_id="header")
        gr.Markdown(app.status_markdown(), elem_id="model-status")
        with gr.Row(elem_id="main-row"):
            with gr.Column(scale=2, min_width=320, elem_id="inputs-col"):
                image = decoded_image_input(gr.Image(label="Image", type="filepath", image_mode=None, height=230,
                                                      sources=["upload", "clipboard", "webcam"],
                                                      elem_id="image-input"))
                classes = gr.Textbox(label="Vocabulary", lines=2, max_lines=6, elem_id="classes",
                                     placeholder="cat; kitten, sofa, background",
                                     info="Classes separated by commas, synonyms by “;”; add “background” "
                                          "for a catch-all class.")
                budget = gr.Markdown(events.budget_text(None, ""), elem_id="class-budget")
                with gr.Row():
                    method = gr.Dropdown([(METHOD_LABELS[m], m) for m in METHODS], value="clearclip",
                                         label="Baseline", elem_id="method")
                    backbone = gr.Dropdown(app.backbone_choices(), value=app.default_backbone, label="Backbone",
                                           elem_id="backbone")
                # ProxyCLIP's proxy vision model: shown only when ProxyCLIP is the baseline
                proxy = gr.Dropdown(proxy_choices(), value=DEFAULT_PROXY, label="ProxyCLIP proxy", elem_id="proxy",
                                    visible=False, info="The vision model whose patch affinity ProxyCLIP uses; "
                                                        "SAM (64×64 grid) is slow on a CPU.")
                with gr.Row():
                    run = gr.Button("Segment", variant="primary", elem_id="run")
                    compare = gr.Button("Compare all baselines", elem_id="compare-all")
                with gr.Group(elem_classes="after-results"):
                    fsa_on = gr.Checkbox(True, label="FSA (feedback self-adaptive attention)", elem_id="fsa-toggle",
                                         info="Off: the baseline alone (the “Baseline + FSA” mask stays empty).")
                with gr.Accordion("FSA parts", open=False, elem_id="fsa-parts", elem_classes="after-results"):
                    isolation = gr.Checkbox(True, label="Attention isolation", elem_id="fsa-isolation",
                                            info=HELP["isolation"])
                    pruning = gr.Checkbox(True, label="Confidence-based pruning", elem_id="fsa-pruning",
                                          info=HELP["pruning"])
                    ensemble = gr.Checkbox(True, label="Adaptation ensemble", elem_id="fsa-ensemble",
                                           info=HELP["ensemble"])
                    lam = gr.Slider(0.0, 10.0, value=default_lambda(app.default_backbone), step=0.1,
                                    label="λ (scaling of the similarity)", elem_id="fsa-lambda", info=HELP["lambda"])
                    p = gr.Slider(0.05, 1.0, value=0.45, step=0.01, label="p (top-p kept by pruning)",
                                  elem_id="fsa-p", info=HELP["p"])
                with gr.Accordion("Advanced settings", open=False, elem_id="advanced", elem_classes="after-results"):
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
                with gr.Accordion("About the method", open=False, elem_id="about", elem_classes="after-results"):
                    gr.Markdown(ABOUT)
                with gr.Column(elem_id="examples-col"):
                    gr.Examples([[str(EXAMPLES_DIR / f), v, m] for f, v, m in EXAMPLES],
                                inputs=[image, classes, method], cache_examples=False, elem_id="examples",
                                label="Examples (public domain / CC0, see examples/SOURCES.md); then press Segment")
            with gr.Column(scale=3, min_width=480, elem_id="results-col"):
                # the summary above the masks: a refusal is read where the eye lands, the masks right under it
                run_info = gr.Markdown("Pick an image and a vocabulary, then press “Segment”.", label="Summary",
                                       elem_id="run-info")
                with gr.Row(elem_id="mask-row"):
                    with gr.Column(min_width=160):
                        mask_baseline = gr.Image(label="Baseline", type="numpy", format="png", interactive=False,
                                                 elem_id="mask-baseline", height=300,
                                                 alt_text="Baseline mask: none yet")
                        legend_baseline = gr.HTML("", elem_id="legend-baseline", padding=False)
                    with gr.Column(min_width=160):
                        mask_fsa = gr.Image(label="Baseline + FSA", type="numpy", format="png", interactive=False,
                                            elem_id="mask-fsa", height=300, alt_text="Baseline + FSA mask: none yet")
                        legend_fsa = gr.HTML("", elem_id="legend-fsa", padding=False)
                gr.Markdown("### Clicked patch\nClick the image or a mask, or give a patch's row and column "
                            "(Enter shows it); then the arrow keys on a focused picture move it.",
                            elem_id="patch-heading")
                with gr.Row(elem_id="patch-controls"):
                    patch_row = gr.Number(None, label="Patch row", precision=0, elem_id="patch-row",
                                          placeholder="from 1", min_width=90)
                    patch_col = gr.Number(None, label="Patch column", precision=0, elem_id="patch-col",
                                          placeholder="from 1", min_width=90)
                    patch_go = gr.Button("Show patch", elem_id="patch-go", min_width=110)
                    head = gr.Dropdown(head_choices(app.num_heads), value=MEAN_HEADS, label="Attention head",
                                       elem_id="head", min_width=190, scale=2)
                    common_scale = gr.Checkbox(False, label="One colour scale for A₀, A_new, A_ens",
                                               elem_id="common-scale", min_width=140, scale=1)
                attn_info = gr.Markdown("Click a point on the image or on a mask to inspect its patch.",
                                        label="Patch description", elem_id="attn-info")
                # In the algorithm's order: A₀ (what FSA starts from) → Π → Ŝ and the kept set → A_new → A_ens.
                with gr.Row():
                    attn_original = gr.Image(label="A₀[i]: the baseline's attention", type="numpy",
                                             format=HEATMAP_FORMAT, interactive=False, elem_id="attn-original")
                    class_probs = gr.Image(label="1 · Π_i: class distribution after isolation", type="numpy",
                                           format="png", interactive=False, elem_id="class-probs",
                                           show_label=False)
                with gr.Row():
                    attn_similarity = gr.Image(label="2 · Ŝ[i] similarity; 3 · dimmed: pruned (not kept)",
                                               type="numpy", format=HEATMAP_FORMAT, interactive=False,
                                               elem_id="attn-similarity")
                    attn_new = gr.Image(label="4 · A_new[i]: attention from agreement", type="numpy",
                                        format=HEATMAP_FORMAT, interactive=False, elem_id="attn-new")
                with gr.Row():
                    attn_adapted = gr.Image(label="5 · A_ens[i]: the adapted attention FSA uses", type="numpy",
                                            format=HEATMAP_FORMAT, interactive=False, elem_id="attn-adapted")
                with gr.Accordion("Feedback step by step (the paper's method)", open=False,
                                  elem_id="steps-section") as steps_section:
                    gr.Markdown("For the clicked patch: each step of one feedback pass, in order, with one line "
                                "saying what it is (the gallery's arrows go from step to step).")
                    steps_pass = gr.Radio(pass_choices(1), value=pass_choices(1)[0], label="Feedback pass",
                                          elem_id="steps-pass")
                    steps_text = gr.Markdown(NO_STEPS_MESSAGE, elem_id="steps-text")
                    steps_gallery = gr.Gallery(label="Feedback step by step", columns=4, preview=True, format="png",
                                               object_fit="contain", elem_id="steps-gallery")
        with gr.Accordion("Compare all baselines", open=False, elem_id="compare-section") as compare_section:
            compare_info = gr.Markdown("Press “Compare all baselines”: every baseline without and with FSA, on "
                                       "the image and vocabulary above.", label="Compare notes",
                                       elem_id="compare-info")
            # no label badge: it would cover the legend at the top of the grid
            compare_grid = gr.Image(label="Every baseline (columns), without and with FSA (rows)", type="numpy",
                                    format="png", interactive=False, elem_id="compare-grid", show_label=False)
        with gr.Accordion("Score against a reference mask", open=False, elem_id="score-section"):
            gr.Markdown("Upload the ground truth of the image you segmented: a PNG of class indices in the order "
                        "of the vocabulary (255 = ignore), or a colour PNG in the app's class colours (black, "
                        "white and transparent = ignore), either at the size of the image you uploaded or at the "
                        "segmented size (the summary gives it). The last run is scored; the result says which "
                        "size it used.")
            with gr.Row():
                score_reference = gr.File(label="Reference mask (PNG)", file_types=["image"], type="filepath",
                                          elem_id="score-reference", scale=2)
                score_button = gr.Button("Score", elem_id="score-run", scale=1)
            score_table = gr.Markdown("", label="Per-class IoU", elem_id="score-table")
            score_errors = gr.Image(label="Error maps (red: wrong)", type="numpy", format="png", interactive=False,
                                    elem_id="score-errors", show_label=False)
            api_score = gr.Button("api-score", visible=False)
        with gr.Accordion("Explore beyond the paper", open=False, elem_id="beyond-section"):
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
        marker = gr.Textbox("", visible=False, elem_id="point-marker")
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
        # Segment: the results come into view at once (the progress shows on the masks), a refusal is said in
        # the summary while the last good masks stay (PageEvents.segment), and the markers go.
        reveal_results = "() => { window.fsaReveal('mask-row', 'run-info'); }"
        run.click(None, None, None, js=reveal_results, queue=False)
        run.click(events.segment_button, run_inputs,
                  [mask_baseline, mask_fsa, run_info, record] + attention
                  + [legend_baseline, legend_fsa, marker, patch_row, patch_col],
                  api_visibility="private", show_progress_on=[mask_baseline, mask_fsa], **model_job
                  ).then(None, marker, None, queue=False,
                         js="(v) => { window.fsaMarkers(v); window.fsaReveal('mask-row', 'run-info'); }")
        # Compare all: its section opens and comes into view, with the progress on its grid.
        compare.click(lambda: gr.Accordion(open=True), None, compare_section, api_visibility="private",
                      queue=False, js="() => { window.fsaScroll('compare-section'); }")
        compare.click(wrap(app.compare_all), [image, classes, backbone, fsa_on, isolation, pruning, ensemble, lam, p,
                                              short_side, bg_threshold, proxy], [compare_grid, compare_info],
                      api_name="compare_all", show_progress_on=[compare_grid], **model_job
                      ).then(None, None, None, js="() => { window.fsaReveal('compare-grid', 'compare-section'); }",
                             queue=False)
        # A click, or a patch's row and column (keyboard): the maps come into view, the point is marked on
        # the image and both masks; a click before any run says so in the patch description.
        click_outputs = attention + [head, record, marker, patch_row, patch_col]
        click_job = dict(api_visibility="private", concurrency_id="click", concurrency_limit=4,
                         show_progress_on=[attn_original, attn_adapted])
        show_point = "(v) => { window.fsaMarkers(v); window.fsaReveal('attn-original', 'attn-info'); }"
        patch_inputs = [record, head, common_scale]
        clicks = [image.select(events.click_input, patch_inputs, click_outputs, **click_job)]
        for mask in (mask_baseline, mask_fsa):
            clicks.append(mask.select(events.click_mask, patch_inputs, click_outputs, **click_job))
        for trigger in (patch_go.click, patch_row.submit, patch_col.submit):
            clicks.append(trigger(events.pick_patch, patch_inputs + [patch_row, patch_col], click_outputs,
                                  **click_job))
        for event in clicks:
            event.then(None, marker, None, js=show_point, queue=False)
        for trigger in (head.input, common_scale.input):
            trigger(wrap(events.redraw), patch_inputs, attention + [head], **click_job)
        # The class budget of the uploaded image, before Segment; an unreadable upload is said at once.
        # One event for every trigger ("always_last": a trigger while it runs makes it run once more, with the
        # values as they are then), so that the last answer is the current one.
        gr.on([image.change, method.change, short_side.blur, classes.change], events.image_budget,
              [image, method, short_side, classes, measured], [measured, budget], api_visibility="private",
              concurrency_id="budget", concurrency_limit=1, show_progress="hidden", trigger_mode="always_last")
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
        steps_section.expand(lambda: True, None, steps_shown, api_visibility="private", queue=False).then(
            wrap(app.feedback_steps), steps_inputs, steps_outputs, **steps_job)
        steps_section.collapse(lambda: False, None, steps_shown, api_visibility="private", queue=False)
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
