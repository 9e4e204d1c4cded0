"""The graph walker: runs each node's op rule in topological order, over geometry or banks."""

from __future__ import annotations

import sys
import weakref
from collections import Counter
from collections.abc import Iterator

from ..errors import NotDecodable, PhaseDependent
from ..graph.geometry import Geometry
from ..graph.model import STANDARD_DOMAINS, Model, ancestors
from ..graph.patterns import ChannelGate, SelfGated, TokenScale
from .engine import memory_of, references, root_of
from .ops import RULES
from .ops._rule import NO_BANK_RULE
from .values import Blocked, Const, Layout, Tensor


class Context:
    """What an op rule may ask about the graph while it runs."""

    def __init__(self, model: Model, engine, rows: dict | None, substitution=None, gates: dict | None = None,
                 values: dict | None = None):
        self.model, self.engine, self._rows = model, engine, rows or {}
        self._substitution, self._gates, self._values = substitution, gates or {}, values if values is not None else {}

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

    def pattern(self, node):
        """The export pattern ``node`` completes (``graph.patterns``: SelfGated, ChannelGate), or None."""
        return self.model.patterns.get(node.output[0])

    def value(self, name: str):
        """The value of a tensor the walk has already computed (a pattern reads beyond its node's inputs)."""
        return _lookup(name, self._values, self.model)

    def held_gate(self, node):
        """The per-channel values a ChannelGate Mul is held at: the reference input's in ``weights`` mode, the
        mean over the images in ``fds`` (None in a geometry-only walk)."""
        return self._gates.get(node.output[0])

    def substitute(self, node, weight):
        """The weight to compose ``node`` with: its own (``weights`` mode) or the substituted one (``fds``)."""
        return weight if self._substitution is None else self._substitution.weight(node, weight)


def walk(model: Model, engine, targets=None, compose: bool = False, rows: dict | None = None, usage: dict | None = None,
         substitution=None, gates: dict | None = None, held: Held | None = None) -> Iterator:
    """Yield ``(node, value of its first output)`` in order; banks are freed once consumed, and written in place
    by the node that reads them last (``Engine.overwritable``) unless a target's (``held``).

    ``targets`` (tensor names) limits the walk to their ancestors; ``rows`` maps a target
    to the only channels its bank needs; ``substitution`` (fds mode) supplies substituted weights; ``gates``
    the values channel gates are held at (Mul output -> [C]; default: those of ``substitution``);
    ``usage["peak"]`` receives the largest total size
    (bytes) of the banks alive at once, known from geometry alone.
    """
    nodes = ancestors(model, targets) if targets else model.nodes
    reads = {id(node): _reads(node, model) for node in nodes}
    uses = Counter(name for node in nodes for name in reads[id(node)])
    c, h, w = model.input_shape[1:]
    engine.image_channels = c
    values = {model.input_name: Tensor(Geometry(), c, (h, w), engine.identity(c) if compose else None)}
    if gates is None and substitution is not None:
        gates = substitution.gates
    ctx = Context(model, engine, rows, substitution, gates, values)
    usage = {} if usage is None else usage
    memory = _Memory(engine)
    memory.hold(values[model.input_name], [], None)
    usage["peak"] = memory.peak
    held = Held() if held is None else held  # the memory of the targets' banks: the caller may keep them
    in_place = compose and bool(targets)  # a whole-graph walk's caller may hold any value
    for node in nodes:
        inputs = [_lookup(name, values, model) for name in node.input]
        if in_place:
            engine.overwritable = _read_last(reads[id(node)], uses, values, held)
        try:
            value = _apply(node, inputs, ctx, model)
        finally:
            engine.overwritable = frozenset()
        outputs = value if isinstance(value, list) else [value]  # a multi-output rule (Split) gives one per output
        if isinstance(value, Blocked) and len(node.output) > 1:
            outputs = [value] * len(node.output)
        rule = RULES.get(node.op_type)
        memory.read(rule, node, model, inputs, outputs)
        for index, name in enumerate(node.output):
            if not name:
                continue
            if index < len(outputs) and outputs[index] is not None:
                values[name] = outputs[index]
                memory.hold(outputs[index], inputs, rule)
            else:
                values[name] = Blocked(f"{node.op_type} node {model.node_name(node)!r}: output {index} "
                                       f"({name!r}) is not followed")
        for name in node.output:
            if targets and name in targets and name in values:  # a target's filters are made
                memory.make(values[name])
        usage["peak"] = max(usage["peak"], memory.peak)
        if in_place:
            held.add(values[name] for name in node.output if name in targets and name in values)
        yield node, values[node.output[0]]
        for name in reads[id(node)]:
            uses[name] -= 1
            if uses[name] == 0 and name in values:
                memory.drop(values.pop(name))


