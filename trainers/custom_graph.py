"""Custom losses sent as graphs (Tinker's `CustomLossGraph`), rebuilt from an allow-list.

SDK 0.38's `ServiceClient.create_custom_loss(fn, input_ranks)` traces a per-datum loss
`fn(logprobs, *inputs) -> (loss, {"custom/<name>:sum|mean": metric, ...})` with torch.fx and
sends its nodes as JSON: `{"format": 1, "nodes": [{op, name, target, args, kwargs}, ...]}`,
arguments encoded as `{"ref": node}`, `{"tuple": [...]}`, `{"dict": {...}}`, `{"slice": [...]}`,
`{"ellipsis": true}`, `{"float": "inf"}`, `{"dtype": "float32"}`, `{"device": ...}`, ...
`build` turns that data back into a callable. Nothing the client names is imported, evaluated
or looked up on a module or object: every function, Tensor method and attribute comes from
the explicit tables below (`FUNCTIONS`, `METHODS`, `ATTRIBUTES`); anything else, a
`call_module` or `get_attr` node, a reference to a node that is not an earlier one, a metric
key not of the form `custom/<name>:sum|mean`, or a malformed node is an `InvalidRequestError`
that names the node and its target. No eval, exec, import or pickle is involved.

How a loss runs (as the SDK's client-side `run_loss_handle`): once per datum, on the
trainer's target logprobs of that datum (`[N]`, or `[N, K]` with top-K targets) and the
datum's `loss_fn_inputs` named by the declared inputs, each at its declared rank. The
per-datum losses are summed; `:sum` metrics are summed and `:mean` metrics averaged over the
datums, next to `loss:sum` (the summed loss).

Limits: at most `MAX_NODES` nodes, `MAX_INPUTS` inputs (`logprobs` included), arguments nested
at most `MAX_DEPTH` deep. Python arithmetic without a tensor operand takes numbers only, so a
graph cannot build huge strings or integers. `{"device": ...}` stands for the trainer's device.

The trainer gets a loss as plain data, `loss_fn_config = {"name", "inputs", "graph"}` with
`loss_fn="custom"` (the server puts it there in place of the SDK's `loss_id`), and keeps the
last rebuilt graphs by the hash of that data (`from_config`).
"""

from __future__ import annotations

import hashlib
import json
import math
import operator
import re
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from rl.errors import InvalidRequestError
from rl.types import TensorData
from trainers.losses import merge_metrics

CUSTOM = "custom"  # the loss_fn of a graph loss
CONFIG_KEYS = ("name", "inputs", "graph")  # its loss_fn_config
MAX_NODES = 1000
MAX_INPUTS = 16
MAX_DEPTH = 8
_CACHE_SIZE = 64
INPUT_NAME = re.compile(r"[a-z_][a-z0-9_]{0,63}")
METRIC_KEY = re.compile(r"custom/[a-z0-9_./-]{1,64}:(sum|mean)")
_OPS = ("placeholder", "get_attr", "call_function", "call_method", "call_module", "output")

# -- the allow-list --------------------------------------------------------------------------
# Names are the targets as the SDK sends them (torch.fx's qualified names, `_operator.` spelt
# `operator.`). Each table is built from literal names only.

