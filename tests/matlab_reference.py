"""Literal, one-value-at-a-time MATLAB formulas that the vectorised code is held against."""


def matlab_cubic(x: float) -> float:
    """MATLAB's ``cubic`` (Keys, a = -0.5) for one value."""
    a = abs(x)
    if a <= 1:
        return 1.5 * a**3 - 2.5 * a**2 + 1
    if a <= 2:
        return -0.5 * a**3 + 2.5 * a**2 - 4 * a + 2
    return 0.0
