"""GPU readers against real NVML recordings, injected faults and the simulator."""

from __future__ import annotations

import sys
from pathlib import Path
from types import ModuleType

import pytest

from agents.gpu import (
    NOT_SUPPORTED,
    GpuReaderError,
    NvmlReader,
    RecordedNvml,
    SimulatedReader,
    open_reader,
    parse_gpu_spec,
)
from agents.gpu.nvml import COSTLY_QUERIES, EVENT_BACKED_QUERIES, EVERY_SAMPLE_QUERIES
from agents.gpu.recorded import NVMLError, NVMLError_GpuIsLost, NVMLError_LibraryNotFound
from scheduler.domain.enums import GpuHealth
from scheduler.domain.gpu_models import canonical_model

FIXTURES = Path(__file__).parents[1] / "fixtures" / "nvml"
H100 = FIXTURES / "h100-80gb-hbm3"
H200 = FIXTURES / "h200-141gb"
ECC_KEY = "nvmlDeviceGetTotalEccErrors(1,0)"

RECORDED_GPUS = [
    pytest.param(
        H100,
        "GPU-a6b4194b-edf8-4900-8967-b91334a78cf0",
        "NVIDIA H100 80GB HBM3",
        85_520_809_984,
        "H100-80GB",
        id="h100",
    ),
    pytest.param(
        H200,
        "GPU-eb8e4270-fbe7-8d81-f593-5baf0d173e76",
        "NVIDIA H200",
        150_754_820_096,
        "H200-141GB",
        id="h200",
    ),
]
BOTH = [pytest.param(H100, id="h100"), pytest.param(H200, id="h200")]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# -- NvmlReader over the real recordings ------------------------------------------------------


@pytest.mark.parametrize(("fixture", "uuid", "name", "total", "model"), RECORDED_GPUS)
def test_inventory_reports_the_recorded_gpu_with_its_canonical_model(
    fixture: Path, uuid: str, name: str, total: int, model: str
) -> None:
    with NvmlReader(RecordedNvml(fixture)) as reader:
        inventory = reader.inventory()
        assert reader.driver_version() == "580.159.04"
    assert len(inventory) == 1
    gpu = inventory[0]
    assert (gpu.index, gpu.uuid, gpu.name, gpu.memory_total_bytes) == (0, uuid, name, total)
    assert gpu.model == model
    assert gpu.mig_enabled is False


def test_pynvml_versions_returning_bytes_give_the_same_inventory() -> None:
    with NvmlReader(RecordedNvml(H100, bytes_strings=True)) as reader:
        gpu = reader.inventory()[0]
        assert reader.driver_version() == "580.159.04"
    assert gpu.name == "NVIDIA H100 80GB HBM3"
    assert gpu.uuid == "GPU-a6b4194b-edf8-4900-8967-b91334a78cf0"
    assert gpu.model == "H100-80GB"


@pytest.mark.parametrize("fixture", BOTH)
def test_replayed_utilisation_rises_under_load_and_falls_back_to_idle(fixture: Path) -> None:
    reader = NvmlReader(RecordedNvml(fixture))
    samples = [reader.sample()[0] for _ in range(34)]
    utilisation = [s.utilization_pct for s in samples]
    assert all(u is not None for u in utilisation)
    peak = utilisation.index(max(u for u in utilisation if u is not None))
    assert utilisation[0] == 0
    assert (utilisation[peak] or 0) > 50
    assert utilisation[-1] == 0
    assert 0 < peak < len(utilisation) - 1
    # a process holds the GPU while it is busy, and its memory use is above the idle figure
    assert samples[peak].process_count == 1
    assert (samples[peak].memory_used_bytes or 0) > (samples[0].memory_used_bytes or 0)
    assert samples[0].process_count == 0


@pytest.mark.parametrize("fixture", BOTH)
def test_replayed_energy_counter_never_decreases_and_grows_under_load(fixture: Path) -> None:
    reader = NvmlReader(RecordedNvml(fixture))
    energy = [reader.sample()[0].energy_mj for _ in range(40)]
    values = [e for e in energy if e is not None]
    assert len(values) == len(energy)
    assert all(b >= a for a, b in zip(values, values[1:], strict=False))
    assert values[-1] - values[0] > 1_000_000  # more than 1 kJ over ~16 s of a busy GPU


def test_replay_stays_on_the_last_recorded_sample_once_exhausted() -> None:
    reader = NvmlReader(RecordedNvml(H100))
    samples = [reader.sample()[0] for _ in range(50)]
    assert samples[-1] == samples[-2] == samples[33]