class _Memory:
    """The bytes of the banks alive at once, from geometry alone (``usage["peak"]``): each bank a block counted
    once however many values hold it (an identity's output is its input's value, a reshape's its source's), a
    concatenation's stack its inputs' blocks (``engine.Stacked``), and a block of its own once a node reads it
    that makes its filters (``OpRule.reads_stack``) or it is a target."""

    def __init__(self, engine):
        self.engine, self.size, self.refs, self.bytes, self.peak = engine, [], Counter(), 0, 0
        self.blocks, self.names, self.stacks = {}, Counter(), {}  # by the id of a value (alive while held)

    def hold(self, value, inputs, rule) -> None:
        """A name now holds ``value``, the output of a node with ``rule`` that read ``inputs``."""
        key = id(value)
        if self.names[key] == 0:
            source = value.source if isinstance(value, Layout) else value
            stacked = [v for v in inputs if id(v) in self.stacks]
            if id(source) in self.blocks:
                blocks = set(self.blocks[id(source)])
                if id(source) in self.stacks:
                    self.stacks[key] = self.stacks[id(source)]
            elif rule is not None and (rule.stacks or (rule.keeps_stack and stacked)):
                blocks = set().union(*(self.blocks.get(id(v), set()) for v in inputs))
                self.stacks[key] = _bank_bytes(source, self.engine)
            else:
                blocks = {self._new(_bank_bytes(source, self.engine))}
            self.blocks[key] = blocks
            self._count(blocks, 1)
        self.names[key] += 1

    def read(self, rule, node, model, inputs, outputs) -> None:
        """The stacks a node (of ``rule``) reads that it does not pass on as they are nor read as pieces get their
        filters."""
        for value in inputs:
            passed = any(value is out for out in outputs)
            if id(value) in self.stacks and not passed and not (rule is not None and rule.reads_stack(node, model)):
                self.make(value)

    def make(self, value) -> None:
        """A stack's filters made: a block of its size, held with it."""
        key = id(value)
        if self.stacks.get(key):
            block = self._new(self.stacks[key])
            self.stacks[key] = 0  # made once
            self.blocks[key].add(block)
            self._count({block}, 1)

    def drop(self, value) -> None:
        """A name let ``value`` go (one ``hold`` never saw, such as a Blocked made in the walk's loop, held nothing)."""
        key = id(value)
        if key not in self.blocks:
            return
        self.names[key] -= 1
        if self.names[key] == 0:
            self._count(self.blocks.pop(key, set()), -1)
            self.stacks.pop(key, None)
            del self.names[key]

    def _new(self, nbytes: int) -> int:
        self.size.append(nbytes)
        return len(self.size) - 1

    def _count(self, blocks, step: int) -> None:
        for block in blocks:
            if self.refs[block] == 0 and step > 0:
                self.bytes += self.size[block]
            self.refs[block] += step
            if self.refs[block] == 0:
                self.bytes -= self.size[block]
        self.peak = max(self.peak, self.bytes)


def _filters(value):
    """The filters of the bank a value holds, or None."""
    bank = _bank(value)
    return None if bank is None else bank.filters


def _memory(value) -> set:
    """The memory (``engine.memory_of``) of the bank a value holds, if any: a stack's, its pieces' (none made)."""
    bank = _bank(value)
    return set() if bank is None else {memory_of(array) for _, array in references(bank)}


