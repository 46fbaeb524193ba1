"""Bounds on the work one chat-template render may do: a checkpoint's template is untrusted code.

Jinja's sandbox keeps a template away from Python's internals, but not from running for hours
(nested loops, recursive macros) or building huge values (`'A' * 2**28`, `'x'|center(10**9)`,
a string doubled in a loop). `LimitedSandbox` adds three limits to every render that runs
inside `limited(limits)`:

- a deadline (`TemplateLimits.timeout`), checked at every loop iteration, call, filter,
  attribute lookup, operator and write, so a runaway template stops within the deadline
  (a single C-level operation on an allowed size may overrun it by a fraction of a second);
- a size cap (`max_value`) on every value a template builds with `*`, `+`, `%`, `~`, calls and
  filters, checked *before* the work where it could amplify (repeats, widths, joins,
  replaces, formats); sizes are measured deeply, as text: a list holding one long string N
  times counts N times, as printing it would;
- a cap (`max_output`) on all the text written, the buffers of `{% set %}` blocks and macro
  bodies included.

A template past a limit raises `TemplateLimitError` naming the limit. The checks hook the
sandbox's operator and call interception and rewrite the parsed template so that loop
iterables, `~` and writes go through two guard filters; rendering is otherwise unchanged.

Not here: the Jinja environment transformers' templates expect and the messages they read
(chat_template.py, which subclasses `LimitedSandbox`).
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Callable, Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.visitor import NodeTransformer

from weightsmith.errors import WeightsmithError

__all__ = ["LimitedSandbox", "TemplateLimitError", "TemplateLimits", "limited"]


@dataclass(frozen=True)
class TemplateLimits:
    """What one render may do. The defaults are far above any real chat template's needs
    (they render in milliseconds and write little more than the messages)."""

    timeout: float = 5.0  # seconds for the whole render
    max_value: int = 8 << 20  # characters (deep) of any value the template builds
    max_output: int = 16 << 20  # characters written in all, block and macro buffers included

    def __post_init__(self) -> None:
        if not self.timeout > 0 or self.max_value < 1 or self.max_output < 1:
            raise ValueError(f"template limits must be positive, got {self}")


class TemplateLimitError(WeightsmithError):
    """A chat template went past a render limit (time, value size or output size)."""


_BUDGET: ContextVar[_Budget | None] = ContextVar("weightsmith_template_budget", default=None)
_NUMBER = re.compile(r"\d+")
_INT_BITS = 1 << 16  # the largest integer a template may build, in bits


class _Budget:
    """One render's clock and counters."""

    def __init__(self, limits: TemplateLimits) -> None:
        self.limits = limits
        self.deadline = time.monotonic() + limits.timeout
        self.written = 0

    def tick(self) -> None:
        if time.monotonic() > self.deadline:
            raise TemplateLimitError(
                f"the render took longer than {self.limits.timeout:g} s (its time limit); "
                "the template loops or recurses too much"
            )

    def value(self, size: int, what: str) -> None:
        if size > self.limits.max_value:
            raise TemplateLimitError(
                f"{what} would build a value of more than {self.limits.max_value} characters "
                "(the limit on one value)"
            )

    def write(self, value: Any) -> None:
        self.written += deep_size(value, self.limits.max_output - self.written + 1)
        if self.written > self.limits.max_output:
            raise TemplateLimitError(
                f"the template wrote more than {self.limits.max_output} characters (its output limit)"
            )


@contextlib.contextmanager
def limited(limits: TemplateLimits) -> Iterator[None]:
    """Renders with a `LimitedSandbox` inside this block obey `limits` (from now on)."""
    token = _BUDGET.set(_Budget(limits))
    try:
        yield
    finally:
        _BUDGET.reset(token)


def deep_size(value: Any, stop: int) -> int:
    """About how many characters `value` takes as text (strings by length, containers by their
    items, 2 per item for separators); counting stops soon after passing `stop`."""
    total, todo = 0, [value]
    while todo and total <= stop:
        item = todo.pop()
        if isinstance(item, str):
            total += len(item)
        elif isinstance(item, Mapping):
            total += 2 + 2 * len(item)
            todo.extend(item.keys())
            todo.extend(item.values())
        elif isinstance(item, (list, tuple, set, frozenset)):
            total += 2 + 2 * len(item)
            todo.extend(item)
        elif isinstance(item, int) and not isinstance(item, bool):
            total += item.bit_length() // 3 + 1
        else:
            total += 8
    return total


