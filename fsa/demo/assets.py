"""The page's own style sheet and script (plain strings, no Gradio): the layout on a wide screen and on a
phone, the HTML legends, the clicked point's markers, and the helpers the page's events call to bring their
results into view (`fsaReveal`, `fsaScroll`), to mark the clicked point (`fsaMarkers`), to name Gradio's
clickable picture frames and to move the chosen patch with the arrow keys. `page.build_demo` puts them into
the page itself, so that every way of launching it gets them. Also where the example pictures are (the page's
examples, the load test's photos)."""
from pathlib import Path

#: The checkout holding this `fsa` package (fsa/demo/assets.py → two folders up) and its example pictures, in
#: the repository's examples/ folder (sources and licences in examples/SOURCES.md).
REPO_ROOT = Path(__file__).resolve().parents[2]
EXAMPLES_DIR = REPO_ROOT / "examples"

#: The page's style: results beside the inputs on a wide screen; on a phone the results right under the
#: buttons (the inputs column dissolves into the page's flow), settings and examples after them.
CSS = """
#page-style { display: none; }
/* Gradio's grey help texts (~2.5:1 on white) darkened to 7.6:1 in the light theme */
body:not(.dark) { --block-info-text-color: #4b5563; --body-text-color-subdued: #4b5563; }
#header h2 { font-size: 1.35rem; margin: 0 0 .2rem 0; }
#header p { margin: 0; }
.fsa-legend { padding: 4px 8px; border-radius: 4px; font-size: .9rem; }
.fsa-legend ul { list-style: none; margin: 0; padding: 0; display: flex; flex-wrap: wrap; gap: 2px 12px; }
.fsa-legend li { display: inline-flex; align-items: center; gap: 4px; }
.fsa-legend p { margin: 0; }
.fsa-swatch { display: inline-block; width: 14px; height: 14px; border: 1px solid #000; }
.fsa-share { margin-left: 2px; }
.fsa-marker { position: absolute; width: 18px; height: 18px; margin: -9px 0 0 -9px; border-radius: 50%;
  border: 3px solid #fff; box-shadow: 0 0 0 2px #000; pointer-events: none; z-index: 5; }
#head input { padding-right: 2.2em !important; text-overflow: ellipsis; }
#steps-gallery .grid-wrap { overflow-x: hidden; }
@media (max-width: 767px) {
  #main-row { flex-direction: column; flex-wrap: nowrap; }
  #inputs-col { display: contents; }
  #results-col { order: 1; }
  #mask-baseline, #mask-fsa { height: 210px !important; }  /* summary and both masks in one screen */
  .after-results { order: 2; }
  #examples-col { order: 3; }
  #steps-gallery .grid-container { grid-template-columns: repeat(2, minmax(0, 1fr)) !important; }
}
"""

#: Installed once on load: scrolling a part of the page into view, and the clicked point's markers.
JS = """
window.fsaReveal = (id, anchor) => {
  // after the layout has settled (new pictures change heights): when `id` is not all in view, scroll so that
  // `anchor` (default: `id`) starts at the top
  setTimeout(() => {
    const el = document.getElementById(id), top = document.getElementById(anchor || id);
    if (!el || !top) return;
    const r = el.getBoundingClientRect();
    if (r.top < 0 || r.bottom > window.innerHeight) {
      window.scrollTo({top: Math.max(0, top.getBoundingClientRect().top + window.scrollY - 8)});
    }
  }, 150);
};
window.fsaScroll = (id) => {
  setTimeout(() => {
    const el = document.getElementById(id);
    if (el) window.scrollTo({top: Math.max(0, el.getBoundingClientRect().top + window.scrollY - 8)});
  }, 150);
};
window.fsaNameButtons = () => {
  // Gradio's clickable picture frames are buttons without a name: say what a click on them does
  for (const [id, what] of [['image-input', 'the image'], ['mask-baseline', 'the baseline mask'],
                            ['mask-fsa', 'the baseline + FSA mask']]) {
    document.querySelectorAll('#' + id + ' button:not([aria-label])').forEach((b) => {
      if (b.querySelector('img')) b.setAttribute('aria-label', 'Click a point of ' + what + ' to inspect its patch');
    });
  }
};
// Arrow keys on a focused picture (the image or a mask) move the chosen patch by one row or column.
document.addEventListener('keydown', (event) => {
  const steps = {ArrowUp: [-1, 0], ArrowDown: [1, 0], ArrowLeft: [0, -1], ArrowRight: [0, 1]};
  const active = document.activeElement;
  if (!(event.key in steps) || !active || !active.closest('#image-input, #mask-baseline, #mask-fsa')) return;
  const row = document.querySelector('#patch-row input'), col = document.querySelector('#patch-col input');
  if (!row || !col || !row.value || !col.value) return;  // a patch must have been chosen first
  event.preventDefault();
  const [dr, dc] = steps[event.key];
  for (const [input, d] of [[row, dr], [col, dc]]) {
    input.value = Math.max(1, Number(input.value) + d);
    input.dispatchEvent(new Event('input', {bubbles: true}));
  }
  setTimeout(() => document.querySelector('#patch-go').click(), 50);
});
window.fsaMarkers = (value) => {
  window.fsaNameButtons();
  document.querySelectorAll('.fsa-marker').forEach((m) => m.remove());
  if (!value) return;
  const [fx, fy, aspect] = value.split(' ').map(Number);
  for (const id of ['image-input', 'mask-baseline', 'mask-fsa']) {
    const img = document.querySelector('#' + id + ' img');
    if (!img || !img.naturalWidth) continue;
    const box = img.getBoundingClientRect(), parent = img.parentElement.getBoundingClientRect();
    let scale = Math.min(box.width / img.naturalWidth, box.height / img.naturalHeight);  // object-fit: contain
    if (getComputedStyle(img).objectFit === 'scale-down') scale = Math.min(1, scale);
    const w = img.naturalWidth * scale, h = img.naturalHeight * scale;
    const left = box.left + (box.width - w) / 2, top = box.top + (box.height - h) / 2;
    const picture = id === 'image-input' ? h : Math.min(h, w * aspect);  // a mask's legend is below its picture
    const m = document.createElement('div');
    m.className = 'fsa-marker';
    m.setAttribute('aria-hidden', 'true');
    m.style.left = (left - parent.left + fx * w) + 'px';
    m.style.top = (top - parent.top + fy * picture) + 'px';
    if (getComputedStyle(img.parentElement).position === 'static') img.parentElement.style.position = 'relative';
    img.parentElement.appendChild(m);
  }
};
"""