@pytest.mark.parametrize("fixture", BOTH)
def test_recorded_gpus_are_healthy_with_no_reasons(fixture: Path) -> None:
    sample = NvmlReader(RecordedNvml(fixture)).sample()[0]
    assert sample.health is GpuHealth.ok
    assert sample.health_reasons == ()


def test_a_not_supported_power_reading_is_unknown_not_zero() -> None:
    nvml = RecordedNvml(H100, {"nvmlDeviceGetPowerUsage": NOT_SUPPORTED})
    sample = NvmlReader(nvml).sample()[0]
    assert sample.power_mw is None
    assert sample.energy_mj is not None  # only the faked query is affected
    assert sample.health is GpuHealth.ok


def test_every_field_is_unknown_when_every_sample_query_is_not_supported() -> None:
    keys = [*EVERY_SAMPLE_QUERIES, *EVENT_BACKED_QUERIES, *COSTLY_QUERIES]
    nvml = RecordedNvml(H200, dict.fromkeys(keys, NOT_SUPPORTED))
    reader = NvmlReader(nvml)
    sample = reader.sample()[0]  # the first sample reads the costly fields too
    assert sample.uuid == "GPU-eb8e4270-fbe7-8d81-f593-5baf0d173e76"
    assert (
        sample.utilization_pct,
        sample.memory_used_bytes,
        sample.temperature_c,
        sample.power_mw,
        sample.energy_mj,
        sample.process_count,
        sample.processes,
        sample.throttle_reasons,
        sample.pcie_tx_kbps,
        sample.pcie_rx_kbps,
    ) == (None,) * 10
    assert sample.health is GpuHealth.unknown
    assert sample.health_reasons == (
        "uncorrected ECC error count unavailable (Not Supported)",
        "row remapping state unavailable (Not Supported)",
    )


def test_uncorrected_ecc_errors_mark_the_gpu_failed() -> None:
    nvml = RecordedNvml(H100).with_overrides({ECC_KEY: 2})
    sample = NvmlReader(nvml).sample()[0]
    assert sample.health is GpuHealth.failed
    assert any("2 uncorrected ECC" in reason for reason in sample.health_reasons)


def test_a_row_remapping_failure_marks_the_gpu_failed() -> None:
    nvml = RecordedNvml(H100, {"nvmlDeviceGetRemappedRows": [0, 3, 0, 1]})
    sample = NvmlReader(nvml).sample()[0]
    assert sample.health is GpuHealth.failed
    assert any("row remapping failed" in reason for reason in sample.health_reasons)


def test_pending_row_remaps_mark_the_gpu_degraded() -> None:
    nvml = RecordedNvml(H200, {"nvmlDeviceGetRemappedRows": [0, 1, 1, 0]})
    sample = NvmlReader(nvml).sample()[0]
    assert sample.health is GpuHealth.degraded
    assert any("pending" in reason for reason in sample.health_reasons)


def test_health_is_ok_when_only_one_health_query_is_supported() -> None:
    nvml = RecordedNvml(H100, {ECC_KEY: NOT_SUPPORTED})
    assert NvmlReader(nvml).sample()[0].health is GpuHealth.ok


def test_a_lost_gpu_is_failed_even_though_no_health_query_answered() -> None:
    nvml = RecordedNvml(
        H100, {ECC_KEY: NVMLError_GpuIsLost, "nvmlDeviceGetRemappedRows": NVMLError_GpuIsLost}
    )
    sample = NvmlReader(nvml).sample()[0]
    assert sample.health is GpuHealth.failed
    assert any("lost" in reason for reason in sample.health_reasons)


def test_mig_enabled_before_any_instance_is_created_is_reported_without_instances() -> None:
    nvml = RecordedNvml(H100, {"nvmlDeviceGetMigMode": [1, 1]})  # max MIG devices: 0
    gpu = NvmlReader(nvml).inventory()[0]
    assert (gpu.mig_enabled, gpu.mig_instances) == (True, ())


def test_close_shuts_nvml_down_once_even_when_called_twice() -> None:
    nvml = RecordedNvml(H100)
    reader = NvmlReader(nvml)
    assert nvml.initialized
    reader.close()
    reader.close()
    assert not nvml.initialized


