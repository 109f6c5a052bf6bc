"""The CLI's one progress adapter: a job's ``progress(fraction, message)`` drawn as a tqdm bar."""
from __future__ import annotations

import contextlib


def tqdm_progress(desc: str, quiet: bool):
    """``(bar, progress)``: a 0–100 % tqdm bar (disabled when ``quiet``) and the callback that
    moves it; close the bar when the job ends."""
    from tqdm import tqdm
    bar = tqdm(total=100, desc=desc, unit="%", disable=quiet, bar_format="{l_bar}{bar}| {n:.0f}% {postfix}")

    def progress(frac, msg=""):
        bar.n = 100 * frac
        bar.set_postfix_str(msg[:40])
        bar.refresh()
    return bar, progress


@contextlib.contextmanager
def progress_bar(desc: str, quiet: bool):
    """``with progress_bar(desc, quiet) as progress:`` — :func:`tqdm_progress`'s callback, the bar
    closed when the block ends (also on an error)."""
    bar, progress = tqdm_progress(desc, quiet)
    try:
        yield progress
    finally:
        bar.close()


__all__ = ["tqdm_progress", "progress_bar"]