def _budget() -> _Budget | None:
    budget = _BUDGET.get()
    if budget is not None:
        budget.tick()
    return budget


def _check_args(budget: _Budget, what: str, args: tuple, kwargs: dict) -> None:
    """Every argument is a bounded value, and no number asks for a bigger one (a width, a count)."""
    limit = budget.limits.max_value
    for arg in (*args, *kwargs.values()):
        if isinstance(arg, int) and not isinstance(arg, bool) and abs(arg) > limit:
            raise TemplateLimitError(f"{what}: the number {arg} is over the limit on one value ({limit})")
        budget.value(deep_size(arg, limit), what)


def _materialized(value: Any) -> Any:
    # An iterator (a `map` filter's output) is read once to be measured, so the work gets the list.
    return list(value) if isinstance(value, Iterator) else value


def _amplified_size(name: str, obj: Any, args: tuple, kwargs: dict, limit: int) -> int:
    """The size a join, replace, indent or format would build (0 for other operations);
    `obj` is the string a method belongs to, or the value a filter filters."""
    if name in ("join", "join filter"):
        # str.join(items) or items|join(sep)
        sep, items = (obj, args[0] if args else ()) if name == "join" else (args[0] if args else "", obj)
        items = list(items) if isinstance(items, (str, list, tuple, dict)) else []
        total = deep_size(sep, limit) * len(items)
        for item in items:
            total += deep_size(item, limit)
            if total > limit:
                break
        return total
    if name.startswith("replace") and isinstance(obj, str) and len(args) >= 2:
        old, new = str(args[0]), str(args[1])
        return len(obj) + (obj.count(old) if old else len(obj) + 1) * len(new)
    if name == "indent filter" and isinstance(obj, str):
        width = args[0] if args else kwargs.get("width", 4)
        return len(obj) + (obj.count("\n") + 1) * (len(width) if isinstance(width, str) else 0)
    if name in ("format", "format_map", "format filter") and isinstance(obj, str):
        widths = [int(n) for n in _NUMBER.findall(obj)]
        per_field = max(max(widths, default=0), deep_size((args, kwargs), limit))
        return len(obj) + per_field * (obj.count("{") + obj.count("%"))
    return 0


def _guard_call(budget: _Budget, name: str, obj: Any, args: tuple, kwargs: dict) -> None:
    what = f"the {name}" if name.endswith(" filter") else f"{name}()"
    _check_args(budget, what, (obj, *args), kwargs)
    budget.value(_amplified_size(name, obj, args, kwargs, budget.limits.max_value), what)


def _binop_size(operator: str, left: Any, right: Any, limit: int) -> int:
    """The size `left operator right` would have, before computing it."""
    if operator == "*":
        if isinstance(right, (str, list, tuple)):
            left, right = right, left
        if isinstance(left, (str, list, tuple)) and isinstance(right, int):
            return deep_size(left, limit) * max(right, 0)
        if isinstance(left, int) and isinstance(right, int):
            return (abs(left).bit_length() + abs(right).bit_length()) * limit // _INT_BITS
    if operator == "**" and isinstance(left, int) and isinstance(right, int) and right > 0:
        bits = abs(left).bit_length()
        return bits * right * limit // _INT_BITS if bits > 1 else 0
    if operator == "+" and isinstance(left, (str, list, tuple)):
        return deep_size(left, limit) + deep_size(right, limit)
    if operator == "%" and isinstance(left, str):
        widths = [int(n) for n in _NUMBER.findall(left)]
        per_field = max(max(widths, default=0), deep_size(right, limit))
        return len(left) + per_field * left.count("%")
    return 0


def _passed(func: Callable, context: Any) -> tuple:
    """What a Jinja filter wants before its value (`pass_context` and friends)."""
    kind = getattr(func, "jinja_pass_arg", None)
    name = getattr(kind, "name", None)
    return {"context": (context,), "eval_context": (context.eval_ctx,),
            "environment": (context.environment,)}.get(name, ())  # fmt: skip


