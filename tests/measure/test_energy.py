import math
import os

import pytest

from llmopt.measure import EnergyMeter, RaplReader, flops_per_joule, joules_per_step, tokens_per_joule


def _zone(root, zone_id, name, energy_uj, max_uj=1_000_000, parent=None):
    d = os.path.join(parent or root, zone_id)
    os.makedirs(d, exist_ok=True)
    for fname, value in (("name", name), ("max_energy_range_uj", max_uj), ("energy_uj", energy_uj)):
        with open(os.path.join(d, fname), "w") as f:
            f.write(f"{value}\n")
    return d


def _set(zone_dir, energy_uj):
    with open(os.path.join(zone_dir, "energy_uj"), "w") as f:
        f.write(f"{energy_uj}\n")


def test_rapl_sums_packages_and_undoes_wraparound(tmp_path):
    root = str(tmp_path)
    pkg0 = _zone(root, "intel-rapl:0", "package-0", 999_000)
    core0 = _zone(root, "intel-rapl:0:0", "core", 10, parent=pkg0)  # sub-zone, inside package-0
    pkg1 = _zone(root, "intel-rapl:1", "package-1", 100)
    psys = _zone(root, "intel-rapl:2", "psys", 0)
    with EnergyMeter(rapl_root=root) as meter:
        _set(pkg0, 1_000_000 - 1)
        meter.sample()
        _set(pkg0, 500)  # wrapped at max_energy_range_uj
        _set(pkg1, 2_100)
        _set(core0, 5_010)
        _set(psys, 9_000_000 % 1_000_000)
    assert meter.method == "rapl" and meter.measured
    # package-0: 999_000 -> 999_999 (999 uJ), wrap -> 500 (1 + 500 uJ); package-1: 2_000 uJ
    assert meter.joules == pytest.approx((999 + 1 + 500 + 2_000) / 1e6)
    assert meter.zones["intel-rapl:0:0 (core)"] == pytest.approx(5_000 / 1e6)
    assert meter.to_dict()["energy_method"] == "rapl" and meter.to_dict()["energy_measured"] is True


def test_unreadable_zones_are_skipped_with_the_reason(tmp_path):
    root = str(tmp_path)
    good = _zone(root, "intel-rapl:0", "package-0", 0)
    bad = os.path.join(root, "intel-rapl:1")
    os.makedirs(os.path.join(bad, "energy_uj"))  # a directory: unreadable even as root
    with open(os.path.join(bad, "name"), "w") as f:
        f.write("package-1\n")
    reader = RaplReader(root)
    assert [z.name for z in reader.zones] == ["package-0"]
    assert "intel-rapl:1" in next(iter(reader.skipped))
    _set(good, 3_000_000)
    reader.sample()
    assert reader.joules() == 3.0


def test_no_readable_rapl_falls_back_to_a_labelled_estimate(tmp_path):
    with EnergyMeter(rapl_root=str(tmp_path), watts_per_core=10.0) as meter:
        sum(i * i for i in range(20_000))
    assert meter.method == "estimated" and meter.measured is False
    out = meter.to_dict()
    assert out["energy_method"] == "estimated" and out["energy_measured"] is False
    assert "estimated" in out["energy_note"] and "rapl" in out["energy_note"]
    assert meter.joules >= 0 and math.isfinite(meter.joules)
    with pytest.raises(RuntimeError, match="RAPL"):
        with EnergyMeter(backend="rapl", rapl_root=str(tmp_path)):
            pass
    with pytest.raises(ValueError, match="backend"):
        EnergyMeter(backend="guess")


def test_estimate_scales_with_cpu_time(monkeypatch, tmp_path):
    import llmopt.measure.energy as energy

    clock = iter([10.0, 12.5])  # 2.5 CPU seconds inside the block
    monkeypatch.setattr(energy.time, "process_time", lambda: next(clock))
    with EnergyMeter(backend="estimate", watts_per_core=4.0) as meter:
        pass
    assert meter.joules == pytest.approx(10.0)


def test_per_unit_helpers():
    assert joules_per_step(10.0, 4) == 2.5
    assert tokens_per_joule(100, 4.0) == 25.0
    assert flops_per_joule(1e9, 2.0) == 5e8
    assert math.isnan(tokens_per_joule(100, 0.0))
