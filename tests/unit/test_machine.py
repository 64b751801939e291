"""The manifest's record of the machine a version was trained on (``graph/machine.py``)."""

from __future__ import annotations

from pathlib import Path

from graph.machine import PACKAGES, cpu_flags, cpu_model, machine_facts, package_versions


def test_cpu_model_reads_the_kernels_model_name(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 7B13\n"
                    "flags\t\t: fpu sse4_2 avx fma avx2 avx512f\n"
                    "processor\t: 1\nmodel name\t: AMD EPYC 7B13\n")
    assert cpu_model(str(info)) == "AMD EPYC 7B13"
    assert cpu_flags(str(info)) == ["sse4_2", "avx", "avx2", "fma", "avx512f"]


def test_cpu_flags_read_arm_features(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nFeatures\t: fp asimd evtstrm sve\n")
    assert cpu_flags(str(info)) == ["asimd", "sve"]


def test_cpu_model_without_proc_falls_back_to_platform(tmp_path: Path) -> None:
    assert cpu_model(str(tmp_path / "missing"))  # platform's processor or machine, never empty
    assert cpu_flags(str(tmp_path / "missing")) == []


def test_machine_facts_name_every_numeric_package() -> None:
    facts = machine_facts()
    assert set(facts["packages"]) == set(PACKAGES)
    assert facts["packages"]["numpy"] and facts["packages"]["lightgbm"]
    assert facts["logical_cpus"] >= 1 and facts["python"].startswith("3.")


def test_package_versions_name_a_missing_package_none() -> None:
    found = package_versions(["numpy", "no-such-package-intentrec"])
    assert found["numpy"] and found["no-such-package-intentrec"] is None
    # The serving benchmarks record the same facts with their own packages.
    facts = machine_facts(["uvicorn"])
    assert set(facts["packages"]) == {"uvicorn"} and facts["cpu"]
