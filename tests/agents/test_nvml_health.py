"""The NVML reader tells the whole truth about real GPUs.

Every test drives the real ``NvmlReader`` over ``RecordedNvml``, the replay of the H100 and
H200 recordings in tests/fixtures/nvml/; states the recordings lack (XIDs, ECC errors, a
lost GPU, MIG, a broken driver) are injected on top and change only what they change.
"""

from __future__ import annotations

import ctypes
import shutil
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from agents.gpu import NOT_SUPPORTED, GpuReaderError, NvmlReader, RecordedNvml
from agents.gpu.nvml import (
    COSTLY_EVERY,
    COSTLY_QUERIES,
    EVENT_BACKED_QUERIES,
    EVERY_SAMPLE_QUERIES,
    _handle_key,
    cuda_version_text,
    throttle_reason_names,
    xid_reason,
)
from agents.gpu.reader import GpuInfo, GpuProcess, GpuSample
from agents.gpu.recorded import (
    NVMLError_LibRmVersionMismatch,
    NVMLError_NoPermission,
    parse_query_key,
)
from scheduler.domain.enums import GpuHealth

FIXTURES = Path(__file__).parents[1] / "fixtures" / "nvml"


@dataclass(frozen=True)
class Recording:
    """What one recorded machine says, written out from its files."""

    path: Path
    info: GpuInfo
    first_sample: GpuSample
    load_pid: int
    load_process_bytes: int
    mig_profile: str


H100 = Recording(
    path=FIXTURES / "h100-80gb-hbm3",
    info=GpuInfo(
        index=0,
        uuid="GPU-a6b4194b-edf8-4900-8967-b91334a78cf0",
        name="NVIDIA H100 80GB HBM3",
        model="H100-80GB",
        memory_total_bytes=85_520_809_984,
        mig_enabled=False,
        compute_capability="9.0",
        pci_bus_id="00000000:00:06.0",
        serial="1752624012769",
        mig_instances=(),
    ),
    first_sample=GpuSample(
        uuid="GPU-a6b4194b-edf8-4900-8967-b91334a78cf0",
        health=GpuHealth.ok,
        utilization_pct=0,
        memory_used_bytes=503_316_480,
        temperature_c=37,
        power_mw=70_182,
        energy_mj=3_189_974,
        process_count=0,
        health_reasons=(),
        processes=(),
        throttle_reasons=("gpu_idle",),
        pcie_tx_kbps=1_472,  # nvml_snapshot.json
        pcie_rx_kbps=417,  # nvidia-smi-q.xml, rx_util
    ),
    load_pid=453,
    load_process_bytes=1_050_673_152,
    mig_profile="1g.10gb",
)
H200 = Recording(
    path=FIXTURES / "h200-141gb",
    info=GpuInfo(
        index=0,
        uuid="GPU-eb8e4270-fbe7-8d81-f593-5baf0d173e76",
        name="NVIDIA H200",
        model="H200-141GB",
        memory_total_bytes=150_754_820_096,
        mig_enabled=False,
        compute_capability="9.0",
        pci_bus_id="00000000:00:06.0",
        serial="1653724057548",
        mig_instances=(),
    ),
    first_sample=GpuSample(
        uuid="GPU-eb8e4270-fbe7-8d81-f593-5baf0d173e76",
        health=GpuHealth.ok,
        utilization_pct=0,
        memory_used_bytes=644_939_776,
        temperature_c=38,
        power_mw=108_330,
        energy_mj=2_476_218,
        process_count=0,
        health_reasons=(),
        processes=(),
        throttle_reasons=("gpu_idle",),
        pcie_tx_kbps=1_644,
        pcie_rx_kbps=423,
    ),
    load_pid=417,
    load_process_bytes=1_050_673_152,
    mig_profile="1g.18gb",
)
RECORDINGS = [pytest.param(H100, id="h100"), pytest.param(H200, id="h200")]
SERIES_LENGTH = 34  # samples in each nvml_timeseries.json


def open_reader(
    recording: Recording, *, gpus: int | None = None, costly_every: int = COSTLY_EVERY
) -> tuple[RecordedNvml, NvmlReader]:
    """A replayed host and a reader that has taken its inventory, as the agent does first
    (which also registers the XID event set)."""
    nvml = RecordedNvml(recording.path, gpus=gpus)
    reader = NvmlReader(nvml, costly_every=costly_every)
    reader.inventory()
    return nvml, reader


