"""``dlmdistill generate --show``: watch a response fill in, step by step, in the terminal.

The sampler records the response before every denoising step (``generate(..., return_trajectory=True)``,
``Trajectory.states`` [S, B, G]); this module replays those states, so what is shown is exactly what
the sampler did. A still-masked position is drawn as a placeholder glyph (``░``); committed tokens
appear in place as the steps go by.

* On a terminal (``stream.isatty()``) every state is drawn over the previous one (ANSI cursor
  movement), ``delay`` seconds apart, and the final completion stays on screen.
* Elsewhere (a pipe, a log file) every ``every``-th state is printed as plain lines, then the final
  completion; nothing is overwritten and there is no delay.

``render_state`` (one state -> text) is a pure function; ``replay`` and ``show_batch`` do the output.
"""

from __future__ import annotations

import math
import shutil
import sys
import time
import unicodedata
from typing import Callable, Sequence, TextIO

PLACEHOLDER = "░"


def render_state(tokens: Sequence[int], mask_id: int, decode: Callable[[list[int]], str], *,
                 eos_id: int | None = None, placeholder: str = PLACEHOLDER) -> str:
    """The text of one response state: each masked position (``mask_id``) is one ``placeholder``;
    each run of consecutive committed tokens is decoded together (so multi-token characters and
    word pieces come out as the tokenizer joins them). With ``eos_id``, nothing after the first
    committed EOS is shown, as the final completion is cut there."""
    parts: list[str] = []
    run: list[int] = []
    for t in tokens:
        if eos_id is not None and t == eos_id:
            break
        if t == mask_id:
            if run:
                parts.append(decode(run))
                run = []
            parts.append(placeholder)
        else:
            run.append(t)
    if run:
        parts.append(decode(run))
    return printable("".join(parts))


def printable(text: str) -> str:
    """``text`` safe to write to a terminal: tabs become 4 spaces and other control characters
    (escape sequences, carriage returns) are shown as ``�``, so model output cannot move the cursor."""
    text = text.replace("\r\n", "\n").replace("\t", "    ")
    return "".join(c if c == "\n" or unicodedata.category(c) not in ("Cc", "Cf") else "\ufffd" for c in text)


def _rows(text: str, width: int) -> int:
    """Terminal rows ``text`` occupies at ``width`` columns (wide East Asian characters count 2)."""
    rows = 0
    for line in text.split("\n"):
        cols = sum(2 if unicodedata.east_asian_width(c) in ("W", "F") else 1 for c in line)
        rows += max(1, math.ceil(cols / width))
    return rows


def auto_every(num_steps: int, snapshots: int = 8) -> int:
    """The stride that prints about ``snapshots`` intermediate states of ``num_steps``."""
    return max(1, math.ceil(num_steps / snapshots))


def replay(states: Sequence[Sequence[int]], final_text: str, mask_id: int, decode: Callable[[list[int]], str], *,
           eos_id: int | None = None, stream: TextIO | None = None, delay: float = 0.05, every: int = 0,
           tty: bool | None = None) -> None:
    """Show one response's states (``states[k]`` = the response after ``k`` of ``len(states)`` steps),
    then ``final_text``. ``tty`` (default: ``stream.isatty()``) selects in-place redrawing with ``delay``
    seconds between steps (unless a frame is taller than the terminal); otherwise every ``every``-th
    state (0 = about 8 of them) is printed as lines."""
    stream = stream or sys.stdout
    tty = stream.isatty() if tty is None else tty
    total = len(states)
    final = printable(final_text)
    if tty:
        size = shutil.get_terminal_size()
        width = max(1, size.columns)
        frames = [(f"step {k}/{total}", render_state(s, mask_id, decode, eos_id=eos_id)) for k, s in enumerate(states)]
        frames.append((f"step {total}/{total}: final", final))
        # a frame taller than the screen scrolls, and the cursor cannot go back over it: print plainly
        tty = all(_rows(f"[{label}]", width) + _rows(text, width) < size.lines for label, text in frames)
    if not tty:
        every = every or auto_every(total)
        for k in range(0, total, every):
            text = render_state(states[k], mask_id, decode, eos_id=eos_id)
            stream.write(f"[step {k}/{total}]\n{text}\n")
        stream.write(f"[step {total}/{total}: final]\n{final}\n")
        stream.flush()
        return
    shown = 0  # rows of the frame on screen; the cursor sits at the end of its last row
    for i, (label, text) in enumerate(frames):
        frame = f"\x1b[2m[{label}]\x1b[0m\n{text}"
        if shown > 1:
            stream.write(f"\x1b[{shown - 1}A")
        if shown:
            stream.write("\r\x1b[J")  # back to the frame's first row, erase it and everything below
        stream.write(frame)
        stream.flush()
        shown = _rows(f"[{label}]", width) + _rows(text, width)
        if i < len(frames) - 1 and delay > 0:
            time.sleep(delay)
    stream.write("\n")
    stream.flush()


def show_batch(states, final_texts: Sequence[str], prompts: Sequence[str], mask_id: int,
               decode: Callable[[list[int]], str], *, eos_id: int | None = None, stream: TextIO | None = None,
               delay: float = 0.05, every: int = 0, tty: bool | None = None) -> None:
    """Replay each response of a batch in turn under a ``### prompt`` / ``### completion`` header.
    ``states``: ``Trajectory.states`` [S, B, G] (a tensor or nested lists)."""
    stream = stream or sys.stdout
    rows = states.tolist() if hasattr(states, "tolist") else states
    for b, (prompt, text) in enumerate(zip(prompts, final_texts)):
        stream.write(f"### prompt\n{printable(prompt)}\n### completion\n")
        replay([step[b] for step in rows], text, mask_id, decode, eos_id=eos_id, stream=stream, delay=delay,
               every=every, tty=tty)
        stream.write("\n")
        stream.flush()
