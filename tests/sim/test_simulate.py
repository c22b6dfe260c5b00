"""``andromeda simulate`` end to end through the CLI: the packaged Philly trace, a trace in
the generic format with priorities and GPU-model constraints on a mixed fleet, every figure
in the JSON output, and readable errors for bad traces and fleets."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from click.testing import CliRunner

from scheduler.cli.main import cli
from scheduler.sim import replay
from scheduler.sim.fleet import FleetError, fleet_from, load_fleet
from scheduler.sim.generic import TraceError, load_generic

ROOT = Path(__file__).resolve().parents[2]
MIXED = ROOT / "examples" / "fleets" / "mixed.yaml"


def simulate(*args: str) -> dict:  # type: ignore[type-arg]
    result = CliRunner().invoke(cli, ["simulate", "--quiet", "--output", "json", *args])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def unseen_trace(path: Path, n: int = 120, seed: int = 11) -> Path:
    """A trace nobody tuned for: random priorities, GPU models, checkpoints, teams."""
    rng = random.Random(seed)
    lines = ["job_id,submit_s,duration_s,gpus,priority,gpu_model,preemptible,team,checkpoint_s"]
    t = 5_000
    for i in range(n):
        t += rng.randint(0, 1200)
        gpus = rng.choice([1, 2, 4, 8, 16])
        model = rng.choice(["", "H100", "H200"]) if gpus <= 16 else ""
        prio = rng.choice(["critical", "high", "normal", "low", "7", "250"])
        ck = rng.choice(["", "900"])
        lines.append(
            f"{100 + i},{t},{rng.randint(30, 4 * 3600)},{gpus},{prio},{model},"
            f"{rng.choice(['', 'yes', 'no'])},team-{rng.randint(1, 3)},{ck}"
        )
    path.write_text("\n".join(lines) + "\n")
    return path


def test_an_unseen_generic_trace_replays_with_every_figure(tmp_path: Path) -> None:
    trace = unseen_trace(tmp_path / "unseen.csv")
    out = simulate("--trace", str(trace), "--fleet", str(MIXED))
    assert out["jobs"] == 120 and out["unfinished"] == 0
    assert set(out["classes"]) == {"critical", "high", "normal", "low"}
    for figures in out["classes"].values():
        assert set(figures["wait_s"]) == {"mean", "p50", "p99"}
        assert figures["jct_s"]["p99"] >= figures["jct_s"]["p50"] > 0
    assert 0 < out["useful_utilisation"] <= out["utilisation"] <= 1
    assert set(out["providers"]) == {"orion", "vega", "lyra"}
    assert out["providers"]["orion"]["fulfilment"] is not None
    assert out["providers"]["lyra"]["committed_gpu_hours"] is None
    delivered = sum(p["gpu_hours"] for p in out["providers"].values())
    assert delivered == pytest.approx(sum(out["levels_gpu_hours"].values()), abs=0.5)
    assert out["gpu_hours_lost"] >= 0 and out["preemptions"] >= 0


def test_gpu_model_constraints_hold_in_the_replay(tmp_path: Path) -> None:
    jobs = load_generic(unseen_trace(tmp_path / "t.csv"))
    fleet = load_fleet(MIXED)
    by_node = {n.node_id: n for n in fleet.nodes}
    result = replay(
        jobs, fleet.nodes, _recording_policy(by_node, jobs), commitments=fleet.commitments
    )
    assert not result.unfinished


def _recording_policy(by_node, jobs):  # type: ignore[no-untyped-def]
    """Ours, with every placement checked against the job's model constraint."""
    from scheduler.policy import schedule

    wanted = {j.job_id: j.gpu_model for j in jobs}

    def policy(queue, nodes, running, *, now_s, providers=()):  # type: ignore[no-untyped-def]
        decision = schedule(queue, nodes, running, now_s=now_s, providers=providers)
        for p in decision.placements:
            model = wanted[p.job_id]
            for w in p.workers:
                assert model is None or by_node[w.node_id].gpu_model.startswith(model)
        return decision

    return policy


@pytest.mark.parametrize("policy", ["andromeda", "fifo", "first-fit", "kueue-like"])
def test_every_policy_replays_the_packaged_philly_trace(policy: str) -> None:
    out = simulate("--limit", "300", "--policy", policy, "--checkpoint-every", "30m")
    assert out["policy"] == policy and out["jobs"] == 300 and out["unfinished"] == 0
    if policy in ("fifo", "first-fit"):
        assert out["preemptions"] == 0


def test_the_table_output_reads_well() -> None:
    result = CliRunner().invoke(cli, ["simulate", "--quiet", "--limit", "200"])
    assert result.exit_code == 0, result.output
    assert "policy andromeda: 200 jobs on 512 GPUs" in result.output
    assert "fulfilment gap" in result.output


@pytest.mark.parametrize(
    ("csv", "message"),
    [
        ("submit_s,duration_s\n1,2\n", "missing column gpus"),
        ("submit_s,duration_s,gpus,colour\n1,2,3,red\n", "unknown column colour"),
        ("submit_s,duration_s,gpus\n1,2,eight\n", "line 2, gpus: a whole number, not 'eight'"),
        ("submit_s,duration_s,gpus,workers\n1,2,8,3\n", "8 GPUs do not divide into 3"),
        ("submit_s,duration_s,gpus,priority\n1,2,8,urgent\n", "priority: critical, high"),
        ("submit_s,duration_s,gpus,preemptible\n1,2,8,maybe\n", "preemptible: true or false"),
        ("submit_s,duration_s,gpus\n", "no jobs"),
    ],
)
def test_bad_traces_are_refused_with_the_line_and_column(
    tmp_path: Path, csv: str, message: str
) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(csv)
    with pytest.raises(TraceError, match=message.replace("(", r"\(")):
        load_generic(path)
    result = CliRunner().invoke(
        cli, ["simulate", "--quiet", "--format", "generic", "--trace", str(path)]
    )
    assert result.exit_code == 1 and message.split(" (")[0] in result.output


@pytest.mark.parametrize(
    ("fleet", "message"),
    [
        ({}, "a list of providers"),
        (
            {"providers": [{"name": "a", "level": "gold", "nodes": []}]},
            "providers[0].level: one of",
        ),
        ({"providers": [{"name": "a", "level": "spot"}]}, "providers[0].nodes: a list"),
        (
            {"providers": [{"name": "a", "level": "spot", "nodes": [{"count": 0, "gpus": 8}]}]},
            "providers[0].nodes[0].count: must be a whole number >= 1",
        ),
        (
            {"providers": [{"name": "A!", "level": "spot", "nodes": [{"count": 1, "gpus": 8}]}]},
            "providers[0].name",
        ),
    ],
)
def test_bad_fleets_say_where(fleet: dict, message: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(FleetError, match=message.replace("[", r"\[").replace("]", r"\]")):
        fleet_from(fleet)


def test_fleet_sites_and_memory_come_from_the_file() -> None:
    fleet = load_fleet(MIXED)
    vega = [n for n in fleet.nodes if n.name.startswith("vega")]
    assert {n.site_name for n in vega} == {"vega-0", "vega-1"}
    h200 = [n for n in fleet.nodes if n.gpu_model == "H200-141GB"]
    assert len(h200) == 2 and h200[0].gpu_memory_bytes == 141 * 10**9
    assert fleet.commitments[1] == 20000 * 3600