# -- inventory --------------------------------------------------------------------------------


@pytest.mark.parametrize("recording", RECORDINGS)
def test_inventory_reports_every_recorded_fact_of_the_gpu(recording: Recording) -> None:
    with NvmlReader(RecordedNvml(recording.path)) as reader:
        assert reader.inventory() == [recording.info]
        assert reader.driver_version() == "580.159.04"
        assert reader.cuda_driver_version() == "13.0"
        # the probe registered both event kinds on these machines ("event_registration": "ok")
        assert reader.watched_events() == {recording.info.uuid: ("xid", "double_bit_ecc")}


@pytest.mark.parametrize("recording", RECORDINGS)
def test_a_host_of_eight_copies_gives_each_gpu_its_own_identity(recording: Recording) -> None:
    _nvml, reader = open_reader(recording, gpus=8)
    inventory = reader.inventory()
    assert [g.index for g in inventory] == list(range(8))
    assert inventory[0] == recording.info  # the recorded GPU itself
    for field in ("uuid", "pci_bus_id", "serial"):
        assert len({getattr(g, field) for g in inventory}) == 8, field
    assert [g.pci_bus_id for g in inventory[:3]] == [
        "00000000:00:06.0",
        "00000000:00:07.0",
        "00000000:00:08.0",
    ]
    assert {(g.name, g.model, g.memory_total_bytes, g.compute_capability) for g in inventory} == {
        (recording.info.name, recording.info.model, recording.info.memory_total_bytes, "9.0")
    }
    assert [s.uuid for s in reader.sample()] == [g.uuid for g in inventory]


@pytest.mark.parametrize(
    ("nvml_value", "text"), [(13000, "13.0"), (12040, "12.4"), (11080, "11.8"), (12000, "12.0")]
)
def test_the_cuda_driver_version_reads_as_major_dot_minor(nvml_value: int, text: str) -> None:
    assert cuda_version_text(nvml_value) == text


def test_an_unknown_cuda_driver_version_is_none() -> None:
    nvml = RecordedNvml(H100.path, {"nvmlSystemGetCudaDriverVersion": NOT_SUPPORTED})
    assert NvmlReader(nvml).cuda_driver_version() is None


@pytest.mark.parametrize("recording", RECORDINGS)
def test_a_mig_enabled_gpu_is_reported_with_its_instances(recording: Recording) -> None:
    nvml = RecordedNvml(recording.path)
    nvml.enable_mig(0, instances=3)
    reader = NvmlReader(nvml)
    gpu = reader.inventory()[0]
    assert gpu.mig_enabled is True
    assert len(gpu.mig_instances) == 3
    assert len({i.uuid for i in gpu.mig_instances}) == 3
    assert all(i.uuid.startswith("MIG-") for i in gpu.mig_instances)
    slice_bytes = recording.info.memory_total_bytes // 8
    assert {(i.profile, i.memory_total_bytes) for i in gpu.mig_instances} == {
        (recording.mig_profile, slice_bytes)
    }
    # everything else about the GPU is as recorded
    assert replace(gpu, mig_enabled=False, mig_instances=()) == recording.info
    sample = reader.sample()[0]
    assert sample.utilization_pct is None  # NVML has no utilisation for a MIG-enabled GPU
    assert sample.health is GpuHealth.ok


@pytest.mark.parametrize(
    ("mig_mode", "expected"),
    [
        pytest.param([0, 0], False, id="recorded-off"),
        pytest.param(NOT_SUPPORTED, False, id="not-supported-means-off"),
        pytest.param(NVMLError_NoPermission, None, id="refused-means-unknown"),
    ],
)
def test_mig_mode_is_off_unknown_or_on_as_nvml_says(
    mig_mode: object, expected: bool | None
) -> None:
    nvml = RecordedNvml(H200.path, {"nvmlDeviceGetMigMode": mig_mode})
    gpu = NvmlReader(nvml).inventory()[0]
    assert gpu.mig_enabled is expected
    assert gpu.mig_instances == ()


