"""The page's form values → settings: the head and pass selectors, and the "Explore beyond the paper"
fields (similarity, feedback passes, adapted blocks), each checked with a message naming the field."""
from __future__ import annotations

from typing import Callable, Optional

import gradio as gr

from ..checks import check_number


MEAN_HEADS = "mean over heads"


def parse_head(value: Optional[str]) -> Optional[int]:
    """Head selector value → None (mean) or a 0-based head index."""
    if not value or value == MEAN_HEADS:
        return None
    try:
        return int(str(value).split()[-1]) - 1
    except ValueError:
        raise gr.Error(f"unknown head {value!r}; pick “{MEAN_HEADS}” or “head N”") from None


def head_choices(num_heads: int) -> list[str]:
    return [MEAN_HEADS] + [f"head {h + 1}" for h in range(num_heads)]


#: The paper's values of the switches FSA leaves open (fsa.FeedbackConfig's defaults).
PAPER_SIMILARITY, PAPER_ITERATIONS = "kl", 1
SIMILARITY_CHOICES = [("KL divergence (the paper)", "kl"), ("symmetric KL (beyond the paper)", "sym_kl"),
                      ("Jensen–Shannon (beyond the paper)", "js")]
ITERATIONS_MAX = 4
LAST_BLOCK, LAST_TWO_BLOCKS = "last", "last two"


def parse_iterations(value) -> int:
    """Feedback passes from the page (a slider may send 2.0) → int in 1..ITERATIONS_MAX; None → the paper's 1."""
    if value is None:
        return PAPER_ITERATIONS
    return check_number("iterations (feedback passes)", value, low=1, high=ITERATIONS_MAX, integer=True)


def parse_blocks(text, depth: Callable[[], int]) -> Optional[tuple[int, ...]]:
    """The blocks box → FeedbackConfig.blocks: None (the last block, the paper) or sorted 1-based blocks.

    Accepts empty / "last" (the paper), "last two", or block numbers separated by commas or spaces
    ("11, 12"); `depth()` (blocks of the vision tower) is only asked for when needed. The last block
    alone is returned as None, the paper's setting. Raises ValueError naming the bad entry.
    """
    if text is None:
        return None
    if not isinstance(text, str):  # a sequence of block numbers from Python
        text = ", ".join(str(b) for b in text)
    words = text.strip().lower().replace("(the paper)", "").replace("(paper)", "").strip()
    if words in ("", LAST_BLOCK):
        return None
    n = depth()
    if words == LAST_TWO_BLOCKS:
        return (n - 1, n) if n > 1 else None
    hint = (f"type 1-based block numbers separated by commas (e.g. “{max(1, n - 1)}, {n}”), "
            f"“{LAST_TWO_BLOCKS}”, or leave the box empty for the last block (the paper)")
    blocks = []
    for token in words.replace(",", " ").split():
        if not (token.isascii() and token.isdigit()):
            raise ValueError(f"blocks: {token!r} is not a block number; {hint}")
        block = int(token)
        if not 1 <= block <= n:
            raise ValueError(f"blocks: block {block} is outside 1..{n} of this backbone's {n}-block vision tower; "
                             f"{hint}")
        if block in blocks:
            raise ValueError(f"blocks: block {block} is listed twice; {hint}")
        blocks.append(block)
    return None if blocks == [n] else tuple(sorted(blocks))


def beyond_paper_switches(feedback) -> list[str]:
    """The switches of a FeedbackConfig (or None) that are not the paper's, in words ([] for the paper)."""
    if feedback is None:
        return []
    out = []
    if feedback.similarity != PAPER_SIMILARITY:
        out.append(f"similarity {feedback.similarity}")
    if feedback.iterations != PAPER_ITERATIONS:
        out.append(f"{feedback.iterations} iterations")
    if feedback.blocks is not None:
        out.append(f"blocks {', '.join(map(str, feedback.blocks))}")
    return out


def pass_choices(count: int) -> list[str]:
    return [f"pass {t}" for t in range(1, count + 1)]


def parse_pass(value: Optional[str], count: int) -> int:
    """Pass selector value ("pass 2") → 1-based pass, the last one if beyond `count`; None → 1."""
    if not value:
        return 1
    try:
        t = int(str(value).split()[-1])
    except ValueError:
        raise gr.Error(f"unknown pass {value!r}; pick “pass N”") from None
    return max(1, min(count, t))
