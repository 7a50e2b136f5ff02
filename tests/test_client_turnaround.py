"""The client-turnaround measurement's arithmetic (validation/client/aiperf_turnaround.py): which
completion freed each request's slot, on a server log written by hand."""

from __future__ import annotations

from pathlib import Path

import pytest

from validation.client.aiperf_turnaround import turnarounds_ms


def test_each_send_is_matched_to_the_completion_that_freed_its_slot(tmp_path: Path) -> None:
    # 2 clients: warm-up sends 0, 1 (at once), 2, 3; profiling sends 4, 5 (at once, after every warm-up
    # response), 6, 7. arrival, end per request (s), in the order the server logged their ends.
    log = tmp_path / "server.csv"
    log.write_text("\n".join(f"{a},{e}" for a, e in [
        (0.000, 1.000), (0.000, 1.500),  # warm-up, sent together: no slot freed before them
        (1.010, 2.000), (1.520, 2.600),  # freed by the ends at 1.000 and 1.500
        (3.000, 4.000), (3.000, 4.200),  # profiling starts: sent together, skipped
        (4.030, 5.000), (4.205, 5.300)]))  # freed by 4.000 and 4.200
    assert turnarounds_ms(log, 2) == pytest.approx([10.0, 20.0, 30.0, 5.0])
