"""The package's argument checks: what they accept, and errors that name the argument."""

import pytest

from stn_model.checks import check_int, check_positive_ints, check_size


@pytest.mark.parametrize(("value", "minimum"), [(1, 1), (7, 1), (2, 2), (0, 0)])
def test_check_int_returns_integers_at_or_above_the_minimum(value, minimum):
    assert check_int(value, "units", minimum=minimum) is value


@pytest.mark.parametrize("value", [0, -3, 2.5, True, "4", None])
def test_check_int_rejects_non_integers_bools_and_small_values(value):
    with pytest.raises(ValueError, match=rf"^units must be an integer >= 1, got {value!r}$"):
        check_int(value, "units")


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
