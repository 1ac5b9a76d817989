"""Integer arithmetic of sizes and tiles, as the kernels do it (kernels/common.cuh: ceil_div)."""


def ceil_div(a: int, b: int) -> int:
    """ceil(a / b) for a >= 0, b > 0, in integers."""
    return -(-a // b)


def round_up(a: int, multiple: int) -> int:
    """The smallest multiple of `multiple` that is >= a."""
    return ceil_div(a, multiple) * multiple
