"""The suite's one knob for a slow or busy machine: every wait bound is scaled by $QCRD_TEST_PATIENCE."""

import pytest

from qcrd_ray.testing import PATIENCE_ENV, patience


def test_patience_scales_every_bound_and_defaults_to_one(monkeypatch):
    monkeypatch.delenv(PATIENCE_ENV, raising=False)
    assert patience(120.0) == 120.0
    monkeypatch.setenv(PATIENCE_ENV, "2.5")
    assert patience(120.0) == 300.0


@pytest.mark.parametrize("bad", ["0", "-1", "nan"])
def test_a_patience_that_is_not_positive_is_refused(monkeypatch, bad):
    monkeypatch.setenv(PATIENCE_ENV, bad)
    with pytest.raises(ValueError, match=PATIENCE_ENV):
        patience(1.0)


def test_pytest_timeout_is_scaled_too(pytestconfig):
    assert pytestconfig.option.timeout == patience(900.0)  # pyproject's --timeout=900