def _guard_filter(name: str, func: Callable) -> Callable:
    @jinja2.pass_context  # also keeps Jinja from running it at compile time, outside any budget
    def guarded(context: Any, value: Any, *args: Any, **kwargs: Any) -> Any:
        budget = _budget()
        if budget is None:
            return func(*_passed(func, context), value, *args, **kwargs)
        value, args = _materialized(value), tuple(_materialized(a) for a in args)
        _guard_call(budget, f"{name} filter", value, args, kwargs)
        result = func(*_passed(func, context), value, *args, **kwargs)
        budget.value(deep_size(result, budget.limits.max_value), f"the {name} filter")
        return result

    return guarded


@jinja2.pass_context
def _guard_iter(context: Any, iterable: Any) -> Iterator[Any]:
    for item in iterable:
        budget = _budget()
        if budget is not None:
            budget.value(deep_size(item, budget.limits.max_value), "a loop item")
        yield item


@jinja2.pass_context
def _guard_value(context: Any, value: Any) -> Any:
    budget = _budget()
    if budget is not None:
        budget.value(deep_size(value, budget.limits.max_value), "'~'")
    return value


@jinja2.pass_context
def _guard_write(context: Any, value: Any) -> Any:
    budget = _budget()
    if budget is not None:
        budget.write(value)
    return value


_ITER, _VALUE, _WRITE = "weightsmith_loop", "weightsmith_value", "weightsmith_write"


class _Rewrite(NodeTransformer):
    """Route loop iterables, `~` and writes through the guard filters."""

    def _filter(self, node: nodes.Expr, name: str) -> nodes.Filter:
        return nodes.Filter(node, name, [], [], None, None, lineno=node.lineno)

    def visit_For(self, node: nodes.For) -> nodes.For:
        self.generic_visit(node)
        node.iter = self._filter(node.iter, _ITER)
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Filter:
        self.generic_visit(node)
        node.nodes = [self._filter(n, _VALUE) for n in node.nodes]
        return self._filter(node, _VALUE)

    def visit_Output(self, node: nodes.Output) -> nodes.Output:
        self.generic_visit(node)
        node.nodes = [self._filter(n, _WRITE) for n in node.nodes]
        return node


class LimitedSandbox(ImmutableSandboxedEnvironment):
    """An immutable sandbox whose renders obey the `TemplateLimits` of the `limited` block
    they run in (outside one, it is the plain immutable sandbox)."""

    intercepted_binops = frozenset({"*", "+", "%", "**"})

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.guard_filters()

    def guard_filters(self) -> None:
        """Wrap every filter registered so far in the limits (call again after adding filters)."""
        for name, func in list(self.filters.items()):
            if name not in (_ITER, _VALUE, _WRITE) and not getattr(func, "weightsmith_guarded", False):
                guarded = _guard_filter(name, func)
                guarded.weightsmith_guarded = True  # type: ignore[attr-defined]
                self.filters[name] = guarded
        self.filters.update({_ITER: _guard_iter, _VALUE: _guard_value, _WRITE: _guard_write})

    def _parse(self, source: str, name: str | None, filename: str | None) -> nodes.Template:
        tree = _Rewrite().visit(super()._parse(source, name, filename))
        tree.set_environment(self)
        return tree

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        budget = _budget()
        if budget is not None:
            budget.value(_binop_size(operator, left, right, budget.limits.max_value), f"'{operator}'")
        return super().call_binop(context, operator, left, right)

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        budget = _budget()
        if budget is None:
            return super().call(__context, __obj, *args, **kwargs)
        target = getattr(__obj, "__wrapped__", __obj)  # the sandbox wraps str.format
        name = getattr(target, "__name__", type(target).__name__)
        owner = getattr(target, "__self__", None)
        args = tuple(_materialized(a) for a in args)
        visible = {k: v for k, v in kwargs.items() if not k.startswith("_")}  # not Jinja's _loop_vars
        _guard_call(
            budget, name, owner if isinstance(owner, (str, list, tuple, dict)) else None, args, visible
        )
        result = super().call(__context, __obj, *args, **kwargs)
        budget.value(deep_size(result, budget.limits.max_value), f"{name}()")
        return result

    def getattr(self, obj: Any, attribute: str) -> Any:
        _budget()
        return super().getattr(obj, attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        _budget()
        return super().getitem(obj, argument)
