"""The graph walker: runs each node's op rule in topological order, over geometry or banks."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

from ..errors import NotDecodable
from ..graph.geometry import Geometry
from ..graph.model import STANDARD_DOMAINS, Model, ancestors
from .ops import RULES
from .values import Blocked, Const, Tensor


class Context:
    """What an op rule may ask about the graph while it runs."""

    def __init__(self, model: Model, engine, rows: dict | None, substitution=None):
        self.model, self.engine, self._rows = model, engine, rows or {}
        self._substitution = substitution

    def shape(self, name: str):
        return self.model.shapes.get(name)

    def rank(self, name: str) -> int:
        shape = self.shape(name)
        return len(shape) if shape is not None else 4

    def spatial(self, name: str):
        shape = self.shape(name)
        if shape is None:
            raise NotDecodable(f"the shape of {name!r} could not be inferred")
        return tuple(shape[2:4]) if len(shape) == 4 else (1, 1)

    def producer(self, name: str):
        return self.model.producer.get(name)

    def rows(self, node):
        return self._rows.get(node.output[0])

    def held_gate(self, node):
        """fds: the per-channel mean of the gate a data x data Mul applies (None: no rule)."""
        return None if self._substitution is None else self._substitution.gates.get(node.output[0])

    def substitute(self, node, weight):
        """The weight to compose ``node`` with: its own (``weights`` mode) or the substituted one (``fds``)."""
        return weight if self._substitution is None else self._substitution.weight(node, weight)


def walk(model: Model, engine, targets=None, compose: bool = False, rows: dict | None = None, usage: dict | None = None,
         substitution=None) -> Iterator:
    """Yield ``(node, value of its first output)`` in order; banks are freed once consumed.

    ``targets`` (tensor names) limits the walk to their ancestors; ``rows`` maps a target
    to the only channels its bank needs; ``substitution`` (fds mode) supplies substituted weights;
    ``usage["peak"]`` receives the largest total size
    (bytes) of the banks alive at once, known from geometry alone.
    """
    nodes = ancestors(model, targets) if targets else model.nodes
    uses = Counter(name for node in nodes for name in node.input)
    c, h, w = model.input_shape[1:]
    engine.image_channels = c
    values = {model.input_name: Tensor(Geometry(), c, (h, w), engine.identity(c) if compose else None)}
    ctx = Context(model, engine, rows, substitution)
    usage = {} if usage is None else usage
    live = usage["peak"] = _bank_bytes(values[model.input_name], engine)
    for node in nodes:
        inputs = [_lookup(name, values, model) for name in node.input]
        value = _apply(node, inputs, ctx, model)
        values[node.output[0]] = value
        live += _bank_bytes(value, engine)
        usage["peak"] = max(usage["peak"], live)
        for extra in node.output[1:]:
            values[extra] = Blocked(f"{node.op_type} node {model.node_name(node)!r}: only its first output is followed")
        yield node, value
        for name in node.input:
            uses[name] -= 1
            if uses[name] == 0 and name in values:
                live -= _bank_bytes(values.pop(name), engine)


def _bank_bytes(value, engine) -> int:
    """Size of the bank a value holds (or would hold) when decoding."""
    if not isinstance(value, Tensor):
        return 0
    channels = value.channels if value.rows is None else len(value.rows)
    return channels * engine.image_channels * value.geom.rf[0] * value.geom.rf[1] * engine.dtype.itemsize


def _lookup(name, values, model):
    if not name:
        return None
    if name in values:
        return values[name]
    if name in model.constants:
        return Const(model.constants[name])
    return Blocked(f"tensor {name!r} is a model input other than the image")


def _apply(node, inputs, ctx, model):
    blocked = next((v for v in inputs if isinstance(v, Blocked)), None)
    if blocked is not None:
        return blocked
    label = f"{node.op_type} node {model.node_name(node)!r}"
    rule = RULES.get(node.op_type) if node.domain in STANDARD_DOMAINS else None
    if rule is None:
        return Blocked(f"{label}: no rule for this op (`fdsub inspect` lists what is decodable)")
    try:
        return rule.apply(node, inputs, ctx)
    except NotDecodable as exc:
        return Blocked(f"{label}: {exc}")
    except (KeyError, IndexError, ValueError, TypeError) as exc:
        return Blocked(f"{label}: malformed node ({type(exc).__name__}: {exc})")