class Held:
    """The memory of the banks a walk gave its caller as targets' (the caller may hold them, so no rule overwrites
    them), for as long as it lives: weakly held, so that an id Python reuses for a new array once the caller drops
    a target's does not count. A caller that keeps only a copy of a target's filters says so (``handed``)."""

    def __init__(self):
        self._alive, self._ids = weakref.WeakValueDictionary(), set()

    def add(self, values) -> None:
        for value in values:
            filters = _filters(value)
            if filters is None:
                continue
            root = root_of(filters)
            try:
                self._alive[id(root)] = root
            except TypeError:  # an array type without weak references: its id, for the whole walk
                self._ids.add(id(root))

    def handed(self, value, kept) -> None:
        """What the caller keeps of target ``value`` is the array ``kept``: where that is a copy (cropped,
        selected, on the host), ``value``'s bank is released (a later rule may overwrite it)."""
        memory = _memory(value)
        if memory_of(kept) in memory:
            return
        for m in memory:
            self._alive.pop(m, None)
            self._ids.discard(m)

    def ids(self, values: dict, among: set) -> set:
        """The targets' memory the caller may hold: all of it but, of the memory ``among``, what nothing besides
        the walk's ``values`` refers to (a caller that dropped a target's filters, as one that streams all-neuron
        decodes does, lets a residual sum be written into that bank instead of a fresh one: ResNet50's layer4
        sums are 2-3 GB each)."""
        return self._ids | {key for key in list(self._alive.keys()) if key not in among or self._referred(key, values)}

    def _referred(self, key: int, values: dict) -> bool:
        """Whether anything but the walk's ``values`` refers to this target's memory: its reference count less
        the references the values' banks hold to it (one per distinct bank whose filters are it), against a probe
        held the same way, so that the count compares like with like on any interpreter. A view of it, the
        caller's or a value's, holds a reference this does not subtract: the error is on the side of copying."""
        root = self._alive.get(key)
        if root is None:
            return False
        holders = {id(holder) for bank in map(_bank, values.values()) if bank is not None
                   for holder, array in references(bank) if array is root}
        probe = object()
        return sys.getrefcount(root) - len(holders) > sys.getrefcount(probe)


def _bank(value):
    """The bank a value holds, or None."""
    tensor = value.source if isinstance(value, Layout) else value
    return tensor.bank if isinstance(tensor, Tensor) else None


def _read_last(reads: list[str], uses: Counter, values: dict, held: Held) -> frozenset:
    """The memory of the banks that only this node still reads (no other value, nor a target the caller still
    holds, holds it): its rule may overwrite them."""
    last = {name for name in reads if uses[name] == 1 and name in values}
    kept = held.ids(values, among={m for name in last for m in _memory(values[name])})
    for name, value in values.items():
        if name not in last:
            kept |= _memory(value)
    return frozenset(m for name in last for m in _memory(values[name]) if m not in kept)


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


def _reads(node, model) -> list[str]:
    """The tensors a node's rule reads: its inputs, and the x of a self-gated product (``graph.patterns``)."""
    pattern = model.patterns.get(node.output[0]) if node.output else None
    return list(node.input) + ([pattern.x] if isinstance(pattern, SelfGated) else [])


def _apply(node, inputs, ctx, model):
    pattern = ctx.pattern(node)
    needed = inputs
    if isinstance(pattern, SelfGated):  # reads its x, not the factors (a gate's branch may hold ops without rules)
        needed = []
    elif isinstance(pattern, (ChannelGate, TokenScale)):  # the gate's (scale's) value comes from onnxruntime
        needed = [v for name, v in zip(node.input, inputs) if name == pattern.x]
    label = f"{node.op_type} node {model.node_name(node)!r}"
    rule = RULES.get(node.op_type)
    blocked = [v for v in needed if isinstance(v, Blocked)]
    if blocked and (not all(v.per_position for v in blocked) or (rule is not None and rule.implements("apply"))):
        return next((v for v in blocked if not v.per_position), blocked[0])
    if node.domain not in STANDARD_DOMAINS:
        return Blocked(f"{label}: an op of the {node.domain!r} domain, not standard ONNX (for onnxruntime's quantized "
                       "contrib ops: quantize in QDQ format, onnxruntime.quantization.QuantFormat.QDQ)")
    if rule is None:
        return Blocked(f"{label}: {NO_BANK_RULE}")
    try:
        return rule.apply(node, inputs, ctx)
    except PhaseDependent as exc:
        return Blocked(f"{label}: {exc}", per_position=True)
    except NotDecodable as exc:
        return Blocked(f"{label}: {exc}")
    except (KeyError, IndexError, ValueError, TypeError) as exc:
        return Blocked(f"{label}: malformed node ({type(exc).__name__}: {exc})")

