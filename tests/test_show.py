"""``dlmdistill generate --show``: the pure state renderer, in-place redrawing on a (modelled)
terminal, and the plain output through the command line on a tiny model."""

import json
import re

import pytest

from dlmdistill.cli import main
from dlmdistill.show import PLACEHOLDER as P
from dlmdistill.show import printable, render_state, replay, show_batch
from tests.conftest import tiny_model

M, EOS = 99, 2
LETTERS = "abcdefghij"


def bracket(ids):
    """A stand-in tokenizer decode that shows which tokens were decoded together."""
    return "<" + "".join(LETTERS[i] for i in ids) + ">"


def test_render_state_masks_are_placeholders_and_runs_decode_together():
    assert render_state([5, M, 6, 7, M], M, bracket) == "<f>" + P + "<gh>" + P
    assert render_state([M, M, M], M, bracket) == P * 3
    assert render_state([M, M], M, bracket, placeholder="_") == "__"
    assert render_state([], M, bracket) == ""


def test_render_state_stops_at_the_first_committed_eos():
    # the final completion is cut at the first EOS (decode_responses), so the replay is too
    assert render_state([5, M, EOS, 6, M], M, bracket, eos_id=EOS) == "<f>" + P
    assert render_state([5, M, EOS, 6, M], M, bracket) == "<f>" + P + "<cg>" + P


def test_model_output_cannot_send_escape_sequences():
    assert printable("a\x1b[2Jb\rc\td\ne") == "a\ufffd[2Jb\ufffdc    d\ne"
    assert render_state([0], M, lambda ids: "\x1b[H") == "\ufffd[H"


class Screen:
    """A minimal model of a VT100 screen for the sequences show.py writes: text with line wrapping at
    ``width``, LF (as a tty does: new line, column 0), CR, ESC[nA (cursor up), ESC[J (erase below), ESC[..m."""

    def __init__(self, width):
        self.w, self.rows, self.r, self.c = width, [[]], 0, 0

    def _row(self):
        while len(self.rows) <= self.r:
            self.rows.append([])
        return self.rows[self.r]

    def feed(self, data):
        for tok in re.findall(r"\x1b\[[0-9;]*[A-Za-z]|.|\n", data, flags=re.S):
            if tok == "\n":
                self.r, self.c = self.r + 1, 0
            elif tok == "\r":
                self.c = 0
            elif tok.startswith("\x1b["):
                cmd, n = tok[-1], tok[2:-1]
                if cmd == "A":
                    self.r, self.c = max(0, self.r - int(n or 1)), min(self.c, self.w - 1)
                elif cmd == "J":
                    del self._row()[self.c:]
                    del self.rows[self.r + 1:]
            else:
                if self.c == self.w:  # pending wrap
                    self.r, self.c = self.r + 1, 0
                row = self._row()
                row[self.c:self.c + 1] = [tok] if self.c < len(row) else [" "] * (self.c - len(row)) + [tok]
                self.c += 1

    def text(self):
        return ["".join(r) for r in self.rows]


class Stream:
    def __init__(self, tty):
        self.data, self._tty = [], tty

    def write(self, s):
        self.data.append(s)

    def flush(self):
        pass

    def isatty(self):
        return self._tty


def test_terminal_replay_redraws_in_place_and_leaves_only_the_final_text(monkeypatch):
    monkeypatch.setenv("COLUMNS", "6")
    monkeypatch.setenv("LINES", "24")
    # 8 positions, one committed per step; the final text wraps (7 > 6 columns) and has a newline
    states = [[M] * 8, [0] + [M] * 7, [0, 1] + [M] * 6, [0, 1, 2, 3, 4, 5, 6] + [M]]
    stream = Stream(tty=True)
    replay(states, "abcdefg\nh", M, lambda ids: "".join(LETTERS[i] for i in ids), stream=stream, delay=0)
    out = "".join(stream.data)
    assert "\x1b[" in out and P * 6 in out  # the masked states were drawn...
    screen = Screen(6)
    screen.feed(out)
    # ...and overwritten: [step 4/4: final] wraps to 3 rows of 6, the text to 2 rows + 1
    assert screen.text() == ["[step ", "4/4: f", "inal]", "abcdef", "g", "h"]
    assert (screen.r, screen.c) == (6, 0)  # the cursor ends on the row after the text


def test_replay_falls_back_to_plain_lines_when_a_frame_is_taller_than_the_terminal(monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    monkeypatch.setenv("LINES", "3")
    stream = Stream(tty=True)
    replay([[M, M], [0, M]], "a\nb\nc", M, lambda ids: "a", stream=stream, delay=0)
    assert "".join(stream.data) == f"[step 0/2]\n{P}{P}\n[step 1/2]\na{P}\n[step 2/2: final]\na\nb\nc\n"


def test_show_batch_plain_every_nth_state():
    stream = Stream(tty=False)
    states = [[[M, M, M], [M, M, M]], [[0, M, M], [M, M, 1]], [[0, 1, M], [M, 2, 1]]]  # [S=3, B=2, G=3]
    show_batch(states, ["abc", "cba"], ["p1", "p2"], M, lambda ids: "".join(LETTERS[i] for i in ids),
               stream=stream, every=2)
    assert "".join(stream.data) == (
        f"### prompt\np1\n### completion\n[step 0/3]\n{P * 3}\n[step 2/3]\nab{P}\n[step 3/3: final]\nabc\n\n"
        f"### prompt\np2\n### completion\n[step 0/3]\n{P * 3}\n[step 2/3]\n{P}cb\n[step 3/3: final]\ncba\n\n")


@pytest.fixture
def model_dir(tokenizer, tmp_path):
    model, tok = tiny_model(tokenizer)
    path = tmp_path / "tiny"
    model.save_pretrained(str(path), tok)
    return path


def test_generate_show_through_the_cli(model_dir, tmp_path, capsys):
    prompt = "numbers: 1 2 3\n"
    common = ["generate", "--model", str(model_dir), "--prompt", prompt, "--gen_length", "16", "--steps", "8",
              "--seed", "3", "--device", "cpu"]
    plain = tmp_path / "plain.jsonl"
    assert main([*common, "--output", str(plain)]) == 0
    completion = json.loads(plain.read_text())["completion"]
    capsys.readouterr()
    assert main([*common, "--show", "--show_every", "2"]) == 0
    out = capsys.readouterr().out
    assert "\x1b[" not in out  # not a terminal: plain lines only
    assert out.startswith(f"### prompt\n{prompt}\n### completion\n[step 0/8]\n{P * 16}\n[step 2/8]\n")
    parts = re.split(r"\[step (\d+)/8(?:: final)?\]\n", out.split("### completion\n", 1)[1])
    shown = dict(zip(map(int, parts[1::2]), parts[2::2]))
    assert list(shown) == [0, 2, 4, 6, 8]
    # the final text is the completion of a run without --show (same seed): the replay changes nothing
    assert shown[8] == completion + "\n\n"
    # LLaDA's schedule commits 16/8 = 2 tokens per step, so after k steps at most 16 - 2k are masked
    for k in (0, 2, 4, 6):
        assert shown[k].count(P) <= 16 - 2 * k
    assert shown[0].count(P) == 16


def test_generate_show_options_are_checked(model_dir, capsys):
    assert main(["generate", "--model", str(model_dir), "--prompt", "a", "--gen_length", "8", "--steps", "4",
                 "--show", "--show_delay", "-1"]) == 2
    assert "show_delay" in capsys.readouterr().err