_TORCH = (
    "abs", "add", "all", "amax", "amin", "any", "argmax", "argmin", "cat", "ceil", "clamp",
    "clamp_max", "clamp_min", "clip", "count_nonzero", "cumprod", "cumsum", "detach", "diff",
    "div", "dot", "eq", "erf", "exp", "exp2", "expm1", "flatten", "flip", "float_power", "floor",
    "fmax", "fmin", "full_like", "gather", "ge", "gt", "isfinite", "isnan", "le", "lerp", "log",
    "log10", "log1p", "log2", "log_softmax", "logaddexp", "logical_and", "logical_not",
    "logical_or", "logical_xor", "logit", "logsumexp", "lt", "masked_fill", "matmul", "max",
    "maximum", "mean", "min", "minimum", "mul", "nan_to_num", "ne", "neg", "numel", "ones_like",
    "pow", "prod", "reciprocal", "relu", "reshape", "roll", "round", "rsqrt", "sigmoid", "sign",
    "softmax", "sort", "sqrt", "square", "squeeze", "stack", "std", "sub", "sum", "t", "tanh",
    "topk", "transpose", "trunc", "unsqueeze", "var", "where", "xlogy", "zeros_like",
)  # fmt: skip
_FUNCTIONAL = (
    "binary_cross_entropy_with_logits", "cross_entropy", "huber_loss", "kl_div", "l1_loss",
    "log_softmax", "mse_loss", "nll_loss", "normalize", "relu", "sigmoid", "silu",
    "smooth_l1_loss", "softmax", "tanh",
)  # fmt: skip
_MATH = ("ceil", "exp", "fabs", "floor", "isfinite", "log", "log1p", "sqrt", "tanh")
_METHODS = (
    "abs", "add", "all", "amax", "amin", "any", "argmax", "argmin", "bool", "ceil", "clamp",
    "clamp_max", "clamp_min", "clip", "clone", "contiguous", "count_nonzero", "cumprod",
    "cumsum", "detach", "diff", "dim", "div", "double", "eq", "exp", "exp2", "expand_as", "expm1",
    "flatten", "flip", "float", "floor", "gather", "ge", "gt", "int", "isfinite", "isnan", "le",
    "lerp", "log", "log10", "log1p", "log2", "log_softmax", "logical_and", "logical_not",
    "logical_or", "logsumexp", "long", "lt", "masked_fill", "max", "maximum", "mean", "min",
    "minimum", "mul", "nan_to_num", "ne", "neg", "numel", "pow", "prod", "reciprocal", "relu",
    "reshape", "reshape_as", "roll", "round", "rsqrt", "sigmoid", "sign", "size", "softmax",
    "sort", "sqrt", "square", "squeeze", "std", "sub", "sum", "t", "tanh", "to", "topk",
    "transpose", "trunc", "type_as", "unsqueeze", "var", "view", "view_as", "where", "xlogy",
)  # fmt: skip

ATTRIBUTES: dict[str, Callable[[torch.Tensor], Any]] = {
    "shape": lambda t: t.shape,
    "ndim": lambda t: t.ndim,
    "dtype": lambda t: t.dtype,
    "device": lambda t: t.device,
    "T": lambda t: t.T,
    "mT": lambda t: t.mT,
}

_MAX_INT = 2**53


def _numbers_only(label: str, args: tuple[Any, ...]) -> None:
    """Python arithmetic with no tensor operand takes plain numbers (no strings, sequences or
    huge integers), so a graph cannot build an unbounded value."""
    if any(isinstance(a, torch.Tensor) for a in args):
        return
    for a in args:
        if not isinstance(a, (bool, int, float)) or (isinstance(a, int) and abs(a) > _MAX_INT):
            raise TypeError(f"{label} takes tensors or numbers, got {type(a).__name__} {a!r:.40}")


def _arithmetic(label: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    def guarded(*args: Any) -> Any:
        _numbers_only(label, args)
        return fn(*args)

    return guarded


def _pow(base: Any, exponent: Any) -> Any:
    _numbers_only("operator.pow", (base, exponent))
    if isinstance(base, int) and isinstance(exponent, int) and abs(exponent) > 64:
        raise TypeError(f"operator.pow: integer exponent {exponent} is too large")
    return base**exponent


def _getitem(container: Any, index: Any) -> Any:
    if not isinstance(container, (torch.Tensor, tuple, list)):  # torch.Size is a tuple
        raise TypeError(f"operator.getitem: cannot index a {type(container).__name__}")
    return container[index]


_ARITHMETIC: dict[str, Callable[..., Any]] = {
    "add": operator.add, "sub": operator.sub, "mul": operator.mul, "truediv": operator.truediv,
    "floordiv": operator.floordiv, "mod": operator.mod, "neg": operator.neg,
    "pos": operator.pos, "abs": operator.abs, "and_": operator.and_, "or_": operator.or_,
    "xor": operator.xor, "invert": operator.invert, "matmul": operator.matmul,
}  # fmt: skip
_COMPARISONS = {
    "lt": operator.lt, "gt": operator.gt, "le": operator.le, "ge": operator.ge,
    "eq": operator.eq, "ne": operator.ne,
}  # fmt: skip

FUNCTIONS: dict[str, Callable[..., Any]] = {
    **{f"torch.{name}": getattr(torch, name) for name in _TORCH},
    **{f"torch.nn.functional.{name}": getattr(F, name) for name in _FUNCTIONAL},
    # torch.fx names these by the C functions they are
    "torch._C._nn.log_sigmoid": F.logsigmoid,
    "torch._C._nn.softplus": F.softplus,
    "torch._C._nn.gelu": F.gelu,
    "torch._C._special.special_expit": torch.special.expit,
    **{f"math.{name}": getattr(math, name) for name in _MATH},
    **{f"operator.{name}": _arithmetic(f"operator.{name}", fn) for name, fn in _ARITHMETIC.items()},
    **{f"operator.{name}": fn for name, fn in _COMPARISONS.items()},
    "operator.pow": _pow,
    "operator.getitem": _getitem,
}
METHODS: dict[str, Callable[..., Any]] = {name: getattr(torch.Tensor, name) for name in _METHODS}
_GETATTR = ("getattr", "builtins.getattr")  # only with a name from ATTRIBUTES

_DTYPES = {
    "float32": torch.float32, "float": torch.float32, "float64": torch.float64,
    "double": torch.float64, "float16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "int64": torch.int64, "long": torch.int64,
    "int32": torch.int32, "int": torch.int32, "bool": torch.bool,
}  # fmt: skip
_LAYOUTS = {"strided": torch.strided}
_MEMORY_FORMATS = {
    "contiguous_format": torch.contiguous_format,
    "preserve_format": torch.preserve_format,
}
_FLOATS = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}