# -- live metrics -----------------------------------------------------------------------------


@pytest.mark.parametrize("recording", RECORDINGS)
def test_the_first_sample_carries_every_recorded_value(recording: Recording) -> None:
    _nvml, reader = open_reader(recording)
    assert reader.sample() == [recording.first_sample]


@pytest.mark.parametrize("recording", RECORDINGS)
def test_throttle_reasons_follow_the_recording_idle_then_power_capped_then_free(
    recording: Recording,
) -> None:
    _nvml, reader = open_reader(recording)
    reasons = [reader.sample()[0].throttle_reasons for _ in range(SERIES_LENGTH)]
    changes = [r for i, r in enumerate(reasons) if i == 0 or r != reasons[i - 1]]
    # idle clocks, a moment unthrottled as the load starts, the power cap under the bf16
    # matmul load, unthrottled again once the load stops
    assert changes == [("gpu_idle",), (), ("sw_power_cap",), ()]


@pytest.mark.parametrize(
    ("mask", "names"),
    [
        (0x0, ()),
        (0x1, ("gpu_idle",)),
        (0x4, ("sw_power_cap",)),
        (0x5, ("gpu_idle", "sw_power_cap")),
        (0x2, ("applications_clocks_setting",)),
        (0x8 | 0x40, ("hw_slowdown", "hw_thermal_slowdown")),
        (0x10 | 0x20, ("sync_boost", "sw_thermal_slowdown")),
        (0x80, ("hw_power_brake_slowdown",)),
        (0x100, ("display_clock_setting",)),
        (0x800 | 0x4, ("sw_power_cap", "unknown_0x800")),
    ],
)
def test_the_throttle_bitmask_decodes_to_stable_names(mask: int, names: tuple[str, ...]) -> None:
    assert throttle_reason_names(mask) == names


@pytest.mark.parametrize("recording", RECORDINGS)
def test_compute_processes_are_listed_with_pid_and_memory(recording: Recording) -> None:
    _nvml, reader = open_reader(recording)
    samples = [reader.sample()[0] for _ in range(SERIES_LENGTH)]
    busy = [s for s in samples if s.utilization_pct == 99]
    assert busy
    assert busy[0].processes == (
        GpuProcess(pid=recording.load_pid, used_memory_bytes=recording.load_process_bytes),
    )
    assert {tuple(p.pid for p in s.processes or ()) for s in busy} == {(recording.load_pid,)}
    assert all(s.process_count == 1 for s in busy)
    assert samples[0].processes == ()


@pytest.mark.parametrize("hidden", [None, 2**64 - 1], ids=["none", "not-available"])
def test_process_memory_hidden_by_nvml_is_none_not_zero(hidden: int | None) -> None:
    nvml, reader = open_reader(H100)
    procs = [{"pid": 453, "usedGpuMemory": hidden}]
    nvml.override("nvmlDeviceGetComputeRunningProcesses", procs, index=0)
    sample = reader.sample()[0]
    assert sample.processes == (GpuProcess(pid=453, used_memory_bytes=None),)
    assert sample.process_count == 1


@pytest.mark.parametrize(
    ("query", "fields"),
    [
        ("nvmlDeviceGetUtilizationRates", ["utilization_pct"]),
        ("nvmlDeviceGetMemoryInfo", ["memory_used_bytes"]),
        ("nvmlDeviceGetTemperature(0)", ["temperature_c"]),
        ("nvmlDeviceGetPowerUsage", ["power_mw"]),
        ("nvmlDeviceGetTotalEnergyConsumption", ["energy_mj"]),
        ("nvmlDeviceGetComputeRunningProcesses", ["processes", "process_count"]),
        ("nvmlDeviceGetCurrentClocksThrottleReasons", ["throttle_reasons"]),
        ("nvmlDeviceGetPcieThroughput(0)", ["pcie_tx_kbps"]),
        ("nvmlDeviceGetPcieThroughput(1)", ["pcie_rx_kbps"]),
    ],
)
@pytest.mark.parametrize("recording", RECORDINGS)
def test_a_not_supported_query_reads_as_unknown_never_zero(
    recording: Recording, query: str, fields: list[str]
) -> None:
    _nvml, reader = open_reader(recording)
    recorded = reader.sample()[0]
    nvml = RecordedNvml(recording.path, {query: NOT_SUPPORTED})
    sample = NvmlReader(nvml).sample()[0]
    for name in fields:
        assert getattr(recorded, name) is not None, name  # the recording has a value ...
        assert getattr(sample, name) is None, name  # ... NotSupported has none, not 0
    untouched = {f: getattr(sample, f) for f in ("uuid", "health", "health_reasons")}
    assert untouched == {"uuid": recording.info.uuid, "health": GpuHealth.ok, "health_reasons": ()}


