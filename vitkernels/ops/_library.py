"""Registers a plain PyTorch function as a ``torch.ops.vitkernels`` op with fake and autograd.

The "torch" backend of every op goes through here: its forward is the reference itself, its fake
kernel is the same function run on fake tensors, and its backward is a second op that recomputes
the reference under autograd. Later backends register their own kernels with the same schema, so
callers, tests (opcheck, torch.compile) and modules treat every backend alike.

The Triton backends' ops are defined by :func:`custom_op`, whose calls in plain eager mode run the
op's function without the dispatcher's Python path to it (:class:`CustomOp`), and whose CUDA kernel
runs on its tensors' device (:func:`on_tensor_device`).
"""
from __future__ import annotations

import functools
import re
from typing import Any, Callable

import torch

NAMESPACE = "vitkernels"
_LIB = torch.library.Library(NAMESPACE, "FRAGMENT")
_AUTOGRAD_KEYS = (torch._C.DispatchKey.AutogradFunctionality, torch._C.DispatchKey.ADInplaceOrView)


def _autograd_dispatch():
    """Guard under which autograd records again inside a kernel.

    A kernel registered below autograd runs with the autograd keys in the thread's exclude set
    whenever a dispatch mode (fake tensors, schema checks, a flop counter, AOT tracing) sits
    between the caller and the kernel. The recomputing backward needs autograd there, so it lifts
    those keys for its own body and leaves every other key as the caller set it.
    """
    exclude = torch._C._dispatch_tls_local_exclude_set()
    for key in _AUTOGRAD_KEYS:
        exclude = exclude.remove(key)
    return torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude)


def _split_args(schema: str) -> list[tuple[str, str]]:
    """``"(Tensor x, int[] w, float? s) -> Tensor"`` -> [("Tensor", "x"), ("int[]", "w"), ("float?", "s")]."""
    inner = re.match(r"\((.*)\)\s*->", schema).group(1)
    out = []
    for arg in inner.split(","):
        kind, name = arg.strip().rsplit(" ", 1)
        out.append((kind, name.split("=")[0]))
    return out


def define_reference_op(name: str, schema: str, fn: Callable) -> Callable:
    """Defines ``vitkernels::<name>`` running ``fn`` (positional arguments as in ``schema``).

    Returns the op's overload packet, callable like ``fn``. Gradients flow to every Tensor argument
    that requires them, computed by recomputing ``fn`` under autograd in ``<name>_backward``.
    """
    args = _split_args(schema)
    tensor_at = [i for i, (kind, _) in enumerate(args) if kind.startswith("Tensor")]
    single_output = not schema.split("->")[1].strip().startswith("(")

    _LIB.define(name + schema)
    _LIB.impl(name, fn, "CompositeExplicitAutograd")
    torch.library.register_fake(f"{NAMESPACE}::{name}", lib=_LIB)(fn)

    backward_name = f"{name}_backward"
    backward_args = ", ".join(f"{kind} {arg}" for kind, arg in args)
    _LIB.define(f"{backward_name}(Tensor[] grad_outputs, bool[] needs_grad, {backward_args}) -> Tensor[]")

    def backward_impl(grad_outputs, needs_grad, *inputs):
        inputs = list(inputs)
        wrt = [i for i, need in zip(tensor_at, needs_grad) if need and inputs[i] is not None]
        with _autograd_dispatch(), torch.enable_grad():
            for i in wrt:
                inputs[i] = inputs[i].detach().requires_grad_(True)
            outputs = fn(*inputs)
            outputs = (outputs,) if single_output else tuple(outputs)
            grads = torch.autograd.grad(outputs, [inputs[i] for i in wrt], list(grad_outputs), allow_unused=True)
        by_index = dict(zip(wrt, grads))
        # An op's outputs may alias neither its inputs nor each other (autograd hands x + branch the
        # same gradient twice, and a sum's gradient is grad_output itself).
        storages = {t.untyped_storage().data_ptr() for t in (*grad_outputs, *inputs)
                    if isinstance(t, torch.Tensor) and t.numel()}
        result = []
        for i in tensor_at:
            grad = by_index.get(i, grad_outputs[0].new_empty(0))
            if grad is None:
                grad = torch.zeros_like(inputs[i])
            elif grad.numel() and grad.untyped_storage().data_ptr() in storages:
                grad = grad.clone()
            storages.add(grad.untyped_storage().data_ptr())
            result.append(grad)
        return result

    def backward_fake(grad_outputs, needs_grad, *inputs):
        return [
            torch.empty_like(inputs[i]) if need and inputs[i] is not None else grad_outputs[0].new_empty(0)
            for i, need in zip(tensor_at, needs_grad)
        ]

    _LIB.impl(backward_name, backward_impl, "CompositeExplicitAutograd")
    torch.library.register_fake(f"{NAMESPACE}::{backward_name}", lib=_LIB)(backward_fake)
    backward_op = getattr(torch.ops.vitkernels, backward_name).default

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*(inputs[i] for i in tensor_at))
        ctx.inputs = [None if i in tensor_at else value for i, value in enumerate(inputs)]

    def backward(ctx, *grad_outputs):
        inputs = list(ctx.inputs)
        for i, saved in zip(tensor_at, ctx.saved_tensors):
            inputs[i] = saved
        needs = [bool(ctx.needs_input_grad[i]) for i in tensor_at]
        grads = backward_op(list(grad_outputs), needs, *inputs)
        out: list = [None] * len(inputs)
        for k, i in enumerate(tensor_at):
            if needs[k] and inputs[i] is not None:
                out[i] = grads[k]
        return tuple(out)

    torch.library.register_autograd(f"{NAMESPACE}::{name}", backward, setup_context=setup_context, lib=_LIB)
    return getattr(torch.ops.vitkernels, name)


