"""nmt-translate piped, from files, and its attention views."""

import subprocess

import torch

from conftest import script_path
from nmt.translate import attention_text


def test_piped_gives_one_line_per_input_line(debug_run):
    lines = ["Ein Mann fährt Fahrrad.", "", "Zwei Hunde spielen im Schnee.", " ".join(["Haus"] * 300),
             "\x01\x02 Steuerzeichen \x7f", "Ein Kind\u2028mit Ball.", "Ünïcödé ☃ 字"]
    data = ("\n".join(lines) + "\n").encode("utf-8") + b"bin\xff\xfe\xfd\n"
    out = subprocess.run([script_path("nmt-translate"), f"run={debug_run}", "translate.beam_size=2"],
                         input=data, capture_output=True, check=True)
    outputs = out.stdout.decode("utf-8").split("\n")
    assert outputs[-1] == ""  # the output ends with a newline
    outputs = outputs[:-1]
    assert len(outputs) == len(lines) + 1
    assert outputs[1] == ""  # an empty line stays empty
    assert all(outputs[i] for i in (0, 2, 3))
    assert b"Traceback" not in out.stderr
    assert b"translating its first" in out.stderr  # the 300-word line was cut, with a warning


def test_n_best_gives_n_lines_per_input_line_best_first(debug_run):
    data = "Ein Mann fährt Fahrrad.\n\nZwei Hunde spielen im Schnee.\n".encode("utf-8")

    def translate(*overrides):
        out = subprocess.run([script_path("nmt-translate"), f"run={debug_run}", "translate.beam_size=3", *overrides],
                             input=data, capture_output=True, check=True)
        return out.stdout.decode("utf-8").split("\n")[:-1]

    best = translate()
    nbest = translate("translate.n_best=3")
    assert len(best) == 3 and len(nbest) == 9
    assert [nbest[0], nbest[3], nbest[6]] == best  # each group starts with the one-best translation
    assert nbest[3:6] == ["", "", ""]  # an empty line gives n empty lines


def test_file_mode_matches_piped_and_writes_heatmaps(debug_run, tmp_path):
    src = tmp_path / "in.txt"
    src.write_text("Ein Mann fährt Fahrrad.\n\nZwei Hunde spielen.\n", encoding="utf-8")
    out, heatmaps = tmp_path / "out.txt", tmp_path / "attn"
    subprocess.run([script_path("nmt-translate"), f"run={debug_run}", f"translate.input={src}",
                    f"translate.output={out}", f"translate.attention_dir={heatmaps}"], check=True, capture_output=True)
    piped = subprocess.run([script_path("nmt-translate"), f"run={debug_run}"], input=src.read_bytes(),
                           capture_output=True, check=True).stdout.decode()
    assert out.read_text(encoding="utf-8") == piped
    pngs = sorted(p.name for p in heatmaps.glob("*.png"))
    assert pngs == ["00001.png", "00003.png"]  # none for the empty line
    assert all((heatmaps / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for name in pngs)


def test_attention_text_labels_rows_and_columns():
    weights = torch.tensor([[0.9, 0.1], [0.0, 1.0]])
    text = attention_text(["▁Hund", "</s>"], ["▁dog", "</s>"], weights).splitlines()
    assert "▁Hund" in text[0] and "</s>" in text[0]
    assert text[1].startswith("▁dog") and text[1].split()[1:] == ["90", "10"]
    assert text[2].split()[1:] == [".", "100"]


def test_missing_input_file_is_a_clean_error(debug_run, tmp_path):
    for given, what in (("nope.txt", "does not exist"), (".", "is a directory, not a file")):
        out = subprocess.run([script_path("nmt-translate"), f"run={debug_run}", f"translate.input={given}"],
                             capture_output=True, text=True, cwd=tmp_path)
        assert out.returncode == 2 and "Traceback" not in out.stderr
        assert out.stderr.startswith(f"nmt: error: translate.input={given} {what}. Check the path (relative paths "
                                     f"start from {tmp_path}), or leave translate.input out")


def _read_until(fd, marker: bytes, timeout: float = 60.0) -> bytes:
    import os
    import select
    import time

    seen, deadline = b"", time.monotonic() + timeout
    while marker not in seen:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            raise AssertionError(f"timed out waiting for {marker!r}; got {seen[-500:]!r}")
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        seen += chunk
    return seen


def test_interactive_prompt_in_a_terminal(debug_run):
    import os
    import pty

    sentence = "Zwei Hunde spielen im Schnee."
    greedy = "translate.beam_size=1"  # the debug model's beam search tends to pick the lone piece "▁": an empty line
    piped = subprocess.run([script_path("nmt-translate"), f"run={debug_run}", greedy], input=sentence + "\n",
                           capture_output=True, text=True, check=True).stdout.splitlines()
    assert len(piped) == 1 and piped[0].strip()
    primary, secondary = pty.openpty()
    env = {**os.environ, "HOME": str(debug_run), "TERM": "xterm"}
    child = subprocess.Popen([script_path("nmt-translate"), f"run={debug_run}", greedy], stdin=secondary, stdout=secondary,
                             stderr=secondary, env=env, close_fds=True)
    os.close(secondary)
    try:
        prompt = b"\n> "  # at the start of a line: a "> " inside other output is not the prompt
        assert b"Type :help" in _read_until(primary, prompt)
        os.write(primary, f"{sentence}\n".encode())
        reply = _read_until(primary, prompt).decode().replace("\r", "").splitlines()
        assert reply == [sentence, piped[0], "> "]  # the terminal's echo, the translation, the next prompt
        os.write(primary, b":attn\n")
        assert b"attention display on" in _read_until(primary, prompt)
        os.write(primary, "Ein Hund.\n".encode())
        shown = _read_until(primary, prompt).decode()
        assert "</s>" in shown and "▁" in shown  # the labelled matrix
        os.write(primary, b"\n")  # empty lines are ignored
        _read_until(primary, prompt)
        os.write(primary, b"\x04")  # Ctrl-D
        # read what it prints until it closes the terminal: a full terminal buffer would block its exit.
        # A Ctrl-D that arrives while the prompt is still switching the terminal's mode can be lost, as
        # at a real terminal; a user then presses it again.
        try:
            _read_until(primary, b"\x00never printed\x00", timeout=10)
        except AssertionError:
            os.write(primary, b"\x04")
            _read_until(primary, b"\x00never printed\x00", timeout=30)
        assert child.wait(timeout=30) == 0
    finally:
        if child.poll() is None:
            child.kill()
        os.close(primary)


def test_beam_command_keeps_n_best_within_the_new_beam(capsys):
    from types import SimpleNamespace

    from nmt.config import TranslateOptions
    from nmt.translate import _command

    session = SimpleNamespace(options=TranslateOptions(beam_size=5, n_best=3), show_attention=False)
    assert _command(session, ":beam 2")
    assert (session.options.beam_size, session.options.n_best) == (2, 2)
    assert "beam size 2, 2 best shown" in capsys.readouterr().out
    assert _command(session, ":beam 8")
    assert (session.options.beam_size, session.options.n_best) == (8, 2)  # n_best is not raised again