@pytest.mark.parametrize("recording", RECORDINGS)
def test_an_energy_counter_reset_shows_as_a_lower_counter_that_grows_again(
    recording: Recording,
) -> None:
    nvml, reader = open_reader(recording)
    before = [reader.sample()[0].energy_mj for _ in range(20)]
    nvml.reset_energy_counter(0)
    after = [reader.sample()[0].energy_mj for _ in range(3)]
    unreset = NvmlReader(RecordedNvml(recording.path))
    raw = [unreset.sample()[0].energy_mj for _ in range(23)]
    assert before == raw[:20]
    last = raw[19]
    assert last is not None
    assert after == [r - last for r in raw[20:] if r is not None]
    assert after[0] is not None and before[-1] is not None
    assert after[0] < before[-1]  # what a consumer taking differences must skip over
    assert after[0] < after[1] < after[2]


def test_pcie_rx_is_unknown_when_the_recording_has_no_nvidia_smi_output(tmp_path: Path) -> None:
    shutil.copy(H100.path / "nvml_snapshot.json", tmp_path)  # the probe never asked for RX
    sample = NvmlReader(RecordedNvml(tmp_path)).sample()[0]
    assert (sample.pcie_tx_kbps, sample.pcie_rx_kbps) == (1472, None)


@pytest.mark.parametrize(
    ("key", "call"),
    [
        ("nvmlDeviceGetPowerUsage", ("nvmlDeviceGetPowerUsage", ())),
        ("nvmlDeviceGetTemperature(0)", ("nvmlDeviceGetTemperature", (0,))),
        ("nvmlDeviceGetTotalEccErrors(1,0)", ("nvmlDeviceGetTotalEccErrors", (1, 0))),
    ],
)
def test_a_snapshot_key_names_the_call_and_its_arguments(
    key: str, call: tuple[str, tuple[int, ...]]
) -> None:
    assert parse_query_key(key) == call
    with pytest.raises(ValueError, match="not an NVML query key"):
        parse_query_key(key + " ")


# -- cadence ----------------------------------------------------------------------------------


def test_costly_fields_are_read_only_every_nth_sample() -> None:
    nvml, reader = open_reader(H100, gpus=2, costly_every=5)
    nvml.calls.clear()  # count the samples' calls only
    samples = [reader.sample() for _ in range(12)]
    read = [i for i, gpus in enumerate(samples) if gpus[0].pcie_tx_kbps is not None]
    assert read == [0, 5, 10]
    for i in read:
        assert [(s.pcie_tx_kbps, s.pcie_rx_kbps) for s in samples[i]] == [(1472, 417)] * 2
    for i in set(range(12)) - set(read):
        assert [(s.pcie_tx_kbps, s.pcie_rx_kbps) for s in samples[i]] == [(None, None)] * 2
    assert [nvml.calls[q] for q in (*COSTLY_QUERIES, *EVENT_BACKED_QUERIES)] == [3 * 2] * 3
    assert {nvml.calls[q] for q in EVERY_SAMPLE_QUERIES} == {12 * 2}


def test_costly_every_one_reads_every_field_every_time_and_zero_is_refused() -> None:
    nvml, reader = open_reader(H200, costly_every=1)
    assert all(reader.sample()[0].pcie_tx_kbps == 1644 for _ in range(3))
    assert nvml.calls["nvmlDeviceGetPcieThroughput(0)"] == 3
    with pytest.raises(ValueError, match="costly_every"):
        NvmlReader(RecordedNvml(H200.path), costly_every=0)


