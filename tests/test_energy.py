import pytest

from common.energy import EnergyMeter, RaplCounter, find_counter, measure_energy, repeated_energy


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t

    def sleep(self, s):
        self.t += s


class FakeCounter:
    """Joules = idle_w x time + what the fake work adds: an exact, known energy."""

    method = "fake"

    def __init__(self, clock, idle_w=20.0, resolution_j=0.0):
        self.clock, self.idle_w, self.extra, self.resolution_j = clock, idle_w, 0.0, resolution_j

    def read_j(self):
        e = self.idle_w * self.clock() + self.extra
        return e - e % self.resolution_j if self.resolution_j else e


def test_window_is_extended_and_idle_is_subtracted():
    clock = FakeClock()
    counter = FakeCounter(clock)

    def work():  # 0.1 s at 100 W above idle
        clock.t += 0.1
        counter.extra += 10.0

    r = measure_energy(
        work,
        units_per_call=5,
        device="cpu",
        min_window_s=1.0,
        idle_s=2.0,
        counter=counter,
        clock=clock,
        sleep=clock.sleep,
    )
    assert r["calls"] == 10 and r["window_s"] == pytest.approx(1.0)
    assert r["idle_power_w"] == pytest.approx(20.0)
    assert r["energy_j"] == pytest.approx(120.0)  # 100 J of work + 20 J of idle over 1 s
    assert r["net_energy_j"] == pytest.approx(100.0)
    assert r["j_per_token"] == pytest.approx(120.0 / 50) and r["net_j_per_token"] == pytest.approx(2.0)
    assert r["method"] == "fake"


def test_short_window_on_a_coarse_counter_gives_no_figure():
    clock = FakeClock()
    counter = FakeCounter(clock, idle_w=0.0, resolution_j=1000.0)  # updates only every 1000 J

    def work():
        clock.t += 0.05
        counter.extra += 5.0

    r = measure_energy(work, 1, "cpu", min_window_s=0.1, idle_s=0.0, counter=counter, clock=clock, sleep=clock.sleep)
    assert r["energy_j"] is None and "did not advance" in r["reason"]


def test_context_manager_for_training():
    clock = FakeClock()
    counter = FakeCounter(clock, idle_w=50.0)
    with EnergyMeter("cpu", idle_s=0.0, counter=counter, clock=clock, sleep=clock.sleep) as m:
        clock.t += 3.0
    r = m.result(units=300)
    assert r["energy_j"] == pytest.approx(150.0) and r["j_per_token"] == pytest.approx(0.5)
    assert r["idle_power_w"] is None and "net_energy_j" not in r


def test_unavailable_says_why_and_gives_no_number(tmp_path):
    counter, reason = find_counter("cpu", rapl_root=str(tmp_path))
    assert counter is None and "RAPL" in reason
    r = measure_energy(lambda: None, 1, "cpu", counter=None, reason=reason)
    assert r == {"method": "unavailable", "reason": reason}


def _rapl_readable() -> bool:
    """Checked here without the code under test: is any package energy counter readable?"""
    import glob

    for path in glob.glob("/sys/class/powercap/intel-rapl:*/energy_uj"):
        try:
            int(open(path).read())
            return True
        except (OSError, ValueError):
            pass
    return False


def test_this_machine_reports_honestly():
    r = measure_energy(lambda: sum(range(20000)), 1, "cpu", min_window_s=0.2, idle_s=0.05)
    if _rapl_readable():  # a counter exists: a measured, positive figure from RAPL
        assert r["method"] == "rapl" and r["energy_j"] > 0 and r["window_s"] >= 0.2
    else:  # none: said so with the reason, and no number at all
        assert r["method"] == "unavailable" and "RAPL" in r["reason"]
        assert not any(k.endswith("_j") or k.startswith("j_per") for k in r)


def test_rapl_counter_sums_packages_and_unwraps(tmp_path):
    for pkg, start in (("intel-rapl:0", 900), ("intel-rapl:1", 100)):
        d = tmp_path / pkg
        d.mkdir()
        (d / "energy_uj").write_text(str(start))
        (d / "max_energy_range_uj").write_text("1000")
    sub = tmp_path / "intel-rapl:0:0"  # a subdomain (core): already inside its package, not added again
    sub.mkdir()
    (sub / "energy_uj").write_text("5")
    (sub / "max_energy_range_uj").write_text("1000")
    c = RaplCounter(str(tmp_path))
    assert c.read_j() == 0
    (tmp_path / "intel-rapl:0/energy_uj").write_text("100")  # wrapped: 900 -> 1000 -> 100 is +200 uJ
    (tmp_path / "intel-rapl:1/energy_uj").write_text("150")  # +50 uJ
    assert c.read_j() == pytest.approx(250e-6)


