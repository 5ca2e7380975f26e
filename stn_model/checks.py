"""Argument checks shared by the package: each returns the checked value or raises a ValueError
that names the argument and what it got."""


def check_int(value, name, minimum=1):
    """`value` if it is an integer (not a bool) >= `minimum`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def check_size(value, name="output_size"):
    """(height, width) as positive ints."""
    try:
        height, width = (int(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be (height, width), got {value!r}") from None
    if height <= 0 or width <= 0:
        raise ValueError(f"{name} must be positive, got {value!r}")
    return height, width


def check_positive_ints(values, name, length):
    """`values` as a tuple of `length` positive ints."""
    try:
        values = tuple(int(v) for v in values)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be {length} positive integers, got {values!r}") from None
    if len(values) != length or min(values) <= 0:
        raise ValueError(f"{name} must be {length} positive integers, got {values!r}")
    return values