def test_the_ecc_count_is_read_with_the_costly_fields_where_ecc_events_are_watched() -> None:
    watched, reader = open_reader(H100, costly_every=10)
    for _ in range(20):
        reader.sample()
    unwatched = RecordedNvml(H100.path, {"nvmlDeviceRegisterEvents": NOT_SUPPORTED})
    reader = NvmlReader(unwatched, costly_every=10)
    for _ in range(20):
        reader.sample()
    ecc = EVENT_BACKED_QUERIES[0]
    assert (watched.calls[ecc], unwatched.calls[ecc]) == (2, 20)


def test_an_ecc_failure_stays_reported_between_reads_of_the_count() -> None:
    nvml, reader = open_reader(H200, costly_every=10)
    reader.sample()
    nvml.override(EVENT_BACKED_QUERIES[0], 3, index=0)  # errors counted, the event missed
    assert reader.sample()[0].health is GpuHealth.ok  # not read until the next costly sample
    for _ in range(8):
        reader.sample()
    later = [reader.sample()[0] for _ in range(12)]  # samples 10 .. 21
    assert {s.health for s in later} == {GpuHealth.failed}
    assert {s.health_reasons for s in later} == {
        ("3 uncorrected ECC error(s) since the driver loaded",)
    }


@pytest.mark.parametrize("recording", RECORDINGS)
def test_each_costly_query_is_slower_than_all_every_sample_queries_together(
    recording: Recording,
) -> None:
    nvml = RecordedNvml(recording.path)
    every_sample_s = sum(nvml.latency_s(q) for q in EVERY_SAMPLE_QUERIES)
    assert all(nvml.latency_s(q) > every_sample_s for q in COSTLY_QUERIES)
    assert 0.010 < every_sample_s < 0.011  # 10.2 ms (H100), 10.5 ms (H200) per GPU


def test_replayed_latency_is_the_recorded_time_of_each_call() -> None:
    slept: list[float] = []
    nvml = RecordedNvml(H100.path, simulate_latency=True, sleep=slept.append)
    reader = NvmlReader(nvml)
    reader.inventory()
    slept.clear()
    reader.sample()  # the first sample reads the costly fields too
    queries = (*EVERY_SAMPLE_QUERIES, *EVENT_BACKED_QUERIES, *COSTLY_QUERIES)
    expected = sum(nvml.latency_s(q) for q in (*queries, "nvmlDeviceGetCount"))
    assert sum(slept) == pytest.approx(expected)
    assert sum(slept) == pytest.approx(0.0117 + 2 * 0.0211, abs=0.0002)


# -- health -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class HealthCase:
    fault: Callable[[RecordedNvml], object]
    want_health: GpuHealth
    want_reason: str | None  # a part of one reason; None: no reasons at all


HEALTH_CASES = {
    "recorded as is": HealthCase(lambda n: None, GpuHealth.ok, None),
    "uncorrected ECC errors": HealthCase(
        lambda n: n.inject_ecc_errors(0, 2), GpuHealth.failed, "2 uncorrected ECC error(s)"
    ),
    "row remap pending": HealthCase(
        lambda n: n.set_remapped_rows(0, pending=True), GpuHealth.degraded, "remapping pending"
    ),
    "row remap failure": HealthCase(
        lambda n: n.set_remapped_rows(0, failure=True), GpuHealth.failed, "remapping failed"
    ),
    "XID 79 fallen off the bus": HealthCase(
        lambda n: n.inject_xid(0, 79), GpuHealth.failed, "XID 79 (GPU has fallen off the bus)"
    ),
    "application XID 13": HealthCase(
        lambda n: n.inject_xid(0, 13), GpuHealth.ok, "XID 13 (graphics engine exception)"
    ),
    "unlisted XID": HealthCase(
        lambda n: n.inject_xid(0, 999), GpuHealth.ok, "XID 999 (not in the reader's list"
    ),
    "lost GPU": HealthCase(lambda n: n.lose_gpu(0), GpuHealth.failed, "GPU is lost"),
}


@pytest.mark.parametrize("case", HEALTH_CASES.values(), ids=HEALTH_CASES.keys())
@pytest.mark.parametrize("recording", RECORDINGS)
def test_each_health_state_is_reported_with_its_reason(
    recording: Recording, case: HealthCase
) -> None:
    nvml, reader = open_reader(recording)
    case.fault(nvml)
    sample = reader.sample()[0]
    assert sample.health is case.want_health
    if case.want_reason is None:
        assert sample.health_reasons == ()
    else:
        assert any(case.want_reason in reason for reason in sample.health_reasons), (
            sample.health_reasons
        )