def test_recorded_errors_are_raised_as_the_matching_nvml_error_subclass() -> None:
    nvml = RecordedNvml(H100, {"nvmlDeviceGetPowerUsage": NOT_SUPPORTED})
    nvml.nvmlInit()
    handle = nvml.nvmlDeviceGetHandleByIndex(0)
    with pytest.raises(nvml.NVMLError_NotSupported) as caught:
        nvml.nvmlDeviceGetPowerUsage(handle)
    assert caught.value.value == nvml.NVML_ERROR_NOT_SUPPORTED == 3
    assert isinstance(NVMLError(3), nvml.NVMLError_NotSupported)


def test_a_query_without_a_recording_fails_loudly_instead_of_reading_unknown() -> None:
    nvml = RecordedNvml(H100)
    nvml.nvmlInit()
    handle = nvml.nvmlDeviceGetHandleByIndex(0)
    with pytest.raises(LookupError):
        nvml.nvmlDeviceGetTotalEccErrors(handle, 0, 1)


def test_queries_before_nvml_init_raise_uninitialized() -> None:
    nvml = RecordedNvml(H100)
    with pytest.raises(nvml.NVMLError_Uninitialized):
        nvml.nvmlDeviceGetCount()


# -- NvmlReader without NVML ------------------------------------------------------------------


def test_missing_nvml_library_raises_a_reader_error_that_suggests_simulate() -> None:
    nvml = RecordedNvml(H100, {"nvmlInit": NVMLError_LibraryNotFound})
    with pytest.raises(GpuReaderError) as caught:
        NvmlReader(nvml)
    message = str(caught.value)
    assert "libnvidia-ml.so not found" in message
    assert "--simulate" in message


def test_a_module_whose_init_fails_for_another_reason_names_the_nvml_error() -> None:
    fake = ModuleType("fake_pynvml")

    class FakeNvmlError(Exception):
        value = 9

        def __str__(self) -> str:
            return "Driver Not Loaded"

    def nvml_init() -> None:
        raise FakeNvmlError()

    fake.NVMLError = FakeNvmlError  # type: ignore[attr-defined]
    fake.nvmlInit = nvml_init  # type: ignore[attr-defined]
    with pytest.raises(GpuReaderError, match="driver is not loaded"):
        NvmlReader(fake)