# -- the rebuilt graph -----------------------------------------------------------------------


@dataclass(frozen=True)
class LossInput:
    """A parameter of the loss: `logprobs` first, then `loss_fn_inputs` keys."""

    name: str
    rank: int  # 0: scalar, 1: [N], 2: [N, K]


@dataclass(frozen=True)
class _Ref:
    slot: int  # the node's place in the values of a run


@dataclass(frozen=True)
class _Slice:
    start: Any
    stop: Any
    step: Any


class _Device:
    """`{"device": ...}`: the device the loss runs on."""


_DEVICE = _Device()


@dataclass(frozen=True)
class _Step:
    name: str
    label: str  # "op target", for errors
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    dynamic: bool  # whether args/kwargs hold references to fill in


class CustomGraph:
    """A rebuilt custom loss. Calling it runs one datum: `(logprobs, *inputs)` in the order
    of `inputs` -> (scalar loss, {metric key: scalar tensor})."""

    def __init__(
        self,
        name: str,
        inputs: tuple[LossInput, ...],
        steps: list[_Step],
        loss: _Ref,
        metrics: dict[str, _Ref],
    ):
        self.name = name
        self.inputs = inputs
        self._steps = steps
        self._loss = loss
        self._metrics = metrics

    @property
    def input_names(self) -> tuple[str, ...]:
        """The `loss_fn_inputs` keys the loss reads, in its parameter order."""
        return tuple(i.name for i in self.inputs[1:])

    def __call__(self, *values: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        env: list[Any] = [*values, *([None] * len(self._steps))]
        device = values[0].device
        for slot, step in enumerate(self._steps, start=len(values)):
            args, kwargs = step.args, step.kwargs
            if step.dynamic:
                args, kwargs = _fill(args, env, device), _fill(kwargs, env, device)
            try:
                env[slot] = step.fn(*args, **kwargs)
            except torch.OutOfMemoryError:
                raise
            except (
                RuntimeError,
                TypeError,
                ValueError,
                IndexError,
                OverflowError,
                ZeroDivisionError,
            ) as e:
                raise InvalidRequestError(
                    f"custom loss {self.name!r}: node {step.name!r} ({step.label}) failed: {e}"
                ) from None
        loss = env[self._loss.slot]
        if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
            shape = list(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise InvalidRequestError(
                f"custom loss {self.name!r} must return a scalar tensor as its loss, got {shape}"
            )
        metrics = {}
        for key, ref in self._metrics.items():
            value = env[ref.slot]
            if not isinstance(value, torch.Tensor) or value.numel() != 1:
                raise InvalidRequestError(
                    f"custom loss {self.name!r}: metric {key!r} must be a one-value tensor"
                )
            metrics[key] = value
        return loss, metrics

    def datum_inputs(
        self, where: str, loss_fn_inputs: Mapping[str, TensorData], length: int
    ) -> dict[str, torch.Tensor]:
        """A datum's `target_tokens` and the inputs the loss reads, checked against the
        declared ranks; other keys are ignored. `where` names the datum in errors."""
        missing = [k for k in ("target_tokens", *self.input_names) if k not in loss_fn_inputs]
        if missing:
            raise InvalidRequestError(
                f"{where}: loss_fn_inputs is missing {missing}, read by custom loss {self.name!r}"
            )
        targets = loss_fn_inputs["target_tokens"].to_numpy()
        field = f"{where}: loss_fn_inputs['target_tokens']"
        if targets.ndim == 0 or targets.shape[0] != length:
            raise InvalidRequestError(
                f"{field} has shape {list(targets.shape)} but model_input has {length} tokens"
            )
        if targets.ndim != self.inputs[0].rank:
            raise InvalidRequestError(
                f"{field} has rank {targets.ndim}, but custom loss {self.name!r} declares "
                f"logprobs (which has the shape of target_tokens) with rank {self.inputs[0].rank}"
            )
        out = {"target_tokens": torch.from_numpy(targets.astype(np.int64))}
        for declared in self.inputs[1:]:
            array = loss_fn_inputs[declared.name].to_numpy()
            if declared.rank == 0 and array.shape == (1,):
                array = array.reshape(())  # protobuf cannot tell a scalar from one value
            if array.ndim != declared.rank:
                raise InvalidRequestError(
                    f"{where}: loss_fn_inputs[{declared.name!r}] has rank {array.ndim} (shape "
                    f"{list(array.shape)}), but custom loss {self.name!r} declares it with rank "
                    f"{declared.rank}"
                )
            out[declared.name] = torch.as_tensor(array)
        self._dry_run(where, out)
        return out

    def _dry_run(self, where: str, inputs: Mapping[str, torch.Tensor]) -> None:
        """Runs the loss once on zero logprobs, so that a graph that fails on this datum's
        inputs (shapes that do not broadcast, an index out of range) or has no gradient fails
        before the model runs, and alone: in a shared pass it would fail the others' calls."""
        logprobs = torch.zeros(inputs["target_tokens"].shape, requires_grad=True)
        try:
            with torch.enable_grad():
                loss, _ = self(logprobs, *(inputs[name] for name in self.input_names))
        except InvalidRequestError as e:
            raise InvalidRequestError(f"{where}: {e}") from None
        if not loss.requires_grad:
            raise InvalidRequestError(
                f"{where}: custom loss {self.name!r} does not depend on logprobs: it has no "
                "gradient"
            )

    def batch_loss(
        self,
        logprobs_D: Sequence[torch.Tensor],
        inputs_D: Sequence[Mapping[str, torch.Tensor]],
        device: torch.device,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """The summed loss over datums (their target logprobs and `datum_inputs`), and the
        metrics: `loss:sum`, `:sum` metrics summed, `:mean` metrics averaged over datums."""
        total: torch.Tensor | None = None
        reported: list[dict[str, float]] = []
        for logprobs, inputs in zip(logprobs_D, inputs_D, strict=True):
            args = [inputs[name].to(device) for name in self.input_names]
            loss, metrics = self(logprobs, *args)
            total = loss if total is None else total + loss
            reported.append({key: float(value.detach()) for key, value in metrics.items()})
        assert total is not None, "a batch has at least one datum"
        detached = torch.is_grad_enabled() and not total.requires_grad
        if detached and any(lp.requires_grad for lp in logprobs_D):
            raise InvalidRequestError(
                f"custom loss {self.name!r} does not depend on logprobs: it has no gradient"
            )
        return total, {"loss:sum": float(total.detach()), **merge_metrics(reported)}


def _fill(value: Any, env: list[Any], device: torch.device) -> Any:
    """An encoded argument with its references replaced by their values."""
    if isinstance(value, _Ref):
        return env[value.slot]
    if isinstance(value, tuple):
        return tuple(_fill(v, env, device) for v in value)
    if isinstance(value, list):
        return [_fill(v, env, device) for v in value]
    if isinstance(value, dict):
        return {k: _fill(v, env, device) for k, v in value.items()}
    if isinstance(value, _Slice):
        return slice(*(_fill(v, env, device) for v in (value.start, value.stop, value.step)))
    if value is _DEVICE:
        return device
    return value


# -- building ----------------------------------------------------------------------------------


def from_config(config: Mapping[str, Any] | None) -> CustomGraph:
    """The rebuilt loss of a `custom` call's `loss_fn_config` ({"name", "inputs", "graph"}),
    from the cache when the same data was rebuilt before."""
    if not isinstance(config, Mapping) or sorted(config) != sorted(CONFIG_KEYS):
        got = sorted(config) if isinstance(config, Mapping) else type(config).__name__
        raise InvalidRequestError(
            f"loss_fn {CUSTOM!r} takes a loss_fn_config with keys {list(CONFIG_KEYS)} (a graph "
            f"made by create_custom_loss), got {got}"
        )
    try:
        text = json.dumps(config, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise InvalidRequestError(f"custom loss config is not plain JSON data: {e}") from None
    key = hashlib.sha256(text.encode()).hexdigest()
    graph = _CACHE.get(key)
    if graph is None:
        graph = build(config["name"], config["inputs"], config["graph"])
        _CACHE[key] = graph
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    else:
        _CACHE.move_to_end(key)
    return graph


_CACHE: OrderedDict[str, CustomGraph] = OrderedDict()


def build(name: Any, inputs: Any, graph: Any) -> CustomGraph:
    """Rebuilds a loss from its wire form: `name` (for messages), `inputs` ([{name, rank}],
    `logprobs` first) and `graph` ({format: 1, nodes: [...]}). Raises InvalidRequestError
    (naming the node and its target) for anything outside the allow-list or malformed."""
    if not isinstance(name, str) or not 0 < len(name) <= 256:
        raise InvalidRequestError("a custom loss needs a name of 1 to 256 characters")
    declared = _inputs(name, inputs)
    nodes = _nodes(name, graph)
    where = f"custom loss {name!r}"
    if len(nodes) < len(declared) + 1:
        raise InvalidRequestError(
            f"{where}: the graph has {len(nodes)} nodes; it needs a placeholder per input "
            f"({len(declared)}) and an output"
        )
    slots: dict[str, int] = {}
    for i, (node, loss_input) in enumerate(zip(nodes, declared, strict=False)):
        if node["op"] != "placeholder" or node["target"] != loss_input.name:
            raise InvalidRequestError(
                f"{where}: node {i} ({node['name']!r}) must be the placeholder of input "
                f"{loss_input.name!r} (inputs come first, in their declared order), got "
                f"{node['op']} {node['target']!r}"
            )
        slots[node["name"]] = i
    steps: list[_Step] = []
    for node in nodes[len(declared) : -1]:
        steps.append(_step(where, node, slots))
        slots[node["name"]] = len(declared) + len(steps) - 1
    loss, metrics = _output(where, nodes[-1], slots)
    return CustomGraph(name, declared, steps, loss, metrics)


def _inputs(name: str, inputs: Any) -> tuple[LossInput, ...]:
    where = f"custom loss {name!r}"
    if not isinstance(inputs, list) or not 1 <= len(inputs) <= MAX_INPUTS:
        raise InvalidRequestError(
            f"{where}: inputs must be a list of 1 to {MAX_INPUTS} {{name, rank}} entries "
            "(logprobs first)"
        )
    out = []
    for i, entry in enumerate(inputs):
        if not isinstance(entry, Mapping) or sorted(entry) != ["name", "rank"]:
            raise InvalidRequestError(f"{where}: inputs[{i}] must be {{name, rank}}, got {entry!r}")
        input_name, rank = entry["name"], entry["rank"]
        if not isinstance(input_name, str) or not INPUT_NAME.fullmatch(input_name):
            raise InvalidRequestError(
                f"{where}: inputs[{i}] name {input_name!r} must match {INPUT_NAME.pattern}"
            )
        if isinstance(rank, bool) or rank not in (0, 1, 2):
            raise InvalidRequestError(
                f"{where}: input {input_name!r} has rank {rank!r}; ranks are 0, 1 or 2"
            )
        out.append(LossInput(input_name, rank))
    if out[0].name != "logprobs" or out[0].rank == 0:
        raise InvalidRequestError(
            f"{where}: the first input must be logprobs with rank 1 or 2, got "
            f"{out[0].name!r} with rank {out[0].rank}"
        )
    names = [i.name for i in out]
    if len(set(names)) != len(names):
        raise InvalidRequestError(f"{where}: input names repeat: {names}")
    return tuple(out)


def _nodes(name: str, graph: Any) -> list[dict[str, Any]]:
    """The graph's nodes, each with op, name, target, args and kwargs of the right types and
    a unique name."""
    where = f"custom loss {name!r}"
    if not isinstance(graph, Mapping) or not set(graph) <= {"format", "nodes"}:
        raise InvalidRequestError(f"{where}: the graph must be {{format: 1, nodes: [...]}}")
    if graph.get("format", 1) != 1:
        raise InvalidRequestError(
            f"{where}: graph format {graph.get('format')!r}; this server reads 1"
        )
    nodes = graph.get("nodes")
    if not isinstance(nodes, list) or not nodes:
        raise InvalidRequestError(f"{where}: the graph has no nodes list")
    if len(nodes) > MAX_NODES:
        raise InvalidRequestError(
            f"{where}: the graph has {len(nodes)} nodes; this server takes at most {MAX_NODES}"
        )
    out, seen = [], set()
    for i, node in enumerate(nodes):
        if not isinstance(node, Mapping) or not {"op", "name", "target"} <= set(node):
            raise InvalidRequestError(f"{where}: node {i} must have op, name and target")
        node = {"args": [], "kwargs": {}, **node}
        unknown = sorted(set(node) - {"op", "name", "target", "args", "kwargs"})
        op, node_name, target = node["op"], node["name"], node["target"]
        if unknown or not all(isinstance(v, str) for v in (op, node_name, target)):
            raise InvalidRequestError(
                f"{where}: node {i} must have string op, name and target, a list of args and a "
                f"dict of kwargs{f' and nothing else (got {unknown})' if unknown else ''}"
            )
        if not isinstance(node["args"], list) or not isinstance(node["kwargs"], Mapping):
            raise InvalidRequestError(
                f"{where}: node {node_name!r}: args must be a list, kwargs a dict"
            )
        if op not in _OPS:
            raise InvalidRequestError(f"{where}: node {node_name!r} has unknown op {op!r}")
        if node_name in seen or not 0 < len(node_name) <= 128:
            raise InvalidRequestError(
                f"{where}: node {i} name {node_name!r} is empty, too long or not unique"
            )
        seen.add(node_name)
        out.append(node)
    return out


def _step(where: str, node: dict[str, Any], slots: dict[str, int]) -> _Step:
    """One computing node, checked against the allow-list."""
    op, node_name, target = node["op"], node["name"], node["target"]
    label = f"{op} {target!r}"
    at = f"{where}: node {node_name!r} ({label})"
    if op == "call_module":
        raise InvalidRequestError(f"{at}: calls a module; custom losses use functions only")
    if op == "get_attr":
        raise InvalidRequestError(
            f"{at}: reads a captured attribute; a custom loss reads only its inputs"
        )
    if op in ("placeholder", "output"):
        raise InvalidRequestError(
            f"{at}: misplaced; placeholders come first (one per input) and the output last"
        )
    args = tuple(_decode(at, a, slots, 0) for a in node["args"])
    kwargs = {}
    for key, value in node["kwargs"].items():
        if key == "out":
            raise InvalidRequestError(f"{at}: the out= argument is not allowed")
        kwargs[key] = _decode(at, value, slots, 0)
    fn: Callable[..., Any]
    if op == "call_method":
        if target not in METHODS:
            raise InvalidRequestError(f"{at}: Tensor method {target!r} is not in the allow-list")
        if not args or not isinstance(args[0], _Ref):
            raise InvalidRequestError(f"{at}: a method call needs a node as its receiver")
        fn = _method(target, METHODS[target])
    elif target in _GETATTR:
        attribute = args[1] if len(args) == 2 and isinstance(args[0], _Ref) else None
        if not isinstance(attribute, str) or attribute not in ATTRIBUTES:
            raise InvalidRequestError(
                f"{at}: getattr reads only {sorted(ATTRIBUTES)} of a tensor, got {node['args']!r:.80}"
            )
        fn, args = _attribute(attribute), args[:1]
    elif target in FUNCTIONS:
        fn = FUNCTIONS[target]
    else:
        raise InvalidRequestError(f"{at}: function {target!r} is not in the allow-list")
    dynamic = _has_refs(args) or _has_refs(kwargs)
    return _Step(node_name, label, fn, args, kwargs, dynamic)


def _method(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    def call(receiver: Any, *args: Any, **kwargs: Any) -> Any:
        if not isinstance(receiver, torch.Tensor):
            raise TypeError(f"method {name!r} called on a {type(receiver).__name__}, not a tensor")
        return fn(receiver, *args, **kwargs)

    return call


def _attribute(name: str) -> Callable[[Any], Any]:
    read = ATTRIBUTES[name]

    def get(receiver: Any) -> Any:
        if not isinstance(receiver, torch.Tensor):
            raise TypeError(f"attribute {name!r} read on a {type(receiver).__name__}")
        return read(receiver)

    return get


def _output(
    where: str, node: dict[str, Any], slots: dict[str, int]
) -> tuple[_Ref, dict[str, _Ref]]:
    """The output node: (loss, {metric key: node}), from `{"tuple": [loss, {"dict": ...}]}`."""
    if node["op"] != "output":
        raise InvalidRequestError(
            f"{where}: the last node ({node['name']!r}) must be the output, got {node['op']}"
        )
    at = f"{where}: output node {node['name']!r}"
    args = node["args"]
    returned = args[0] if len(args) == 1 and isinstance(args[0], Mapping) else None
    pair = returned.get("tuple") if returned is not None and len(returned) == 1 else None
    if not isinstance(pair, list) or len(pair) != 2:
        raise InvalidRequestError(f"{at}: the loss must return (loss, metrics)")
    loss = _decode(at, pair[0], slots, 0)
    metrics = _decode(at, pair[1], slots, 0)
    if not isinstance(loss, _Ref):
        raise InvalidRequestError(f"{at}: the returned loss must be a tensor computed by the graph")
    if not isinstance(metrics, dict):
        raise InvalidRequestError(f"{at}: the returned metrics must be a dict")
    for key, value in metrics.items():
        if not METRIC_KEY.fullmatch(key):
            raise InvalidRequestError(
                f"{at}: metric key {key!r} must match {METRIC_KEY.pattern} (the suffix says how "
                "it combines across datums)"
            )
        if not isinstance(value, _Ref):
            raise InvalidRequestError(
                f"{at}: metric {key!r} must be a tensor computed by the graph"
            )
    return loss, metrics


def _decode(at: str, value: Any, slots: dict[str, int], depth: int) -> Any:
    """An encoded argument as a template: constants, `_Ref`s to earlier nodes, containers."""
    if depth > MAX_DEPTH:
        raise InvalidRequestError(f"{at}: arguments are nested deeper than {MAX_DEPTH}")
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, list):
        return [_decode(at, v, slots, depth + 1) for v in value]
    if not isinstance(value, Mapping) or len(value) != 1:
        raise InvalidRequestError(f"{at}: argument {value!r:.80} is not an encoded value")
    ((kind, inner),) = value.items()
    if kind == "ref":
        if not isinstance(inner, str) or inner not in slots:
            raise InvalidRequestError(
                f"{at}: refers to {inner!r:.80}, which is not an earlier node"
            )
        return _Ref(slots[inner])
    if kind == "tuple" and isinstance(inner, list):
        return tuple(_decode(at, v, slots, depth + 1) for v in inner)
    if kind == "dict" and isinstance(inner, Mapping):
        return {str(k): _decode(at, v, slots, depth + 1) for k, v in inner.items()}
    if kind == "slice" and isinstance(inner, list) and len(inner) == 3:
        return _Slice(*(_decode(at, v, slots, depth + 1) for v in inner))
    if kind == "ellipsis" and inner is True:
        return Ellipsis
    if kind == "device":
        return _DEVICE
    for table_kind, table in (
        ("float", _FLOATS),
        ("dtype", _DTYPES),
        ("layout", _LAYOUTS),
        ("memory_format", _MEMORY_FORMATS),
    ):
        if kind == table_kind:
            if not isinstance(inner, str) or inner not in table:
                raise InvalidRequestError(
                    f"{at}: {kind} {inner!r:.40} is not one of {sorted(table)}"
                )
            return table[inner]
    raise InvalidRequestError(f"{at}: argument {value!r:.80} is not an encoded value")


def _has_refs(value: Any) -> bool:
    if isinstance(value, (_Ref, _Device)):
        return True
    if isinstance(value, (tuple, list)):
        return any(_has_refs(v) for v in value)
    if isinstance(value, dict):
        return any(_has_refs(v) for v in value.values())
    if isinstance(value, _Slice):
        return any(_has_refs(v) for v in (value.start, value.stop, value.step))
    return False
