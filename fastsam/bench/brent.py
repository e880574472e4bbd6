"""Brent's bounded scalar minimisation (golden section + parabolic interpolation), without scipy.

Written from the textbook description of Brent's ``localmin`` (R. P. Brent, *Algorithms for Minimization
without Derivatives*, 1973, ch. 5), with the stopping rule and defaults of ``scipy.optimize.fminbound``
(``xtol`` 1e-5, ``maxfun`` 500; the first point at the golden section of the bracket), so the authors' CVaR
peer (:mod:`fastsam.bench.cvar_peers`) makes the same number of objective calls as with scipy.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

GOLDEN = (3.0 - math.sqrt(5.0)) / 2.0  # 0.381966...: the smaller golden-section fraction
SQRT_EPS = math.sqrt(2.220446049250313e-16)  # relative part of the tolerance, as scipy's fminbound


@dataclass(frozen=True)
class Minimum:
    """Result of :func:`fminbound`: the best point ``x``, ``fun = f(x)``, and the number of calls ``nfev``."""
    x: float
    fun: float
    nfev: int
    converged: bool  # False: stopped by maxfun


def fminbound(f: Callable[[float], float], lower: float, upper: float, xtol: float = 1e-5,
              maxfun: int = 500) -> Minimum:
    """Minimises ``f`` over ``[lower, upper]``; a unimodal ``f`` gets ``x`` within about ``xtol`` of its minimiser.

    Each iteration tries the minimum of the parabola through the three best points (x, w, v), and falls back
    to a golden-section step into the larger part of the bracket when that point is not acceptable (outside
    the bracket, or not a smaller move than the one before last). Stops when the bracket ``[a, b]`` around
    ``x`` is within ``2 tol`` of its midpoint, ``tol = SQRT_EPS |x| + xtol / 3``, or after ``maxfun`` calls.
    """
    if not lower <= upper:
        raise ValueError(f"fminbound: the bracket needs lower <= upper, got [{lower}, {upper}]")
    if maxfun < 1:
        raise ValueError(f"fminbound: maxfun must be positive, got {maxfun}")
    a, b = float(lower), float(upper)
    x = w = v = a + GOLDEN * (b - a)  # x: best so far; w: second best; v: the previous w
    fx = fw = fv = f(x)
    nfev = 1
    step = 0.0  # the step taken at the iteration before the last one (d): parabolic steps must shrink
    last = 0.0  # the last step
    while True:
        mid = 0.5 * (a + b)
        tol = SQRT_EPS * abs(x) + xtol / 3.0
        tol2 = 2.0 * tol
        if abs(x - mid) <= tol2 - 0.5 * (b - a):
            return Minimum(x, fx, nfev, True)
        if nfev >= maxfun:
            return Minimum(x, fx, nfev, False)
        parabolic = False
        if abs(step) > tol:
            # the vertex of the parabola through (x, fx), (w, fw), (v, fv) is x + p / q
            r = (x - w) * (fx - fv)
            q = (x - v) * (fx - fw)
            p = (x - v) * q - (x - w) * r
            q = 2.0 * (q - r)
            if q > 0.0:
                p = -p
            else:
                q = -q
            before_last, step = step, last
            # accept it when it lies inside (a, b) and moves less than half the step before last
            if abs(p) < abs(0.5 * q * before_last) and q * (a - x) < p < q * (b - x):
                last = p / q
                u = x + last
                if u - a < tol2 or b - u < tol2:  # too near an end of the bracket: step tol towards the middle
                    last = tol if x < mid else -tol
                parabolic = True
        if not parabolic:  # golden section of the larger part of the bracket
            step = (b - x) if x < mid else (a - x)
            last = GOLDEN * step
        u = x + (last if abs(last) >= tol else math.copysign(tol, last))  # never closer than tol to x
        fu = f(u)
        nfev += 1
        if fu <= fx:  # u is the new best: the old x bounds the bracket on the far side of u
            if u < x:
                b = x
            else:
                a = x
            v, fv, w, fw, x, fx = w, fw, x, fx, u, fu
        else:  # x stays the best: u bounds the bracket on its side
            if u < x:
                a = u
            else:
                b = u
            if fu <= fw or w == x:
                v, fv, w, fw = w, fw, u, fu
            elif fu <= fv or v == x or v == w:
                v, fv = u, fu