def test_an_uninstalled_pynvml_raises_a_reader_error_naming_the_package(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` fail
    with pytest.raises(GpuReaderError, match="nvidia-ml-py"):
        NvmlReader()


def test_real_nvml_on_a_host_without_gpus_raises_a_reader_error() -> None:
    try:
        reader = NvmlReader()
    except GpuReaderError as exc:
        assert "--simulate" in str(exc)
    else:  # a GPU host: the real library must then list at least one GPU
        try:
            assert reader.inventory()
        finally:
            reader.close()


# -- open_reader ------------------------------------------------------------------------------


def test_open_reader_picks_the_simulator_or_the_replay() -> None:
    simulated = open_reader(simulate="2xH100-80GB", replay=None, node_name="n1")
    assert isinstance(simulated, SimulatedReader)
    assert len(simulated.inventory()) == 2
    replayed = open_reader(simulate=None, replay=H200, node_name="n1")
    assert isinstance(replayed, NvmlReader)
    assert replayed.inventory()[0].model == "H200-141GB"
    assert replayed.cuda_driver_version() == "13.0"
    replayed.close()


def test_open_reader_rejects_a_missing_replay_folder_and_conflicting_options(
    tmp_path: Path,
) -> None:
    with pytest.raises(GpuReaderError, match="nvml_snapshot.json"):
        open_reader(simulate=None, replay=tmp_path, node_name="n1")
    with pytest.raises(ValueError, match="not both"):
        open_reader(simulate="1xH100-80GB", replay=H100, node_name="n1")


# -- SimulatedReader --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("4xH100-80GB", (4, "H100-80GB", 80 * 2**30)),
        ("2xH200-141GB", (2, "H200-141GB", 141 * 2**30)),
        ("8xA100-40GB", (8, "A100-40GB", 40 * 2**30)),
        (" 1 X h100-80gb ", (1, "H100-80GB", 80 * 2**30)),
        ("16xL40S-48GB", (16, "L40S-48GB", 48 * 2**30)),
    ],
)
def test_gpu_specs_parse_to_count_model_and_memory(
    spec: str, expected: tuple[int, str, int]
) -> None:
    assert parse_gpu_spec(spec) == expected
    _count, model, memory = expected
    family, gb = model.rsplit("-", 1)
    assert canonical_model(f"NVIDIA {family}", memory) == model  # memory alone round-trips


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("H100-80GB", "expected COUNTxMODEL-MEMGB, e.g. 4xH100-80GB"),
        ("4xH100", "expected COUNTxMODEL-MEMGB, e.g. 4xH100-80GB"),
        ("4*H100-80GB", "expected COUNTxMODEL-MEMGB, e.g. 4xH100-80GB"),
        ("", "expected COUNTxMODEL-MEMGB, e.g. 4xH100-80GB"),
        ("0xH100-80GB", "count must be 1..16, got 0"),
        ("17xH100-80GB", "count must be 1..16, got 17"),
        ("2xH100-0GB", "memory must be positive"),
    ],
)
def test_bad_gpu_specs_are_rejected_with_the_expected_form(spec: str, message: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_gpu_spec(spec)
    assert message in str(caught.value)


def test_simulated_inventory_matches_the_spec_with_nvml_style_uuids() -> None:
    reader = SimulatedReader("4xH100-80GB", "node-a")
    assert reader.cuda_driver_version() is None  # no CUDA on a simulated host, not a made-up one
    inventory = reader.inventory()
    assert [gpu.index for gpu in inventory] == [0, 1, 2, 3]
    assert {gpu.model for gpu in inventory} == {"H100-80GB"}
    assert all(gpu.memory_total_bytes == 80 * 2**30 for gpu in inventory)
    assert all(gpu.mig_enabled is False for gpu in inventory)
    assert all(canonical_model(g.name, g.memory_total_bytes) == g.model for g in inventory)
    uuid = inventory[0].uuid
    assert uuid.startswith("GPU-") and [len(p) for p in uuid[4:].split("-")] == [8, 4, 4, 4, 12]
    assert len({gpu.uuid for gpu in inventory}) == 4


def test_simulated_uuids_are_deterministic_per_node_and_differ_between_nodes() -> None:
    first = [g.uuid for g in SimulatedReader("2xH200-141GB", "node-a").inventory()]
    again = [g.uuid for g in SimulatedReader("2xH200-141GB", "node-a").inventory()]
    other = [g.uuid for g in SimulatedReader("2xH200-141GB", "node-b").inventory()]
    assert first == again
    assert not set(first) & set(other)


def test_busy_simulated_gpus_report_high_utilisation_and_idle_ones_zero() -> None:
    reader = SimulatedReader("3xA100-40GB", "node-a", clock=FakeClock())
    uuids = [g.uuid for g in reader.inventory()]
    assert [s.utilization_pct for s in reader.sample()] == [0, 0, 0]
    reader.set_busy({uuids[1]})
    samples = reader.sample()
    assert [s.utilization_pct for s in samples] == [0, 95, 0]
    assert [s.process_count for s in samples] == [0, 1, 0]
    assert all(s.health is GpuHealth.ok for s in samples)
    reader.set_busy(set())
    assert [s.utilization_pct for s in reader.sample()] == [0, 0, 0]
    with pytest.raises(ValueError, match="GPU-nope"):
        reader.set_busy({"GPU-nope"})


def test_simulated_energy_grows_with_the_injected_clock_and_faster_when_busy() -> None:
    clock = FakeClock()
    reader = SimulatedReader("2xH100-80GB", "node-a", clock=clock)
    reader.set_busy({reader.inventory()[0].uuid})
    series: list[list[int]] = []
    for step in range(7):
        if step == 6:
            clock.now -= 100.0  # a clock stepping backwards must not make energy go down
        elif step > 0:
            clock.now += 10.0
        series.append([s.energy_mj for s in reader.sample() if s.energy_mj is not None])
    busy = [row[0] for row in series]
    idle = [row[1] for row in series]
    for counter in (busy, idle):
        assert all(b >= a for a, b in zip(counter, counter[1:], strict=False))
    assert busy[-1] - busy[0] > idle[-1] - idle[0] > 0
    busy_power = reader.sample()[0].power_mw
    assert busy_power is not None
    assert busy[5] - busy[0] == 50 * busy_power  # 50 s at the busy power, exactly


def test_an_injected_simulated_failure_is_reported_with_its_reason() -> None:
    reader = SimulatedReader("1xH100-80GB", "node-a", clock=FakeClock())
    uuid = reader.inventory()[0].uuid
    reader.set_health(uuid, GpuHealth.failed, "XID 79: fell off the bus")
    sample = reader.sample()[0]
    assert sample.health is GpuHealth.failed
    assert sample.health_reasons == ("XID 79: fell off the bus",)
