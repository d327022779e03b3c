"""Progress lines for logs (no terminal): done/total, rate, elapsed and ETA computed from a fake clock."""

from __future__ import annotations

import io

from sae_pipeline.progress import LogProgress, progress


def test_log_lines_at_the_interval_with_rate_and_eta():
    now = [100.0]
    out = io.StringIO()
    bar = LogProgress(1000, "harvest", initial=200, every_s=30, stream=out, clock=lambda: now[0])
    now[0] = 110.0
    bar.update(100)  # 10 s: before the interval, nothing printed
    assert out.getvalue() == ""
    now[0] = 140.0
    bar.update(300)  # 40 s, 400 done since the start: 10 tok/s, 400 left -> 40 s
    assert out.getvalue() == "harvest: 600/1,000 tok (60.0%) | 10 tok/s | elapsed 0m40s | ETA 0m40s\n"
    now[0] = 3800.0
    bar.update(400)
    bar.close()  # the interval passed again: that line is already the final one, close adds none
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and lines[-1].startswith("harvest: 1,000/1,000 tok (100.0%)")
    assert "elapsed 1h01m40s | ETA 0m00s" in lines[-1]


def test_the_final_line_is_printed_once():
    now = [0.0]
    out = io.StringIO()
    bar = LogProgress(10, "eval", every_s=5, stream=out, clock=lambda: now[0])
    now[0] = 6.0
    bar.update(10)  # completes exactly when the interval is due
    bar.close()
    assert len(out.getvalue().splitlines()) == 1


def test_an_unfinished_bar_leaves_no_line_on_close():
    out = io.StringIO()
    bar = LogProgress(10, "eval", stream=out, clock=lambda: 0.0)
    bar.update(3)
    bar.close()  # stopped by an error: its message, not a progress line, is the last word
    assert out.getvalue() == ""


def test_not_a_terminal_gives_log_lines(capsys):
    bar = progress(10, "eval")  # pytest captures stderr: not a terminal
    assert isinstance(bar, LogProgress)
    bar.update(10)
    bar.close()
    assert "eval: 10/10 tok (100.0%)" in capsys.readouterr().err
