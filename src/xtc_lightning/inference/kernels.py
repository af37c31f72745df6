"""Inductor kernels called without dynamo: compiled once per static signature, found by a dict lookup.

A ``torch.compile``'d function pays dynamo on every call: frame evaluation, the cache
lookup and its guard checks, and the compiled region's wrappers. The runtime makes ~16
such calls per forward (activation quantizer and epilogues); at batch 1 they were ~30% of
its time. ``Precompiled`` compiles the same function with the same inductor, but ahead of
the call: ``torch.export`` traces it with the rows of its 2-D tensors dynamic (tokens) and
everything else static, and ``torch._inductor.standalone_compile`` builds the kernel;
later calls with the same *signature* run that kernel directly (inductor's generated code,
without the artifact's wrappers where that is checked to give the same outputs: ``_direct``).

The signature is the guard, computed by us: the value of every non-tensor argument
(``bool``, ``int``, ``float``, ``None``, flattened from tuples), for every tensor its dtype,
its sizes except the rows of a 2-D tensor, and its strides (contiguous tensors only), and
the intra-op thread count (inductor's CPU kernels are compiled for one thread count; calls
of at most ``SERIAL_ROWS`` rows use the kernel compiled for one thread).
A kernel traced with a symbolic row count is valid for any row count >= 1; all 2-D tensors
of one call must share it (true of every call site here, and checked). Calls outside these
rules (a non-contiguous tensor, rows that differ or are 0, an argument of another type, a
tensor requiring grad while autograd records) run
the plain function eagerly, so nothing is ever computed by a kernel built for other inputs.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

_PLAIN = (bool, int, float, type(None))


class Precompiled:
    """``fn`` as inductor kernels keyed by the call's signature (see the module docstring).

    ``options`` are inductor config values set while compiling (``torch._inductor.config``).
    A signature whose export or compilation fails runs ``fn`` eagerly (one warning).
    """

    def __init__(self, fn: Callable, options: dict | None = None):
        self.fn, self.options = fn, dict(options or {})
        self.kernels: dict[tuple, Callable] = {}

    def __call__(self, *args):
        key = signature(args)
        if key is None:
            return self.fn(*args)
        kernel = self.kernels.get(key)
        if kernel is None:
            kernel = self.kernels[key] = self._build(args, threads=key[0])
        return kernel([a for a in _leaves(args) if isinstance(a, Tensor)])

    def _build(self, args: tuple, threads: int) -> Callable:
        before = torch.get_num_threads()
        try:
            torch.set_num_threads(threads)  # inductor compiles its loops for the current thread count
            return _compile(self.fn, args, self.options)
        except Exception as e:  # noqa: BLE001 - any export / inductor failure: this signature runs eagerly
            warnings.warn(
                f"{self.fn.__name__}: compiling failed, eager ops instead ({e!r:.200})", stacklevel=3
            )
            fn = self.fn
            return lambda tensors: fn(*_fill(args, iter(tensors)))
        finally:
            torch.set_num_threads(before)


def _leaves(args: tuple) -> list:
    """The arguments with tuples flattened (one level deep, as the epilogues' ``norm``)."""
    out = []
    for a in args:
        if type(a) is tuple:
            out.extend(a)
        else:
            out.append(a)
    return out


def _fill(args: tuple, tensors) -> tuple:
    """``args`` with each tensor replaced by the next of ``tensors``."""

    def one(a):
        return next(tensors) if isinstance(a, Tensor) else a

    return tuple(tuple(one(b) for b in a) if type(a) is tuple else one(a) for a in args)


# Calls of at most this many rows run the kernel compiled for one thread. A kernel compiled for
# several threads always splits its rows over all of them (inductor fixes the thread count of its
# OpenMP loops at compile time); on a batch-1 input of 12 tokens at 2 threads, handing half of each
# of the 16 small kernels of a forward to the second thread cost more than it saved (the serial
# kernels won 6 of 7 paired rounds, by ~5%; at 16 tokens: one win, one loss, one tie).
SERIAL_ROWS = 16


def signature(args: tuple) -> tuple | None:
    """What a kernel is compiled for, or None if ``args`` are outside ``Precompiled``'s rules.

    Its first item is the thread count the kernel is compiled for: the intra-op thread count,
    or 1 for calls of at most ``SERIAL_ROWS`` rows.
    """
    key: list = [torch.get_num_threads()]
    rows, grad = None, torch.is_grad_enabled()
    for a in args:
        if type(a) is tuple:
            if not all(type(b) in _PLAIN or isinstance(b, Tensor) for b in a):
                return None
            key.append(len(a))
        elif type(a) not in _PLAIN and not isinstance(a, Tensor):
            return None
    for a in _leaves(args):
        if not isinstance(a, Tensor):
            key.append((type(a), a))
            continue
        if not a.is_contiguous() or a.layout != torch.strided or (a.requires_grad and grad):
            return None  # (parameters, e.g. LayerNorm weights, require grad: fine without autograd)
        if a.dim() == 2:
            if rows is None:
                rows = a.shape[0]
            if a.shape[0] != rows or rows < 1:
                return None
            key.append((a.dtype, 2, a.shape[1], a.device))
        else:
            key.append((a.dtype, tuple(a.shape), a.device))
    if rows is not None and rows <= SERIAL_ROWS:
        key[0] = 1
    return tuple(key)


class _Traced(nn.Module):
    """``fn`` with the call's non-tensor arguments fixed: the module ``torch.export`` traces."""

    def __init__(self, fn: Callable, args: tuple):
        super().__init__()
        self.fn, self.args = fn, args

    def forward(self, *tensors):
        leaves = pytree.tree_leaves(self.fn(*_fill(self.args, iter(tensors))))
        return tuple(t for t in leaves if isinstance(t, Tensor))  # export's graphs return tensors only


# The row count the kernels are traced with. Inductor takes it as the size of the rows when it
# decides whether a loop is worth splitting over the intra-op threads: traced with 2 rows, the
# 384-wide kernels looked too small and ran on one thread whatever the thread count.
EXAMPLE_ROWS = 1024


def _compile(fn: Callable, args: tuple, options: dict) -> Callable:
    """The kernel for ``args``' signature: ``(tensors) -> fn(*args)``, rows symbolic, widths static."""
    with torch.inference_mode(False), torch.no_grad():
        # example inputs of EXAMPLE_ROWS rows (a row count of 1 would be specialized by export)
        examples = [
            torch.zeros(
                (EXAMPLE_ROWS, *t.shape[1:]) if t.dim() == 2 else t.shape, dtype=t.dtype, device=t.device
            )
            for t in _leaves(args)
            if isinstance(t, Tensor)
        ]
        rows = torch.export.Dim("rows", min=1)
        dynamic = tuple({0: rows} if t.dim() == 2 else None for t in examples)
        program = torch.export.export(_Traced(fn, args), tuple(examples), dynamic_shapes=(dynamic,))
        graph = program.graph_module
        # standalone_compile's "from_graph" takes the shapes of export's trace (rows symbolic, the
        # rest static) from the outputs' ``example_value``, which export names ``val``; without it, it
        # makes every size symbolic (widths too: loops of unknown length, and one cached kernel,
        # hence one threading decision, shared by every width)
        for node in graph.graph.output_node().args[0]:
            node.meta.setdefault("example_value", node.meta["val"])
        # the output's structure and its non-tensor leaves (e.g. None), from one eager call
        leaves, spec = pytree.tree_flatten(fn(*_fill(args, iter(examples))))
        with torch._inductor.config.patch(options):
            artifact = torch._inductor.standalone_compile(graph, examples, dynamic_shapes="from_graph")
        run = _direct(artifact, examples)
    tensor_out = [isinstance(t, Tensor) for t in leaves]

    def kernel(tensors: list[Tensor]):
        out = iter(run(tensors))
        return pytree.tree_unflatten(
            [next(out) if t else c for t, c in zip(tensor_out, leaves, strict=True)], spec
        )

    return kernel


def _direct(artifact: Callable, examples: list[Tensor]) -> Callable[[list[Tensor]], tuple]:
    """``(tensors) -> outputs`` of a ``standalone_compile`` artifact: inductor's generated code, called directly.

    The artifact's own call passes through AOT autograd's runtime wrappers, a dynamo-disable
    frame and ``CompiledFxGraph.__call__`` before it reaches inductor's ``call(tensors)``;
    at batch 1 (16 kernel calls a forward on ~12 rows) that wrapping was ~8% of the forward
    (3.5 -> 3.2 ms at 1 thread, 3.3 -> 3.05 ms at 2, paired). The wrappers only matter for
    graphs that mutate an input, return an alias of one, or hold lifted constants: so the
    inner call is used only if it gives the artifact's outputs, bit for bit, on random inputs,
    leaves them unchanged and returns no input storage; otherwise (or if it cannot be found,
    e.g. in another torch version) the artifact itself runs.
    """
    wrapped = lambda tensors: artifact(*tensors)  # noqa: E731 - the fallback, same signature
    call = _inner_call(artifact)
    if call is None:
        return wrapped
    inputs = [
        torch.testing.make_tensor(t.shape, dtype=t.dtype, device=t.device, low=-50, high=50) for t in examples
    ]
    kept = [t.clone() for t in inputs]
    want = wrapped(list(inputs))
    try:
        got = call(list(inputs))
    except Exception:  # noqa: BLE001 - another calling convention: keep the wrapped call
        return wrapped
    storages = {t.untyped_storage().data_ptr() for t in inputs}
    same = (
        isinstance(got, (tuple, list))
        and len(got) == len(want)
        and all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
        and all(torch.equal(t, k) for t, k in zip(inputs, kept, strict=True))
        and not any(g.untyped_storage().data_ptr() in storages for g in got)
    )
    return call if same else wrapped


def _inner_call(artifact: Callable) -> Callable | None:
    """The ``current_callable`` of the ``CompiledFxGraph`` inside ``artifact`` (found through its
    wrappers' closures), or None."""
    from torch._inductor.output_code import CompiledFxGraph

    stack, seen = [artifact], set()
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, CompiledFxGraph):
            return obj.current_callable
        stack += [getattr(obj, a) for a in ("_compiled_fn", "__wrapped__") if hasattr(obj, a)]
        for cell in getattr(obj, "__closure__", None) or ():
            with contextlib.suppress(ValueError):  # an empty cell
                stack.append(cell.cell_contents)
    return None
