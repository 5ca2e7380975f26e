"""Argument checks shared by the package: each returns the checked value or raises a ValueError
that names the argument and what it got."""

import numbers

import numpy as np


def is_int(value, minimum=1):
    """Whether `value` is an integer (NumPy's too, not a bool) >= `minimum`."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= minimum


def check_int(value, name, minimum=1):
    """`value` as an int if it is an integer (NumPy's too, not a bool) >= `minimum`."""
    if not is_int(value, minimum):
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_bool(value, name):
    """`value` as a bool if it is one (NumPy's too); a string such as "False" is refused."""
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def _integral(value):
    """`value` as an int: an integer (NumPy's too, not a bool) or an integral float such as
    28.0; ValueError otherwise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(value)
    if isinstance(value, numbers.Integral) or float(value).is_integer():
        return int(value)
    raise ValueError(value)


def check_size(value, name="output_size"):
    """(height, width) as positive ints; integral floats such as 28.0 are accepted."""
    try:
        height, width = (_integral(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be (height, width) integers, got {value!r}") from None
    if height <= 0 or width <= 0:
        raise ValueError(f"{name} must be positive, got {value!r}")
    return height, width


def check_positive_ints(values, name, length):
    """`values` as a tuple of `length` positive ints; integral floats such as 28.0 are accepted."""
    try:
        ints = tuple(_integral(v) for v in values)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be {length} positive integers, got {values!r}") from None
    if len(ints) != length or min(ints) <= 0:
        raise ValueError(f"{name} must be {length} positive integers, got {values!r}")
    return ints