@pytest.mark.parametrize("xid", [48, 62, 64, 74, 79, 92, 94, 95, 119, 120, 140])
def test_every_documented_fatal_xid_fails_the_gpu(xid: int) -> None:
    nvml, reader = open_reader(H100)
    assert nvml.inject_xid(0, xid) == 1
    sample = reader.sample()[0]
    assert sample.health is GpuHealth.failed
    assert sample.health_reasons == (xid_reason(xid)[1],)
    assert xid_reason(xid)[0] is True


@pytest.mark.parametrize("xid", [13, 31, 43, 45, 63])
def test_application_xids_are_named_but_leave_the_gpu_ok(xid: int) -> None:
    nvml, reader = open_reader(H200)
    nvml.inject_xid(0, xid)
    sample = reader.sample()[0]
    assert sample.health is GpuHealth.ok
    assert sample.health_reasons == (xid_reason(xid)[1],)
    assert xid_reason(xid)[0] is False


@pytest.mark.parametrize("recording", RECORDINGS)
def test_a_fatal_xid_keeps_the_gpu_failed_for_the_life_of_the_reader(
    recording: Recording,
) -> None:
    nvml, reader = open_reader(recording)
    assert reader.sample()[0].health is GpuHealth.ok
    nvml.inject_xid(0, 79)
    later = [reader.sample()[0] for _ in range(5)]
    # every query still answers cleanly: only the event says the GPU is broken
    assert all(s.utilization_pct is not None and s.energy_mj is not None for s in later)
    assert {s.health for s in later} == {GpuHealth.failed}
    assert {s.health_reasons for s in later} == {(xid_reason(79)[1],)}
    reader.close()
    # a new NVML session (after the reset the reason asks for) starts from what it sees
    assert NvmlReader(nvml).sample()[0].health is GpuHealth.ok


def test_an_application_xid_is_reported_in_the_next_sample_only() -> None:
    nvml, reader = open_reader(H100)
    nvml.inject_xid(0, 13)
    first, second = reader.sample()[0], reader.sample()[0]
    assert (first.health, len(first.health_reasons)) == (GpuHealth.ok, 1)
    assert (second.health, second.health_reasons) == (GpuHealth.ok, ())


def test_a_fatal_xid_on_one_gpu_of_eight_leaves_the_others_ok() -> None:
    nvml, reader = open_reader(H200, gpus=8)
    nvml.inject_xid(5, 95)
    healths = [s.health for s in reader.sample()]
    assert healths == [GpuHealth.ok] * 5 + [GpuHealth.failed] + [GpuHealth.ok] * 2


def test_a_double_bit_ecc_event_and_count_both_say_why_the_gpu_failed() -> None:
    nvml, reader = open_reader(H100)
    nvml.inject_ecc_errors(0, 1)
    assert reader.sample()[0].health_reasons == (
        "double-bit (uncorrectable) ECC error event: the GPU needs a reset",
        "1 uncorrected ECC error(s) since the driver loaded",
    )


def test_events_are_only_read_from_gpus_registered_before_they_happened() -> None:
    nvml = RecordedNvml(H100.path)
    nvml.nvmlInit()
    assert nvml.inject_xid(0, 79) == 0  # no event set yet: NVML delivers it to nobody
    reader = NvmlReader(nvml)
    assert reader.sample()[0].health is GpuHealth.ok


def test_health_still_comes_from_the_queries_when_xid_events_are_not_supported() -> None:
    nvml = RecordedNvml(H100.path, {"nvmlDeviceRegisterEvents": NOT_SUPPORTED})
    reader = NvmlReader(nvml)
    assert reader.watched_events() == {H100.info.uuid: ()}
    assert nvml.inject_xid(0, 79) == 0
    nvml.set_remapped_rows(0, failure=True)
    sample = reader.sample()[0]
    assert sample.health is GpuHealth.failed
    assert sample.health_reasons == ("row remapping failed: the GPU memory has unrepairable rows",)


