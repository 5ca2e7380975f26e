"""The package's argument checks: what they accept, and errors that name the argument."""

import numpy as np
import pytest

from stn_model.checks import check_bool, check_int, check_positive_ints, check_size


@pytest.mark.parametrize(("value", "minimum"), [(1, 1), (7, 1), (2, 2), (0, 0)])
def test_check_int_returns_integers_at_or_above_the_minimum(value, minimum):
    assert check_int(value, "units", minimum=minimum) is value


@pytest.mark.parametrize("value", [0, -3, 2.5, True, "4", None])
def test_check_int_rejects_non_integers_bools_and_small_values(value):
    with pytest.raises(ValueError, match=rf"^units must be an integer >= 1, got {value!r}$"):
        check_int(value, "units")


def test_numpy_integers_pass_check_int_as_ints():
    for value in (np.int64(10), np.int32(10), np.uint8(10)):
        assert type(check_int(value, "num_classes", minimum=2)) is int
    with pytest.raises(ValueError, match=r"^units must be an integer >= 1, got True$"):
        check_int(np.bool_(True), "units")


def test_check_bool_accepts_bools_only():
    assert check_bool(np.bool_(False), "align_corners") is False
    assert check_bool(True, "align_corners") is True
    for bad in ("False", 0, 1, None):
        with pytest.raises(ValueError, match=rf"^align_corners must be True or False, got {bad!r}"):
            check_bool(bad, "align_corners")


def test_check_int_names_its_minimum():
    with pytest.raises(ValueError, match=r"^classes must be an integer >= 2, got 1$"):
        check_int(1, "classes", minimum=2)


def test_check_size_converts_to_ints_and_names_the_argument():
    assert check_size([28.0, 14], "image_size") == (28, 14)
    with pytest.raises(ValueError, match=r"^image_size must be \(height, width\)"):
        check_size((28,), "image_size")
    with pytest.raises(ValueError, match=r"^output_size must be positive, got \(0, 3\)$"):
        check_size((0, 3))


def test_check_positive_ints_checks_length_and_sign():
    assert check_positive_ints([60, 60, 1], "input_shape", 3) == (60, 60, 1)
    for bad in ([60, 60], [60, 0, 1], "abc"):
        with pytest.raises(ValueError, match=r"^input_shape must be 3 positive integers"):
            check_positive_ints(bad, "input_shape", 3)


def test_integral_floats_and_numpy_integers_are_accepted():
    assert check_size((np.int64(28), 14.0)) == (28, 14)
    assert check_positive_ints((np.float32(42.0), np.int32(42), 1), "input_shape", 3) == (42, 42, 1)
    assert all(type(v) is int for v in check_positive_ints((42.0, np.int64(4), 1), "shape", 3))


@pytest.mark.parametrize("bad", [28.7, 28.5, float("nan"), float("inf"), True, "28", None])
def test_non_integral_sizes_are_rejected_not_truncated(bad):
    with pytest.raises(ValueError, match=r"^output_size must be \(height, width\) integers, got"):
        check_size((bad, 14))
    with pytest.raises(ValueError, match=r"^input_shape must be 3 positive integers, got"):
        check_positive_ints([42, bad, 1], "input_shape", 3)
