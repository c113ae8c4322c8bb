"""Derived-feature expressions: safe arithmetic over an iteration's features.

An expression (``d2h_bytes / 8``, ``min(a, b) * 2``) is parsed with :mod:`ast`, checked
against a whitelist (numbers, feature names, ``+ - * / // % **``, unary minus, ``min``,
``max``, ``abs``, ``first``: the first argument whose names are all present, for an
engine that passes the same quantity through one function or another) and turned into
nested closures once; it is never passed to ``eval``.
"""

from __future__ import annotations

import ast
import math
from collections.abc import Callable, Mapping
from functools import lru_cache
from typing import Any

MAX_EXPR_CHARS = 512
"""Longest derived-feature expression accepted (keeps evaluation trivially bounded)."""


def _first(*values: Any) -> Any:
    """Stands in for ``first()`` in the whitelist; :func:`_closure` evaluates it lazily."""
    return values[0]


_FUNCS: dict[str, Callable[..., Any]] = {"min": min, "max": max, "abs": abs, "first": _first}
_BINOPS: dict[type[ast.operator], Callable[[Any, Any], Any]] = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,
    ast.Div: lambda a, b: a / b,
    ast.FloorDiv: lambda a, b: a // b,
    ast.Mod: lambda a, b: a % b,
    # always in floating point: an integer power could grow without bound
    ast.Pow: lambda a, b: math.pow(a, b),
}


@lru_cache(maxsize=1024)
def compile_expression(expr: str) -> ast.Expression:
    """Parse and whitelist a derived expression; ValueError says what is not allowed."""
    if not isinstance(expr, str):
        raise ValueError("expression must be a string")
    if len(expr) > MAX_EXPR_CHARS:
        raise ValueError(f"expression longer than {MAX_EXPR_CHARS} characters")
    if not expr.strip():
        raise ValueError("expression is empty")
    try:
        tree = ast.parse(expr.strip(), mode="eval")
    except SyntaxError as exc:
        raise ValueError(f"not an arithmetic expression: {exc.msg}") from None
    except (ValueError, RecursionError, MemoryError):
        raise ValueError("not an arithmetic expression") from None
    try:
        _check_node(tree.body)
    except RecursionError:
        raise ValueError("expression nested too deeply") from None
    return tree


def _check_node(node: ast.expr) -> None:
    """Raise ValueError unless ``node`` is numbers, names, + - * / // % **, unary -, calls."""
    if isinstance(node, ast.Constant):
        if isinstance(node.value, bool) or not isinstance(node.value, (int, float)):
            raise ValueError(f"{ast.unparse(node)!r} is not a number")
    elif isinstance(node, ast.Name):
        if node.id in _FUNCS:
            raise ValueError(f"{node.id} must be called: {node.id}(...)")
    elif isinstance(node, ast.UnaryOp):
        if not isinstance(node.op, ast.USub):
            raise ValueError(f"{ast.unparse(node)!r}: only unary minus is allowed")
        _check_node(node.operand)
    elif isinstance(node, ast.BinOp):
        if type(node.op) not in _BINOPS:
            raise ValueError(f"{ast.unparse(node)!r}: operator not allowed "
                             "(only + - * / // % **)")
        _check_node(node.left)
        _check_node(node.right)
    elif isinstance(node, ast.Call):
        func = node.func
        if not isinstance(func, ast.Name) or func.id not in _FUNCS:
            raise ValueError(f"call of {ast.unparse(func)}() is not allowed "
                             "(only min(), max(), abs(), first())")
        if node.keywords or any(isinstance(a, ast.Starred) for a in node.args):
            raise ValueError(f"{func.id}() takes plain positional arguments only")
        if func.id == "abs" and len(node.args) != 1:
            raise ValueError("abs() takes exactly one argument")
        if func.id != "abs" and len(node.args) < 2:
            raise ValueError(f"{func.id}() takes at least two arguments")
        for arg in node.args:
            _check_node(arg)
    elif isinstance(node, ast.Attribute):
        if not isinstance(node.value, ast.Name) or node.value.id in _FUNCS or \
                node.attr.startswith("__"):
            raise ValueError(f"{ast.unparse(node)!r}: attribute access is not allowed "
                             "(a dotted name is one feature: probe.argument, calls.probe)")
    else:
        raise ValueError(f"{ast.unparse(node)!r} is not safe arithmetic "
                         f"({type(node).__name__} not allowed)")


_Closure = Callable[[Mapping[str, float]], Any]


@lru_cache(maxsize=1024)
def feature_names(expr: str) -> frozenset[str]:
    """Feature names ``expr`` reads: identifiers, and dotted names such as
    ``decode.n_tokens`` (the features of a probe's arguments and calls)."""
    tree = compile_expression(expr)
    dotted = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    names = {n.id for n in ast.walk(tree)
             if isinstance(n, ast.Name) and n.id not in _FUNCS and id(n) not in dotted}
    names |= {_dotted(n) for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    return frozenset(names)


def _dotted(node: ast.Attribute) -> str:
    assert isinstance(node.value, ast.Name)  # _check_node allows nothing else
    return f"{node.value.id}.{node.attr}"


@lru_cache(maxsize=1024)
def closure_of(expr: str) -> _Closure:
    """``expr`` as nested closures: evaluated without dispatching on node types.

    Why: the engine evaluates the profile's derived features once per iteration; the
    whitelisted tree is turned into Python closures once, and never into code for eval.
    """
    return _closure(compile_expression(expr).body)


def _closure(node: ast.expr) -> _Closure:
    if isinstance(node, ast.Constant):
        constant = node.value
        return lambda values: constant
    if isinstance(node, (ast.Name, ast.Attribute)):
        name = node.id if isinstance(node, ast.Name) else _dotted(node)

        def lookup(values: Mapping[str, float]) -> Any:
            value = values[name]
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{name} is not a number")
            return value
        return lookup
    if isinstance(node, ast.UnaryOp):
        operand = _closure(node.operand)
        return lambda values: -operand(values)
    if isinstance(node, ast.BinOp):
        op, left, right = _BINOPS[type(node.op)], _closure(node.left), _closure(node.right)
        return lambda values: op(left(values), right(values))
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) \
            and node.func.id == "first":
        options = [_closure(a) for a in node.args]

        def first(values: Mapping[str, float]) -> Any:
            for option in options[:-1]:
                try:
                    return option(values)
                except KeyError:  # a name it reads is missing: the next one
                    continue
            return options[-1](values)
        return first
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
        func, args = _FUNCS[node.func.id], [_closure(a) for a in node.args]
        return lambda values: func(*(a(values) for a in args))
    raise ValueError(f"unexpected node {type(node).__name__}")  # pragma: no cover
