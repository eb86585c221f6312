"""medjax/hugepages.py: when a `python -m medjax.*` job restarts itself with 2 MiB pages."""

from __future__ import annotations

import pytest

from medjax import hugepages

LINUX = dict(platform="linux", glibc=(2, 36), thp="madvise")


def test_entry_points_on_a_capable_linux_restart():
    for module in hugepages.ENTRY_POINTS:
        assert hugepages.wanted({}, module, **LINUX)


@pytest.mark.parametrize(
    "environ, module, changes",
    [
        ({"GLIBC_TUNABLES": ""}, "medjax.main", {}),  # the user's setting, even empty, stays
        ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=1"}, "medjax.main", {}),
        ({hugepages.OFF_SWITCH: "0"}, "medjax.main", {}),  # turned off
        ({}, "medjax.data", {}),  # not a training / benchmark / evaluation job
        ({}, None, {}),  # imported, not run with -m
        ({}, "medjax.main", {"platform": "darwin"}),
        ({}, "medjax.main", {"glibc": None}),  # musl or no C library version
        ({}, "medjax.main", {"glibc": (2, 34)}),  # no glibc.malloc.hugetlb yet
        ({}, "medjax.main", {"thp": "always"}),  # huge pages for everyone already
        ({}, "medjax.main", {"thp": "never"}),
        ({}, "medjax.main", {"thp": None}),
    ],
)
def test_no_restart(environ, module, changes):
    assert not hugepages.wanted(environ, module, **{**LINUX, **changes})


def test_off_switch_other_values_keep_it_on():
    assert hugepages.wanted({hugepages.OFF_SWITCH: "1"}, "medjax.main", **LINUX)


def test_module_run_only_while_the_package_of_a_dash_m_module_loads():
    argv = ["/usr/bin/python3", "-u", "-m", "medjax.main", "--config=configs/crl.py"]
    assert hugepages.module_run(argv, "-m") == "medjax.main"
    # Once runpy has set argv[0] to the module's file (or for an import), nothing restarts.
    assert hugepages.module_run(argv, "/repo/medjax/main.py") is None
    assert hugepages.module_run(["/usr/bin/python3", "train.py"], "train.py") is None
    assert hugepages.module_run(["/usr/bin/python3", "-m"], "-m") is None


def test_thp_mode_reads_the_bracketed_choice(tmp_path):
    path = tmp_path / "enabled"
    path.write_text("always [madvise] never\n")
    assert hugepages.thp_mode(str(path)) == "madvise"
    path.write_text("[always] madvise never\n")
    assert hugepages.thp_mode(str(path)) == "always"
    assert hugepages.thp_mode(str(tmp_path / "missing")) is None
