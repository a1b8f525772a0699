"""Capture a model as a ``torch.fx.GraphModule``.

transformers 5.x models defeat ``torch.fx.symbolic_trace`` (their forward branches on data), but
``torch.export.export(..., strict=False)`` captures them exactly, with ``nn_module_stack`` metadata that maps
every node back to the module that owns it. moefx therefore captures every model with torch.export, with
dynamic batch and sequence dimensions, and adds four things:

* a batch's keys are checked against the forward's arguments, and a missing ``attention_mask`` the model
  would make itself is supplied (all ones), so that a batch that runs in eager mode is captured too;
* ``use_cache`` is switched off on every config in the model while tracing (a KV cache is not a graph output);
* ``Module.to()`` called inside ``forward`` is a no-op when it would change nothing (SwitchTransformers'
  router does this, and torch.export cannot swap parameters while tracing);
* a submodule whose ``forward`` branches on tensor data (a loop over the experts that tokens chose, an
  attention indexer's selection) cannot be traced by any tracer. Such a module is captured as an opaque
  ``call_module`` node (a leaf, as in symbolic_trace) with the arguments it was given. Its outputs' shapes
  come from an eager run on the example inputs, each dimension as symbolic as the first argument dimension
  of that size. The captured graph is checked against eager on the example inputs.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.export import Dim
from torch.utils import _pytree as pytree

from moefx.errors import CaptureError, MoefxError, first_line

_TENSOR = object()  # where a traced call's argument was a tensor


@dataclass
class _Opaque:
    """A module captured opaque: ``recorded`` holds, for each of its calls in an eager run, its tensor
    arguments' shapes and its output (tensors on the meta device); ``traced`` the argument structure of each
    traced call, with its tensors left out (``_TENSOR``), by its place in a run (torch.export may run the model
    more than once); ``calls`` counts the traced calls."""

    module: nn.Module
    recorded: list[tuple[list[torch.Size], Any]] = field(default_factory=list)
    traced: dict[int, tuple[pytree.TreeSpec, list[Any]]] = field(default_factory=dict)
    calls: int = 0

    def arguments(self, call: int, tensors: list[Any]) -> tuple[tuple, dict]:
        """Call ``call``'s ``(args, kwargs)`` with its tensors taken in order from ``tensors``."""
        spec, leaves = self.traced[call]
        given = iter(tensors)
        return pytree.tree_unflatten([next(given) if leaf is _TENSOR else leaf for leaf in leaves], spec)


_OPAQUE_MODULES: dict[int, _Opaque] = {}
_HANDLES = itertools.count()


def _tensors(tree: Any) -> list[torch.Tensor]:
    return [x for x in pytree.tree_leaves(tree) if isinstance(x, torch.Tensor)]


@torch.library.custom_op("moefx::opaque_module", mutates_args=())
def _opaque_module(inputs: list[torch.Tensor], handle: int, call: int) -> list[torch.Tensor]:
    opaque = _OPAQUE_MODULES[handle]
    args, kwargs = opaque.arguments(call, inputs)
    output = type(opaque.module).forward(opaque.module, *args, **kwargs)  # the class's: the instance's is the stand-in
    return [t.clone() for t in _tensors(output)]  # a custom op may not return its inputs


@_opaque_module.register_fake
def _(inputs: list[torch.Tensor], handle: int, call: int) -> list[torch.Tensor]:
    """Outputs shaped as in the eager run: a dimension of the first argument's size at the same place is that
    dimension (an experts container's output is shaped like its input), another dimension as symbolic as the
    first argument dimension of its size (so a batch or sequence length stays one), or else fixed. A guess,
    which the capture's check against eager tests on the example inputs."""
    shapes, output = _OPAQUE_MODULES[handle].recorded[call]
    sizes = [(size, fake.shape[d]) for shape, fake in zip(shapes, inputs, strict=True) for d, size in enumerate(shape)]

    def dim(d: int, n: int) -> Any:
        if d < len(shapes[0]) and shapes[0][d] == n:
            return inputs[0].shape[d]
        return next((sym for size, sym in sizes if size == n), n)

    return [torch.empty([dim(d, n) for d, n in enumerate(t.shape)], dtype=t.dtype, device=inputs[0].device)
            for t in _tensors(output)]  # fmt: skip