_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)


def plain_eager(args: tuple) -> bool:
    """Whether a call with ``args`` (tensors, or lists of them, among other values) meets nothing an
    op's registration serves: no compilation, tracing or export, no dispatch or function mode, no
    functorch transform or forward-mode AD, no profiler, and no tensor of a subclass or that
    autograd records (grad mode on and requires_grad)."""
    if (torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.autograd._profiler_enabled()
            or torch._C._len_torch_dispatch_stack() or torch._C._is_torch_function_mode_enabled()
            or torch._C._are_functorch_transforms_active() or torch.autograd.forward_ad._current_level >= 0):
        return False
    grad = torch.is_grad_enabled()
    for arg in args:
        if type(arg) in _PLAIN_TYPES:
            if grad and arg.requires_grad:
                return False
        elif isinstance(arg, torch.Tensor) or isinstance(arg, (list, tuple)) and not plain_eager(arg):
            return False
    return True


class CustomOp:
    """A ``torch.library.custom_op`` that in plain eager mode (:func:`plain_eager`) runs its
    function itself: the dispatcher's path through a Python op costs about as much host time as a
    small kernel's launch, and with nothing to record or trace it changes nothing. Everywhere else
    a call goes through the op, as torch.compile, opcheck, fake tensors and autograd need.
    Attributes (``register_fake``, ``register_autograd``, ...) are the op's."""

    def __init__(self, op: Any, function: Callable):
        self.op, self.function = op, function

    def __call__(self, *args: Any) -> Any:
        return self.function(*args) if plain_eager(args) else self.op(*args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.op, name)


def on_tensor_device(function: Callable) -> Callable:
    """``function`` run with the device of its first tensor argument current, where that is a CUDA
    device other than the current one: Triton launches on the current device and its stream, and
    the dispatcher sets no device for a Python kernel (a model moved to cuda:1 without
    ``torch.cuda.set_device`` would otherwise launch on cuda:0)."""
    @functools.wraps(function)
    def run(*args: Any) -> Any:
        for arg in args:
            if isinstance(arg, torch.Tensor):
                if arg.is_cuda and arg.device.index != torch.cuda.current_device():
                    with torch.cuda.device(arg.device):
                        return function(*args)
                break
        return function(*args)

    return run


def custom_op(name: str, **kwargs: Any) -> Callable[[Callable], CustomOp]:
    """``torch.library.custom_op(name, mutates_args=(), **kwargs)`` as a :class:`CustomOp`, for a
    function whose outputs are new tensors; its CUDA kernel and its plain-eager calls run the
    function on its tensors' device (:func:`on_tensor_device`)."""
    def register(function: Callable) -> CustomOp:
        op = torch.library.custom_op(name, mutates_args=(), **kwargs)(function)
        on_device = on_tensor_device(function)
        op.register_kernel("cuda")(on_device)
        return CustomOp(op, on_device)

    return register
