"""Progress output: a tqdm bar on a terminal, whole lines in a log (no carriage returns)."""

from __future__ import annotations

import io

from fastap._progress import LineProgress, progress_bar


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_log_gets_one_line_per_stage_without_carriage_returns():
    log = io.StringIO()
    with progress_bar(120, "1/3 supervised (CE)", file=log, unit="step") as bar:
        assert isinstance(bar, LineProgress)
        for _ in range(120):
            bar.update()
            bar.set_postfix(loss="0.859")
    with progress_bar(3 << 20, "archive.tgz", file=log, unit="B", unit_scale=True,
                      initial=1 << 20) as bar:
        bar.update(2 << 20)
    text = log.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("1/3 supervised (CE): 120/120 step in ")
    assert lines[0].endswith(", loss=0.859")
    assert lines[1].startswith("archive.tgz: 3.0 MiB of 3.0 MiB in ")


def test_a_long_stage_writes_a_line_per_interval():
    log = io.StringIO()
    bar = LineProgress(10, "extract", log, unit="img", interval=0.0)
    for _ in range(3):
        bar.update()
    bar.close()
    bar.close()  # a second close writes nothing
    lines = log.getvalue().splitlines()
    assert [line.split(" in ")[0] for line in lines] == [
        "extract: 1/10 img", "extract: 2/10 img", "extract: 3/10 img", "extract: 3/10 img"]


def test_a_terminal_gets_a_tqdm_bar_and_disabled_shows_nothing():
    tty = _Terminal()
    with progress_bar(5, "stage", file=tty) as bar:
        for _ in range(5):
            bar.update()
    assert "\r" in tty.getvalue() and "stage" in tty.getvalue()
    quiet = io.StringIO()
    with progress_bar(5, "stage", file=quiet, enabled=False) as bar:
        bar.update(5)
    assert quiet.getvalue() == ""