try:  # the data-dependent failures that mean "this forward loops over data"
    from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

    _DATA_DEPENDENT: tuple[type[BaseException], ...] = (GuardOnDataDependentSymNode,)
except ImportError:  # pragma: no cover - older torch
    _DATA_DEPENDENT = ()


def normalize_inputs(example_inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Split example inputs into positional and keyword arguments.

    A tensor is one positional argument, a tuple or list is the positional arguments, and a mapping (a
    transformers batch, say) is the keyword arguments.
    """
    if isinstance(example_inputs, torch.Tensor):
        args, kwargs = (example_inputs,), {}
    elif isinstance(example_inputs, (tuple, list)):
        args, kwargs = tuple(example_inputs), {}
    elif isinstance(example_inputs, dict) or hasattr(example_inputs, "keys"):
        args, kwargs = (), dict(example_inputs)
    else:
        raise MoefxError(
            f"example inputs must be a tensor, a tuple of arguments or a dict of keyword arguments, "
            f"not {type(example_inputs).__name__}"
        )
    if not any(isinstance(x, torch.Tensor) for x in pytree.tree_leaves((args, kwargs))):
        raise MoefxError("example inputs hold no tensor: pass a batch the model can run, e.g. {'input_ids': ids}")
    return args, kwargs


def completed_keywords(model: nn.Module, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` checked against the arguments ``model.forward`` names, with an all-ones ``attention_mask``
    where the forward takes one, the batch has ``input_ids`` and no mask: what the model makes itself in
    eager mode, but some models' traced forward indexes the mask unconditionally (SwitchTransformers'
    encoder). A key that would go to a ``**kwargs`` is refused: torch.export cannot capture it."""
    parameters = inspect.signature(model.forward).parameters
    named = [p.name for p in parameters.values() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    unknown = [k for k in kwargs if k not in named]
    if unknown:
        raise CaptureError(
            f"the batch's key {unknown[0]!r} is not an argument of {type(model).__name__}.forward, which takes "
            f"{', '.join(named) or 'no named argument'}: remove it from the batches"
        )
    mask, input_ids = parameters.get("attention_mask"), kwargs.get("input_ids")
    missing_mask = mask is not None and mask.default is None and kwargs.get("attention_mask") is None
    if missing_mask and torch.is_tensor(input_ids):
        return {**kwargs, "attention_mask": torch.ones_like(input_ids)}
    return kwargs


def call_model(model: nn.Module, example_inputs: Any) -> Any:
    """Run ``model`` on example inputs given in any form :func:`normalize_inputs` accepts."""
    args, kwargs = normalize_inputs(example_inputs)
    return model(*args, **kwargs)


@contextlib.contextmanager
def capture_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode, no KV cache and no-op ``Module.to`` for the duration of a trace; everything is restored."""
    was_training = {m: m.training for m in model.modules()}
    configs = {id(c): c for m in model.modules() if (c := getattr(m, "config", None)) is not None}
    cache_flags = {k: c.use_cache for k, c in configs.items() if hasattr(c, "use_cache")}
    original_to = nn.Module.to

    def to_unless_noop(self: nn.Module, *args: Any, **kwargs: Any) -> nn.Module:
        device, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
        tensors = [*self.parameters(), *self.buffers()]
        if all((dtype is None or t.dtype == dtype) and (device is None or t.device == device) for t in tensors):
            return self
        return original_to(self, *args, **kwargs)

    model.eval()
    for k in cache_flags:
        configs[k].use_cache = False
    nn.Module.to = to_unless_noop
    try:
        yield
    finally:
        nn.Module.to = original_to
        for k, flag in cache_flags.items():
            configs[k].use_cache = flag
        for m, mode in was_training.items():
            m.training = mode


def _dynamic_shapes(model: nn.Module, args: tuple, kwargs: dict) -> Any:
    shapes = torch.export.ShapesCollection()
    for leaf in pytree.tree_leaves((args, kwargs)):
        if isinstance(leaf, torch.Tensor) and leaf.ndim > 0:
            shapes[leaf] = {d: Dim.AUTO for d in range(leaf.ndim)}
    return shapes.dynamic_shapes(model, args, kwargs)


def _innermost_forward_module(exc: BaseException) -> nn.Module | None:
    """The innermost module whose ``forward`` is on the traceback of ``exc``."""
    found = None
    tb = exc.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        owner = frame.f_locals.get("self")
        if isinstance(owner, nn.Module) and frame.f_code.co_name == "forward":
            found = owner
        tb = tb.tb_next
    return found


def _make_opaque(module: nn.Module, handle: int) -> None:
    opaque = _OPAQUE_MODULES[handle] = _Opaque(module)

    def forward(*args: Any, **kwargs: Any) -> Any:
        leaves, spec = pytree.tree_flatten((args, kwargs))
        if not opaque.recorded or any(isinstance(x, torch.SymInt) for x in leaves):
            raise CaptureError(
                f"{type(module).__name__} branches on tensor data and is called with a symbolic size or where eager "
                "mode does not call it, so moefx cannot capture it"
            )
        call = opaque.calls % len(opaque.recorded)
        opaque.calls += 1
        opaque.traced[call] = (spec, [_TENSOR if isinstance(x, torch.Tensor) else x for x in leaves])
        tensors = iter(torch.ops.moefx.opaque_module(_tensors(leaves), handle, call))
        return pytree.tree_map_only(torch.Tensor, lambda _: next(tensors), opaque.recorded[call][1])

    module.forward = forward  # instance attribute shadows the class's forward; removed after tracing


def _record_opaque_calls(model: nn.Module, args: tuple, kwargs: dict, handles: list[int]) -> None:
    """Run ``model`` once in eager mode, recording each call of the opaque modules of ``handles`` anew (the
    next trace numbers its calls from 0)."""

    def record(opaque: _Opaque) -> Any:
        def hook(_: nn.Module, hook_args: tuple, hook_kwargs: dict, output: Any) -> None:
            shapes = [t.shape for t in _tensors((hook_args, hook_kwargs))]
            opaque.recorded.append((shapes, pytree.tree_map_only(torch.Tensor, lambda t: t.to("meta"), output)))

        return hook

    opaques = [_OPAQUE_MODULES[h] for h in handles]
    for o in opaques:
        o.recorded.clear()
        o.calls = 0
    stand_ins = [o.module.__dict__.pop("forward") for o in opaques]  # eager mode runs the class's forward
    hooks = [o.module.register_forward_hook(record(o), with_kwargs=True) for o in opaques]
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    finally:
        for o, stand_in, hook in zip(opaques, stand_ins, hooks, strict=True):
            hook.remove()
            o.module.forward = stand_in


def _replace_opaque_nodes(gm: torch.fx.GraphModule, paths: dict[int, str]) -> None:
    """Turn each opaque custom-op call into a ``call_module`` node on the module it stands for, with the
    arguments that call was given, followed by a call that lists its output's tensors as the op did."""
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not torch.ops.moefx.opaque_module.default:
            continue
        inputs, handle, call = node.args
        path, opaque = paths[handle], _OPAQUE_MODULES[handle]
        gm.add_submodule(path, opaque.module)
        args, kwargs = opaque.arguments(call, inputs)
        with gm.graph.inserting_before(node):
            called = gm.graph.call_module(path, args, kwargs)
            tensors = gm.graph.call_function(_tensors, (called,))
        stack = dict(node.meta.get("nn_module_stack", {}))
        stack[path] = (path, f"{type(opaque.module).__module__}.{type(opaque.module).__name__}")
        called.meta = {**node.meta, "nn_module_stack": stack}
        tensors.meta = {**node.meta, "nn_module_stack": stack}
        node.replace_all_uses_with(tensors)
        gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()


def max_output_diff(a: Any, b: Any) -> float:
    """Largest absolute difference between the floating-point tensors of two output pytrees."""
    la, lb = _tensors(a), _tensors(b)
    if len(la) != len(lb):
        return float("inf")
    worst = 0.0
    for x, y in zip(la, lb, strict=True):
        if x.shape != y.shape:
            return float("inf")
        if x.is_floating_point():
            worst = max(worst, (x.float() - y.float()).abs().max().item() if x.numel() else 0.0)
        elif not torch.equal(x, y):
            return float("inf")
    return worst


def trace(model: nn.Module, example_inputs: Any, *, check: bool = True, max_opaque: int = 64) -> torch.fx.GraphModule:
    """Capture ``model`` as a GraphModule with dynamic batch and sequence dimensions.

    ``example_inputs`` is a tensor, a tuple of positional arguments, or a dict of keyword arguments (a
    transformers batch, checked and completed by :func:`completed_keywords`). Use a batch and sequence length
    of at least 2: torch.export specialises size-1 dimensions. Every node keeps ``meta["nn_module_stack"]``,
    mapping it to the module that owns it. With ``check`` the graph is run on the example inputs and
    compared with eager (max abs diff <= 1e-5).
    The model itself is left as it was (mode, config flags and methods are restored).
    """
    if not isinstance(model, nn.Module):
        raise MoefxError(f"expected a torch.nn.Module, got {type(model).__name__}")
    args, kwargs = normalize_inputs(example_inputs)
    kwargs = completed_keywords(model, kwargs)
    if any(p.is_meta for p in model.parameters()):
        raise MoefxError("the model has parameters on the meta device: load its weights before capturing it")
    paths = {id(m): name for name, m in model.named_modules()}
    opaque: dict[int, str] = {}
    try:
        with capture_mode(model):
            for _ in range(max_opaque + 1):
                try:
                    # torch.export prints the partial graph of a failed attempt to stderr; we handle failures
                    with contextlib.redirect_stderr(io.StringIO()):
                        exported = torch.export.export(
                            model, args, kwargs, dynamic_shapes=_dynamic_shapes(model, args, kwargs), strict=False
                        )
                    if any(o.recorded and o.calls % len(o.recorded) for o in map(_OPAQUE_MODULES.get, opaque)):
                        raise CaptureError(
                            f"could not capture {type(model).__name__}: a module that branches on tensor data is "
                            "called a different number of times while traced than in eager mode"
                        )
                    break
                except _DATA_DEPENDENT as exc:
                    culprit = _innermost_forward_module(exc)
                    if culprit is None or culprit is model or id(culprit) not in paths:
                        raise CaptureError(
                            f"could not capture {type(model).__name__}: its forward branches on tensor data "
                            f"({first_line(exc)})"
                        ) from None
                    for m in model.modules():
                        if type(m) is type(culprit) and id(m) in paths and m is not model:
                            handle = next(_HANDLES)
                            _make_opaque(m, handle)
                            opaque[handle] = paths[id(m)]
                    _record_opaque_calls(model, args, kwargs, list(opaque))
            else:
                raise CaptureError(f"could not capture {type(model).__name__}: too many data-dependent modules")
            gm = exported.module()
            _replace_opaque_nodes(gm, opaque)
            if check:
                with torch.no_grad():
                    expected = model(*args, **kwargs)
                    got = gm(*args, **kwargs)
                diff = max_output_diff(expected, got)
                if not diff <= 1e-5:
                    raise CaptureError(
                        f"the captured graph of {type(model).__name__} differs from eager by {diff:.3g}; "
                        "a module with data-dependent control flow was not captured faithfully"
                    )
    except MoefxError:
        raise
    except Exception as exc:  # torch.export failures are long; keep the first line and say what to do
        raise CaptureError(
            f"could not capture {type(model).__name__} with torch.export: {first_line(exc)}; "
            "check that the example inputs run through the model in eager mode"
        ) from exc
    finally:
        for handle in opaque:
            _OPAQUE_MODULES.pop(handle).module.__dict__.pop("forward", None)
    gm.meta["moefx_opaque_modules"] = sorted(opaque.values())
    return gm
