"""Gradient rules per module type: how one example's gradient of a module's parameters follows from one call's input
x and output gradient dy, without forming it (the factoring of Opacus' hooks and of ghost clipping). One registry, open
to users: `register(MyModule, Rule(...))`.

A rule's `terms(module, method, x, dy)` returns, per parameter name, the einsum terms its gradient sums for one call:
`Term("...i,...o->io", (x, dy))` is sum over the call's batch positions of x (outer) dy, the gradient of a Linear
kernel. Operands may be arrays derived from x and dy or `OneHot(ids, size)`, token ids standing for their one-hot rows
(last letter of its spec: the vocabulary). "..." stands for the call's batch axes, which every operand shares. x and
dy arrive with extra leading axes (the pair, and the layers of a stacked module): specs speak of the trailing axes
only, and the trace adds the rest. A module whose parameters are small (norm scales) can take `DIRECT`: its
per-example gradients are then formed whole by `jax.grad` in the same backward pass.
"""
import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from factrecall_jax import errors
from factrecall_jax.models import layers


@flax.struct.dataclass
class OneHot:
    """Token ids [..., *batch] standing for their one-hot vectors over `size` entries (never built)."""
    ids: jax.Array
    size: int = flax.struct.field(pytree_node=False)


class Term(NamedTuple):
    """One summand of a parameter's per-example gradient for one call: jnp.einsum(spec, *operands)."""
    spec: str
    operands: tuple


def first_argument(module, method: str, args: tuple, kwargs: Mapping[str, Any]) -> jax.Array:
    return args[0]


@dataclasses.dataclass(frozen=True)
class Rule:
    """How a module type's parameters get their per-example gradients.

    params: the parameter attributes the rule covers ("kernel", "bias", ...; absent or None attributes are skipped).
    methods: the methods whose calls are captured (their input recorded, a probe added to their output).
    terms: (module, method, x, dy) -> {parameter: [Term]}; None: DIRECT (no capture; gradients formed whole).
    record: (module, method, args, kwargs) -> x, the array `terms` reads, taken inside the call (where the call's own
      shapes are known; default: the first argument). It raises for a call the rule cannot describe.
    supports: module -> whether the rule applies to this instance (else its parameters are formed whole, with a
      warning).
    """
    params: tuple[str, ...] = ()
    methods: tuple[str, ...] = ("__call__",)
    terms: Callable[[nnx.Module, str, Any, jax.Array], dict[str, list[Term]]] | None = None
    record: Callable[[nnx.Module, str, tuple, Mapping[str, Any]], Any] = first_argument
    supports: Callable[[nnx.Module], bool] = lambda module: True


DIRECT = Rule()

_REGISTRY: dict[type, Rule] = {}


def register(module_type: type, rule: Rule) -> None:
    """Sets the rule of `module_type` and its subclasses (a subclass's own registration wins)."""
    if not (isinstance(module_type, type) and issubclass(module_type, nnx.Module)):
        raise errors.InvalidValue(f"register: {module_type!r} is not an nnx.Module subclass")
    if not isinstance(rule, Rule):
        raise errors.InvalidValue(f"register: expected a trace.Rule for {module_type.__name__}, got {rule!r}")
    _REGISTRY[module_type] = rule


def rule_for(module_type: type) -> Rule | None:
    """The rule registered for `module_type` or its nearest registered base class; None if there is none."""
    return next((_REGISTRY[c] for c in module_type.__mro__ if c in _REGISTRY), None)


def _bias_term(bias_shape: Sequence[int], out_letters: str, dy) -> Term:
    """A bias (of `bias_shape` in one call: a stacked module's parameter has more axes) broadcast against the
    trailing output axes: dy summed over the others, and over the axes the bias has as 1."""
    letters = out_letters[len(out_letters) - len(bias_shape):]
    widened = tuple(i - len(bias_shape) for i, n in enumerate(bias_shape) if n == 1)
    if widened:
        dy = jnp.sum(dy, axis=widened, keepdims=True)
    return Term(f"...{letters}->{letters}", (dy,))


def _linear(module: nnx.Linear, method, x, dy):
    terms = {"kernel": [Term("...i,...o->io", (x, dy))]}
    if module.bias is not None:
        terms["bias"] = [Term("...o->o", (dy,))]
    return terms


def _linear_general_input(module: nnx.LinearGeneral, method, args, kwargs):
    """The input with its contracted axes moved last, in order (so that "..." is the rest)."""
    x = args[0]
    axes = tuple(a % x.ndim for a in (module.axis if isinstance(module.axis, Sequence) else (module.axis,)))
    return jnp.moveaxis(x, axes, tuple(range(x.ndim - len(axes), x.ndim)))


def _linear_general(module: nnx.LinearGeneral, method, x, dy):
    letters = iter("abcdefghijklmnopqrstuvwxyz")
    ins = "".join(next(letters) for _ in module.in_features)
    outs = "".join(next(letters) for _ in module.out_features)
    terms = {"kernel": [Term(f"...{ins},...{outs}->{ins}{outs}", (x, dy))]}
    if module.bias is not None:
        terms["bias"] = [_bias_term(module.out_features, outs, dy)]
    return terms


def _einsum_input(module: nnx.Einsum, method, args, kwargs):
    if len(args) > 1 or kwargs.get("einsum_str") is not None:
        raise errors.InvalidValue("trace: nnx.Einsum was called with its own einsum_str; its gradient rule reads the "
                                  "module's einsum_str. Use method='reference' for this model")
    return args[0]


def _einsum(module: nnx.Einsum, method, x, dy):
    x_letters, rest = module.einsum_str.replace(" ", "").split(",")
    kernel_letters, out_letters = rest.split("->")
    terms = {"kernel": [Term(f"{x_letters},{out_letters}->{kernel_letters}", (x, dy))]}
    if module.bias is not None:
        terms["bias"] = [_bias_term(module.bias_shape, out_letters.replace("...", ""), dy)]
    return terms


def _embed(module: nnx.Embed, method, x, dy):
    if method == "attend":  # the tied head: logits = query . embedding^T
        return {"embedding": [Term("...d,...v->vd", (x, dy))]}
    return {"embedding": [Term("...v,...d->vd", (OneHot(x, module.num_embeddings), dy))]}


register(nnx.Linear, Rule(params=("kernel", "bias"), terms=_linear))
register(nnx.LinearGeneral, Rule(params=("kernel", "bias"), terms=_linear_general, record=_linear_general_input,
                                 supports=lambda module: not module.batch_axis))
register(nnx.Einsum, Rule(params=("kernel", "bias"), terms=_einsum, record=_einsum_input,
                          supports=lambda module: module.einsum_str is not None))
register(nnx.Embed, Rule(params=("embedding",), methods=("__call__", "attend"), terms=_embed))
for _norm in (nnx.LayerNorm, nnx.RMSNorm, layers.LayerNorm, layers.RMSNorm):
    register(_norm, DIRECT)
