"""Checks of user arguments shared by the optimizers and the losses: errors name the argument."""
import math


def _check_number(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return float(value)


def _check_nonneg(name: str, value) -> float:
    if not _check_number(name, value) >= 0.0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    return float(value)


def _check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value
