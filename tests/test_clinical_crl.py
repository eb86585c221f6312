"""Tests for medjax.clinical.crl: hand-computed CRL and gestational-age values."""

import math

import numpy as np
import pytest

from medjax.clinical import crl


def test_crl_mm_scalar_and_batch():
    """Distance times spacing; a (B, 2) batch with per-image spacing broadcasts."""
    # (30, 40) apart -> 50 px; 50 px * 0.2 mm = 10 mm.
    assert crl.crl_mm((10.0, 20.0), (40.0, 60.0), 0.2) == pytest.approx(10.0)
    crown = np.array([[0.0, 0.0], [1.0, 1.0], [5.0, 5.0]])
    rump = np.array([[3.0, 4.0], [1.0, 1.0], [5.0, 17.0]])
    # 5 px * 0.5 = 2.5; 0 px -> 0; 12 px * 2 = 24.
    out = crl.crl_mm(crown, rump, np.array([0.5, 1.0, 2.0]))
    np.testing.assert_allclose(out, [2.5, 0.0, 24.0])
    with pytest.raises(ValueError, match="shape"):
        crl.crl_mm(np.zeros((3, 2)), np.zeros((3, 3)), 1.0)


def test_robinson_hand_value():
    """CRL 45 mm: 1.037 * 45 = 46.665, sqrt = 6.831179 (6.831179**2 = 46.665006),
    8.052 * 6.831179 = 55.004653, + 23.73 = 78.734653 days = 11 weeks (77) + 1.73 -> 11w1d."""
    ga = crl.ga_robinson_days(45.0)
    assert ga.days == pytest.approx(78.734653, abs=1e-5)
    assert ga.valid is True and ga.warning is None
    assert crl.format_ga(ga.days) == "11w1d"


def test_intergrowth_hand_values():
    """CRL 49 mm: sqrt = 7; 40.9041 + 3.21585 * 7 + 0.348956 * 49
    = 40.9041 + 22.51095 + 17.098844 = 80.513894 days -> 11w3d.
    CRL 45 mm: sqrt = 6.708204; 3.21585 * 6.708204 = 21.572578; 0.348956 * 45 = 15.70302;
    total 40.9041 + 21.572578 + 15.70302 = 78.179698 days."""
    ga = crl.ga_intergrowth_days(49.0)
    assert ga.days == pytest.approx(80.513894, abs=1e-6)
    assert ga.valid is True and ga.warning is None
    assert crl.format_ga(ga.days) == "11w3d"
    assert crl.ga_intergrowth_days(45).days == pytest.approx(78.179698, abs=1e-5)


def test_intergrowth_range_boundaries():
    """15 and 95 mm are valid; 14.9 and 95.1 are flagged with NaN days and a warning."""
    # 15 mm: 40.9041 + 3.21585 * 3.872983 + 0.348956 * 15 = 40.9041 + 12.454933 + 5.23434.
    low = crl.ga_intergrowth_days(15.0)
    assert low.valid and low.days == pytest.approx(58.593373, abs=1e-5)
    # 95 mm: 40.9041 + 3.21585 * 9.746794 + 0.348956 * 95 = 40.9041 + 31.344229 + 33.15082.
    high = crl.ga_intergrowth_days(95.0)
    assert high.valid and high.days == pytest.approx(105.399149, abs=1e-5)
    for value in (14.9, 95.1):
        ga = crl.ga_intergrowth_days(value)
        assert ga.valid is False and math.isnan(ga.days)
        assert ga.warning == f"CRL {value:.1f} mm is outside INTERGROWTH-21st's 15–95 mm range"


def test_extrapolate_keeps_value_but_flags():
    """extrapolate=True computes the formula outside the range and still flags it."""
    # 12 mm: sqrt(12) = 3.464102; 3.21585 * 3.464102 = 10.392306 + 0.747727 = 11.140033;
    # 40.9041 + 11.140033 + 0.348956 * 12 (= 4.187472) = 56.231605.
    ga = crl.ga_intergrowth_days(12.0, extrapolate=True)
    assert ga.days == pytest.approx(56.231605, abs=1e-5)
    assert ga.valid is False and "12.0 mm" in ga.warning
    # A negative length has no value even when extrapolating.
    assert math.isnan(crl.ga_intergrowth_days(-1.0, extrapolate=True).days)


def test_robinson_range():
    """Robinson flags outside [3, 85] mm."""
    assert crl.ga_robinson_days(3.0).valid and crl.ga_robinson_days(85.0).valid
    ga = crl.ga_robinson_days(90.0)
    assert not ga.valid and math.isnan(ga.days)
    assert ga.warning == "CRL 90.0 mm is outside Robinson–Fleming's 3–85 mm range"


def test_vectorised():
    """Arrays give per-element days and flags and one summarising warning."""
    values = np.array([[49.0, 12.0], [np.nan, 95.0]])
    ga = crl.ga_intergrowth_days(values)
    assert ga.days.shape == (2, 2) and ga.valid.shape == (2, 2)
    np.testing.assert_array_equal(ga.valid, [[True, False], [False, True]])
    assert ga.days[0, 0] == pytest.approx(80.513894, abs=1e-6)
    assert ga.days[1, 1] == pytest.approx(105.399149, abs=1e-5)
    assert np.isnan(ga.days[0, 1]) and np.isnan(ga.days[1, 0])
    assert ga.warning == (
        "2 of 4 CRL values (12.0, nan mm) are outside INTERGROWTH-21st's 15–95 mm range"
    )
    all_valid = crl.ga_robinson_days(np.array([10.0, 45.0]))
    assert all_valid.warning is None and all_valid.valid.all()
    assert all_valid.days[1] == pytest.approx(78.734653, abs=1e-5)


def test_format_ga():
    """Completed weeks and days; NaN gives n/a; negative raises."""
    assert crl.format_ga(0) == "0w0d"
    assert crl.format_ga(87.6) == "12w3d"  # 87 = 12 * 7 + 3
    assert crl.format_ga(84.0) == "12w0d"
    assert crl.format_ga(83.9999999) == "12w0d"  # A rounding error below a whole day.
    assert crl.format_ga(83.9) == "11w6d"
    assert crl.format_ga(float("nan")) == "n/a"
    with pytest.raises(ValueError):
        crl.format_ga(-1.0)
