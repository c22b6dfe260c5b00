"""Whether the host's Ray node is up is asked of Ray's GCS, not only of the process table:
one real Ray head with token authentication."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agents.raynode import GcsProbe, RayNode, ensure_token, token_env
from scheduler.domain.labels import NODE_LABEL
from tests.conftest import free_port

pytestmark = [
    pytest.mark.ray,
    pytest.mark.skipif(
        os.environ.get("ANDROMEDA_TEST_ISOLATED") != "ray-probe",
        reason="run in a pytest process of its own (make test does): the in-process GCS "
        "client leaves Ray state behind that breaks later clusters of the same process",
    ),
]


@pytest.fixture(scope="module")
def head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayNode]:
    root = tmp_path_factory.mktemp("probe")
    token = ensure_token(root / "ray-token")
    saved = {k: os.environ.get(k) for k in token_env(token)}
    os.environ.update(token_env(token))  # the probe talks to Ray from this process
    ray_tmp = Path(tempfile.mkdtemp(prefix="andr-probe-"))
    node = RayNode(
        address=None,
        token_file=token,
        labels={NODE_LABEL: "probe-1"},
        head_port=free_port(),
        num_cpus=1,
        temp_dir=ray_tmp,
        log_path=root / "ray.log",
        pid_file=root / "ray.pid",
    )
    node.start()
    try:
        yield node
    finally:
        node.stop(grace_s=10)
        shutil.rmtree(ray_tmp, ignore_errors=True)
        for key, value in saved.items():  # later tests' clusters have tokens of their own
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _eventually(check, timeout_s: float = 60):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while (result := check()) is not True and time.monotonic() < deadline:
        time.sleep(0.5)
    return result


def test_the_gcs_says_which_node_is_alive(head: RayNode) -> None:
    assert _eventually(GcsProbe(head.gcs_address, "probe-1").check) is True
    assert GcsProbe(head.gcs_address, "no-such-node").check() is False


def test_a_running_process_the_gcs_does_not_know_as_alive_is_down(
    head: RayNode, tmp_path: Path
) -> None:
    """The process table alone would call this node up: its ``ray start`` runs. Ray has
    no live node of that name, so after ``dead_after`` probes it is down."""
    assert head.pid_file is not None
    (tmp_path / "ray.pid").write_text(head.pid_file.read_text())
    ghost = RayNode(
        address=None,
        token_file=head.token_file,
        labels={NODE_LABEL: "ghost"},
        head_port=head.head_port,
        pid_file=tmp_path / "ray.pid",
        probe_interval_s=0.2,
        dead_after=2,
    )
    assert ghost.adopt() and ghost.process_alive()
    deadline = time.monotonic() + 30
    while ghost.alive():
        assert time.monotonic() < deadline, "the probe never reported the node missing"
        time.sleep(0.1)
    assert ghost.process_alive()
    assert "the site's GCS has not seen it alive in 2 checks" in ghost.down_reason()
    ghost._unwatch()  # leave the real head alone


def test_a_gcs_that_stops_answering_says_nothing_either_way(head: RayNode) -> None:
    """No verdict (None) rather than "dead": a worker's head may be restarting, and
    restarting the worker would not help. (Last in this module: it stops the head.)"""
    probe = GcsProbe(head.gcs_address, "probe-1", timeout_s=2)
    assert _eventually(probe.check) is True
    head.stop(grace_s=10)
    assert probe.check() is None
