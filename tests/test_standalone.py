"""The repository stands on its own: nothing a test, the demo, the simulator or a benchmark
needs lives outside it, so a clone at any path, with nothing beside it, passes."""

from __future__ import annotations

import subprocess

from scheduler.sim.philly import PACKAGED_TRACE, default_trace_path
from tests.conftest import OUTSIDE_READS, REPO, _outside


def test_no_tracked_file_points_outside_the_repository() -> None:
    pattern = r"\.\./shared|shared/(traces|fixtures)|parents\[[0-9]\]\.parent"
    found = subprocess.run(
        ["git", "grep", "-nE", pattern, "--", ".", ":!*.md", ":!tests/test_standalone.py"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert found.returncode == 1, f"files point outside the repository:\n{found.stdout}"


def test_the_data_the_tests_and_the_simulator_read_is_inside_the_repository() -> None:
    assert default_trace_path() == PACKAGED_TRACE
    assert PACKAGED_TRACE.is_relative_to(REPO) and PACKAGED_TRACE.is_file()
    assert (REPO / "tests/fixtures/nvml/h100-80gb-hbm3/nvml_snapshot.json").is_file()
    assert (REPO / "tests/fixtures/nvml/h200-141gb/nvml_snapshot.json").is_file()


def test_the_guard_recognises_a_read_beside_the_clone() -> None:
    assert _outside(str(REPO.parent / "shared" / "traces" / "philly.csv"))
    assert not _outside(str(REPO / "tests" / "conftest.py"))


def test_no_test_so_far_read_a_file_beside_the_repository() -> None:
    """The whole session is checked again when it ends (``pytest_sessionfinish``)."""
    assert not OUTSIDE_READS, f"read outside the repository: {sorted(set(OUTSIDE_READS))}"