def test_repeated_energy_gives_the_median_and_the_spread_of_the_runs():
    clock = FakeClock()
    counter = FakeCounter(clock, idle_w=20.0)
    per_call = iter([10.0] * 8 + [11.0] * 8 + [10.5] * 8)  # J above idle per 1/8 s call: three runs of 8 calls

    def work():
        clock.t += 0.125
        counter.extra += next(per_call)

    kw = dict(min_window_s=1.0, idle_s=1.0, counter=counter, clock=clock, sleep=clock.sleep)
    r = repeated_energy(work, 5, "cpu", runs=3, tolerance=0.05, **kw)
    assert r["method"] == "fake" and len(r["runs"]) == 3
    assert r["net_j_per_token_runs"] == pytest.approx([2.0, 2.2, 2.1])  # 80, 88, 84 J over 40 tokens
    assert r["net_j_per_token"] == pytest.approx(2.1)
    assert r["net_j_per_token_spread"] == pytest.approx(0.2 / 2.1) and r["net_j_per_token_within_tolerance"] is False
    assert r["j_per_token"] == pytest.approx(2.6)  # (84 + 20 J of idle) / 40
    assert r["j_per_token_spread"] == pytest.approx(0.2 / 2.6) and not r["j_per_token_within_tolerance"]
    assert repeated_energy(work, 1, "cpu", counter=None, reason="no counter")["method"] == "unavailable"


@pytest.mark.parametrize("method, floor", [("nvml-energy-counter", 5.0), ("rapl", 2.0)])
def test_windows_last_the_counters_floor_and_a_zero_reading_is_a_failed_window(method, floor):
    clock = FakeClock()
    counter = FakeCounter(clock, idle_w=0.0, resolution_j=0.0)
    counter.method = method

    def work():  # 0.05 s at 10 W
        clock.t += 0.05
        counter.extra += 0.5

    kw = dict(idle_s=0.0, counter=counter, clock=clock, sleep=clock.sleep)
    r = measure_energy(work, 1, "cpu", min_window_s=1.0, cooldown_s=3.0, **kw)
    assert r["min_window_s"] == floor and r["window_s"] >= floor and r["calls"] == pytest.approx(floor / 0.05, abs=1)
    assert r["j_per_token"] == pytest.approx(0.5) and r["cooldown_s"] == 3.0
    assert measure_energy(work, 1, "cpu", min_window_s=7.0, **kw)["min_window_s"] == 7.0  # longer is kept
    # a counter that updates only every 100 ms and never moved in the window: no figure, never 0 J
    frozen = FakeCounter(clock, idle_w=0.0, resolution_j=1e9)
    frozen.method = method
    r = measure_energy(lambda: clock.sleep(0.01), 1, "cpu", counter=frozen, idle_s=0.0, clock=clock, sleep=clock.sleep)
    assert r["energy_j"] is None and r["failed_window"] and "not 0 J" in r["reason"]


def test_a_cool_down_rests_before_the_idle_reading():
    clock = FakeClock()
    counter = FakeCounter(clock, idle_w=20.0)
    r = measure_energy(
        lambda: clock.sleep(0.5), 1, "cpu", cooldown_s=4.0, idle_s=1.0, counter=counter, clock=clock, sleep=clock.sleep
    )
    assert clock.t == pytest.approx(4.0 + 1.0 + r["window_s"])  # rest, idle, then the window


class FakeNvml:
    """A stand-in for pynvml (nvidia-ml-py) on a GPU whose energy counter, and maybe its power reading, NVML does
    not support (a MIG slice, a vGPU): the calls raise NVMLError_NotSupported as the real library does."""

    class NVMLError(Exception):
        pass

    class NVMLError_NotSupported(NVMLError):  # noqa: N801 - pynvml's own name
        pass

    def __init__(self, power: bool):
        self.power = power
        self.watts = 100.0

    def nvmlInit(self):  # noqa: N802
        pass

    def nvmlDeviceGetHandleByUUID(self, uuid):  # noqa: N802
        return "handle"

    def nvmlDeviceGetHandleByIndex(self, index):  # noqa: N802
        return "handle"

    def nvmlDeviceGetTotalEnergyConsumption(self, handle):  # noqa: N802
        raise self.NVMLError_NotSupported("Not Supported")

    def nvmlDeviceGetPowerUsage(self, handle):  # noqa: N802
        if not self.power:
            raise self.NVMLError_NotSupported("Not Supported")
        return int(self.watts * 1000)


@pytest.mark.parametrize("power", [False, True])
def test_a_gpu_without_energy_or_power_readings_makes_energy_unavailable_and_training_goes_on(monkeypatch, power):
    """No energy counter: the power sampler only if NVML reads power; neither: energy "unavailable" with why,
    never an exception out of the meter (a training run on a MIG slice must not fail for want of a reading)."""
    import sys

    import torch

    from common.energy import EnergyMeter, NvmlPowerSampler, find_counter

    fake = FakeNvml(power)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: type("P", (), {"uuid": "GPU-x"})())
    monkeypatch.setattr("common.energy.sync", lambda device: None)
    counter, why = find_counter("cuda:0")
    if not power:
        assert counter is None and "neither energy" in why and "NotSupported" in why
        with EnergyMeter("cuda:0", idle_s=0.0) as meter:
            pass
        assert meter.result(units=10)["method"] == "unavailable"
        return
    assert isinstance(counter, NvmlPowerSampler)
    # the power reading fails mid-run (a driver reset): the meter says so and the work goes on
    with EnergyMeter("cuda:0", idle_s=0.0, counter=counter, reason=None) as meter:
        fake.power = False
        assert meter.so_far() is None
    r = meter.result(units=10)
    assert r["method"] == "unavailable" and "failed while measuring" in r["reason"]