@pytest.mark.parametrize("recording", RECORDINGS)
def test_a_lost_gpu_is_failed_with_every_field_unknown_and_is_not_queried_again(
    recording: Recording,
) -> None:
    nvml, reader = open_reader(recording, gpus=8)
    nvml.lose_gpu(2)
    first = reader.sample()
    asked = nvml.calls.total()
    second = reader.sample()
    lost = second[2]
    assert lost.health is GpuHealth.failed
    assert lost.health_reasons == ("GPU is lost (fell off the bus): it needs a reset or a reboot",)
    assert (lost.utilization_pct, lost.power_mw, lost.energy_mj, lost.process_count) == (
        None,
        None,
        None,
        None,
    )
    assert first[2].health is GpuHealth.failed
    assert [s.health for i, s in enumerate(second) if i != 2] == [GpuHealth.ok] * 7
    per_gpu = len(EVERY_SAMPLE_QUERIES)
    # count + one event poll + the seven GPUs still answering; nothing for the lost one
    assert nvml.calls.total() - asked == 2 + 7 * per_gpu


def test_pynvml_handles_to_the_same_device_are_one_gpu() -> None:
    """pynvml hands out a new ctypes pointer for an event's device: it must still match."""
    device = ctypes.c_int(0)
    first = ctypes.pointer(device)
    second = ctypes.cast(ctypes.addressof(device), ctypes.POINTER(ctypes.c_int))
    assert first is not second and first != second
    assert _handle_key(first) == _handle_key(second)


# -- NVML itself broken -----------------------------------------------------------------------


def test_a_driver_missing_at_start_raises_a_reader_error_suggesting_simulate() -> None:
    nvml = RecordedNvml(H100.path)
    nvml.unload_driver()
    with pytest.raises(GpuReaderError) as caught:
        NvmlReader(nvml)
    assert "driver is not loaded" in str(caught.value)
    assert "--simulate" in str(caught.value)


@pytest.mark.parametrize("recording", RECORDINGS)
def test_a_driver_unloaded_while_running_raises_nvml_broke_not_gpu_lost(
    recording: Recording,
) -> None:
    nvml, reader = open_reader(recording, gpus=8)
    reader.sample()
    nvml.unload_driver()
    with pytest.raises(GpuReaderError) as caught:
        reader.sample()
    message = str(caught.value)
    assert message.startswith("NVML broke while the agent was running: nvmlDeviceGetCount")
    assert "Uninitialized" in message
    assert "not lost" in message and "GPU is lost" not in message


def test_access_lost_to_every_gpu_raises_nvml_broke() -> None:
    nvml, reader = open_reader(H200, gpus=8)
    nvml.revoke_access()
    with pytest.raises(GpuReaderError, match="NVML broke while the agent was running") as caught:
        reader.sample()
    assert "lost access to the GPUs" in str(caught.value)


def test_access_refused_on_one_gpu_only_makes_that_gpu_unknown() -> None:
    nvml, reader = open_reader(H100, gpus=8)
    for query in (*EVERY_SAMPLE_QUERIES, *EVENT_BACKED_QUERIES, *COSTLY_QUERIES):
        nvml.override(query, NVMLError_NoPermission, index=3)
    samples = reader.sample()
    assert samples[3].health is GpuHealth.unknown
    assert samples[3].utilization_pct is None
    assert [s.health for i, s in enumerate(samples) if i != 3] == [GpuHealth.ok] * 7


def test_a_driver_and_library_version_mismatch_raises_nvml_broke() -> None:
    nvml = RecordedNvml(H100.path, {"nvmlDeviceGetPowerUsage": NVMLError_LibRmVersionMismatch})
    with pytest.raises(GpuReaderError, match="NVML broke while the agent was running") as caught:
        NvmlReader(nvml).sample()
    assert "upgraded" in str(caught.value)


def test_a_device_count_that_fails_mid_run_raises_nvml_broke() -> None:
    nvml, reader = open_reader(H100)
    reader.sample()
    nvml.override("nvmlDeviceGetCount", NOT_SUPPORTED)
    with pytest.raises(GpuReaderError, match="NVML broke .*: nvmlDeviceGetCount failed"):
        reader.sample()
