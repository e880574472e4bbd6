"""Builds the Python entry of each op of op_table: one function per op, with the schema's arguments.

An entry takes the schema's arguments by name or position (``mode`` for the schema's ``t_mode``), except the
members of a group, which it takes as one keyword argument (``amp``: :class:`~fastsam.ops.groups.AmpArgs`,
``grad``: :class:`~fastsam.ops.groups.GradArgs`), and ``impl``. It picks the implementation from the lead
argument's device and hands every argument on in schema order: an optional list left out as an empty list,
a group's members in their places. An in-place op on an empty lead list does nothing.

The function is generated from source (not a ``*args`` wrapper) so that it has a real signature for help()
and IDEs, and so that torch.compile traces it as plain code.
"""
from __future__ import annotations

from typing import Callable, List, Set

from fastsam.ops import op_table
from fastsam.ops._dispatch import backend, resolve_impl
from fastsam.ops.groups import AmpArgs, GradArgs

# keyword -> (group type, its members as the schemas name them)
GROUPS = {
    "grad": (GradArgs, ("grads_b", "grads_c", "coef")),
    "amp": (AmpArgs, ("inv_scale", "found_inf")),
}
MEMBER_GROUP = {m: k for k, (_, members) in GROUPS.items() for m in members}  # member -> its group's keyword


def _list(x):
    return [] if x is None else x


def _wrong_type(op: str, keyword: str, value) -> None:
    kind = GROUPS[keyword][0]
    raise TypeError(f"{op}: {keyword} must be a fastsam.ops.{kind.__name__} or None, got {type(value).__name__}")


def _not_taken(op: str, keyword: str, member: str) -> None:
    raise ValueError(f"{op} takes no {keyword}.{member}")


def _unpack(spec: op_table.OpSpec, keyword: str, names: List[str], lists: Set[str]) -> List[str]:
    """Source lines binding the members of group ``keyword`` that the op takes: absent (None, or [] for a list)
    without the group, else the group's values after its type check and a check that it sets no member the
    op lacks. Decided here, once: a call runs plain attribute reads."""
    kind, members = GROUPS[keyword]
    taken = [m for m in members if m in names]
    absent = ", ".join("[]" if m in lists else "None" for m in taken)
    given = ", ".join(f"_list({keyword}.{m})" if m in lists else f"{keyword}.{m}" for m in taken)
    lines = [f"    if {keyword} is None:", f"        {', '.join(taken)}, = {absent},", "    else:",
             f"        if not isinstance({keyword}, {kind.__name__}):",
             f"            _wrong_type({spec.name!r}, {keyword!r}, {keyword})"]
    for m in members:
        if m not in taken:
            lines += [f"        if {keyword}.{m} is not None:",
                      f"            _not_taken({spec.name!r}, {keyword!r}, {m!r})"]
    return lines + [f"        {', '.join(taken)}, = {given},"]


def _source(spec: op_table.OpSpec) -> str:
    names = op_table.argument_names(spec)
    params: List[str] = []
    for name in names:
        if name in MEMBER_GROUP:
            continue
        if name in spec.optional_lists:
            params.append(f"{name}=None")
        elif name in spec.defaults:
            params.append(f"{name}={spec.defaults[name]!r}")
        elif params and "=" in params[-1]:
            raise ValueError(f"op_table: {spec.name}: {name} has no default but follows one that has")
        else:
            params.append(name)
    keywords = [k for k, (_, members) in GROUPS.items() if any(m in names for m in members)]
    signature = params + ["*"] + [f"{k}=None" for k in keywords] + ['impl="auto"']
    lines = [f"def {spec.name}({', '.join(signature)}):"]
    for k in keywords:
        lines += _unpack(spec, k, names, op_table.list_arguments(spec))
    lead = spec.lead
    if spec.family == op_table.IN_PLACE:
        lines.append(f"    if len({lead}) == 0:\n        return None")
        device = f"{lead}[0].device"
    else:
        device = f"{lead}.device"
    args = [f"_list({n})" if n in spec.optional_lists else n for n in names]
    lines.append(f"    impl = _resolve(impl, {device})")
    lines.append(f"    return _backend(impl, {spec.family!r}).{spec.name}({', '.join(args)})")
    return "\n".join(lines) + "\n"


def make_entry(spec: op_table.OpSpec) -> Callable:
    """The fastsam.ops function of one op."""
    scope = {"_wrong_type": _wrong_type, "_not_taken": _not_taken, "_list": _list, "_resolve": resolve_impl,
             "_backend": backend, "AmpArgs": AmpArgs, "GradArgs": GradArgs}
    exec(compile(_source(spec), f"<fastsam.ops.{spec.name}>", "exec"), scope)
    fn = scope[spec.name]
    fn.__module__ = "fastsam.ops"
    fn.__doc__ = spec.doc
    return fn

