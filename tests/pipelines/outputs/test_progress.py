"""The inference progress line (no Ray): done of total, the rate and the time left once any are done."""

from __future__ import annotations

from pipelines.outputs.progress import progress_message


def test_progress_line_says_done_of_total_rate_and_time_left() -> None:
    assert progress_message("inference of run r", 0, 10_000, 3.0) == "inference of run r: 0 of 10,000 images (0%)"
    assert progress_message("inference of run r", 4_000, 10_000, 2.0) == (
        "inference of run r: 4,000 of 10,000 images (40%), 2,000 images/s, about 3 s left")
    assert progress_message("x", 1_000, 1_000_000, 10.0).endswith("100 images/s, about 2.8 h left")
    assert progress_message("x", 50_000, 100_000, 100.0).endswith("500 images/s, about 2 min left")
