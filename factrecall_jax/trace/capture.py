"""Per-example gradients of a chunk of examples, in the terms the rules give: one forward and one backward pass.

Every module whose type has a rule (`rules`) is captured with Flax's own mechanism: its tapped methods `sow` their
input and `perturb` their output under `nnx.capture`, so the gradient with respect to the perturbations is each call's
output gradient. The model files hold no trace logic: the instances of a traced model are given a subclass whose
tapped methods do the sowing (as `nnx.capture(method_outputs=...)` does), and only inside the trace. Parameters no rule
covers (norm scales, modules without a rule, a params pytree) get their per-example gradients from the same backward
pass, formed whole.
"""
import dataclasses
import functools
import warnings
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from factrecall_jax import errors, sharding
from factrecall_jax.trace import rules


class _Input(nnx.Intermediate):
    """A tapped call's input, as its rule records it."""


class _Probe(nnx.Perturbation):
    """Zeros added to a tapped call's output: their gradient is the call's output gradient."""


def _keys(method: str) -> tuple[str, str]:
    return f"in:{method}", f"out:{method}"


def _captured(state, path: tuple, key: str):
    """The value captured under a module path and key, None where nothing was."""
    node = state
    for k in (*path, key):
        if node is None or k not in node:
            return None
        node = node[k]
    return node.get_value()


@functools.cache
def _capturing(cls: type, rule: rules.Rule) -> type:
    """A subclass of `cls` whose rule's methods record their input and perturb their output under nnx.capture."""

    def wrap(name):
        method = getattr(cls, name)

        @functools.wraps(method)
        def wrapper(self, *args, **kwargs):
            if not hasattr(self, "__captures__"):
                return method(self, *args, **kwargs)
            x_key, y_key = _keys(name)
            self.sow(_Input, x_key, rule.record(self, name, args, kwargs))
            return self.perturb(y_key, method(self, *args, **kwargs), _Probe)
        return wrapper

    return type(cls.__name__, (cls,), {name: wrap(name) for name in rule.methods})


@dataclasses.dataclass(frozen=True)
class Tap:
    path: tuple  # the module's path in the model
    method: str
    rule: rules.Rule
    depth: int = 0  # scans the module runs under (its parameters' leading stacking axes), found by `make_plan`


@dataclasses.dataclass(frozen=True)
class Plan:
    """What one chunk computes: the captured calls, and per parameter leaf the (tap, parameter name) pairs whose terms
    sum to its gradient, or None where the gradient is formed whole (by `jax.grad`)."""
    taps: tuple[Tap, ...]
    covered: tuple[tuple[tuple[int, str], ...] | None, ...]
    probes: object  # the perturbations' shapes for one example (an nnx.State of ShapeDtypeStruct), or None

    @property
    def direct(self) -> list[int]:
        return [i for i, c in enumerate(self.covered) if c is None]


def _modules(model) -> dict[tuple, nnx.Module]:
    return {tuple(path): m for path, m in nnx.iter_modules(model)}


def _instrument(model, taps) -> None:
    modules = _modules(model)
    for path in {t.path for t in taps}:
        module = modules[path]
        rule = next(t.rule for t in taps if t.path == path)
        module.__class__ = _capturing(type(module), rule)


def _leaf_owners(params) -> list[tuple[tuple, str]]:
    """(module path, attribute) of every parameter leaf, in leaf order."""
    owners = []
    for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]:
        keys = [k.key if hasattr(k, "key") else k.idx for k in path if hasattr(k, "key") or hasattr(k, "idx")]
        owners.append((tuple(keys[:-1]), keys[-1]))
    return owners


def _name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def make_plan(loss: Callable, graphdef, params, rest, example, method: str) -> Plan:
    """The plan of a model (graphdef and its parameters; None: a params pytree) for one example: which calls to
    capture, found by running the loss abstractly once. Warns once per module type whose parameters no rule covers,
    and per module that runs more than once for one example (one output gradient per call is needed)."""
    owners = _leaf_owners(params)
    if graphdef is None:
        check_scalar(jax.eval_shape(loss, params, example))
        return Plan((), (None,) * len(owners), None)
    if method == "reference":
        check_scalar(jax.eval_shape(lambda p, r, e: loss(nnx.merge(graphdef, p, r), e), params, rest, example))
        return Plan((), (None,) * len(owners), None)
    model = nnx.merge(graphdef, params, rest)
    modules = _modules(model)
    candidates, unruled = [], {}
    for path, module in modules.items():
        rule = rules.rule_for(type(module))
        owned = [name for p, name in owners if p == path]
        if rule is None or rule.terms is None or not rule.supports(module):
            if owned and (rule is None or rule.terms is not None):
                unruled.setdefault(type(module), owned)
            continue
        candidates += [Tap(path, m, rule) for m in rule.methods]

    def run(params, rest, example):
        model = nnx.merge(graphdef, params, rest)
        _instrument(model, candidates)
        return nnx.capture(loss, _Input, _Probe)(model, example)

    value, inputs, probes = jax.eval_shape(run, params, rest, example)
    check_scalar(value)
    calls = {t: len(_captured(inputs, t.path, _keys(t.method)[0]) or ()) for t in candidates}
    repeated = {t.path: n for t, n in calls.items() if n > 1}
    for cls, names in unruled.items():
        warnings.warn(f"trace: no gradient rule for {_name(cls)} (parameters {', '.join(names)}): its per-example "
                      "gradients are formed whole; trace.register a Rule to factor them", stacklevel=4)
    for path, n in repeated.items():
        warnings.warn(f"trace: module {'.'.join(map(str, path))} ({_name(type(modules[path]))}) runs {n} times "
                      "per example: its per-example gradients are formed whole", stacklevel=4)
    shapes = dict(zip(owners, jax.tree.leaves(params)))
    taps = [dataclasses.replace(t, depth=_depth(t, modules[t.path], inputs, probes, shapes))
            for t in candidates if calls[t] == 1 and t.path not in repeated]
    covered = []
    for path, name in owners:
        pairs = tuple((i, name) for i, t in enumerate(taps) if t.path == path and name in t.rule.params)
        covered.append(pairs or None)
    keep = {(t.path, _keys(t.method)[1]) for t in taps}
    return Plan(tuple(taps), tuple(covered), _only(probes, keep))


def _depth(tap: Tap, module, inputs, probes, shapes) -> int:
    """How many stacking axes lead the tap's parameters beyond those its rule's terms describe (1 for a module of
    stacked layers under one scan): the leading axes of its captured values, too."""
    x_key, y_key = _keys(tap.method)
    specs = {}

    def terms(x, dy):
        specs.update({name: [t.spec for t in ts] for name, ts in tap.rule.terms(module, tap.method, x, dy).items()})

    jax.eval_shape(terms, _captured(inputs, tap.path, x_key)[0], _captured(probes, tap.path, y_key))
    depths = {shapes[(tap.path, name)].ndim - len(spec.split("->")[1])
              for name, spec_list in specs.items() if (tap.path, name) in shapes for spec in spec_list}
    if len(depths) != 1 or min(depths) < 0:
        raise errors.InvalidValue(f"trace: the gradient rule of {_name(type(module))} gives terms that do not fit its "
                                  f"parameters' shapes ({specs})")
    return depths.pop()


def _only(probes, keep) -> nnx.State:
    """The perturbations of the kept taps (a dropped tap's probe would only add zeros)."""
    flat = [(path, v) for path, v in nnx.to_flat_state(probes) if (tuple(path[:-1]), path[-1]) in keep]
    return nnx.from_flat_state(flat)


def check_scalar(value) -> None:
    if isinstance(value, (tuple, list)):
        raise errors.InvalidValue(f"per_example_loss returned a {type(value).__name__} of {len(value)}: return the "
                                  "scalar loss alone (for a (loss, aux) function: lambda m, ex: f(m, ex)[0])")
    if not (hasattr(value, "shape") and value.shape == () and jnp.issubdtype(value.dtype, jnp.floating)):
        raise errors.InvalidValue(f"per_example_loss returned {getattr(value, 'dtype', type(value).__name__)}"
                                  f"{list(getattr(value, 'shape', []))}: expected a floating scalar for one example")


def _axes(state, depth: dict[tuple, int]):
    """`state` (captured values, by module path and key) with each value replaced by its tap's depth: where the pair
    axis sits in a captured value of the chunk, after the scans' stacking axes (so none is moved)."""
    return nnx.from_flat_state([(path, v.replace(jax.tree.map(lambda _: depth[tuple(path[:-1])], v.get_value())))
                                for path, v in nnx.to_flat_state(state)])


def per_example_terms(loss: Callable, graphdef, plan: Plan, params, rest, batch_C, valid_C) -> list[list[rules.Term]]:
    """Per parameter leaf, the terms its per-example gradients sum over a chunk of C examples. A captured call's
    operands are [*stacking axes, C, ...] (its tap's depth of them); a gradient formed whole is one term with spec ""
    and shape [C, *parameter]. Invalid (padding) examples get zero gradients."""
    leaves, treedef = jax.tree.flatten(params)
    direct = plan.direct

    def one(direct_leaves, probes, example, valid):
        merged = list(leaves)
        for i, x in zip(direct, direct_leaves):
            merged[i] = x
        p = jax.tree.unflatten(treedef, merged)
        if graphdef is None:
            return valid * loss(p, example), None
        model = nnx.merge(graphdef, *jax.tree.map(lambda x: x, (p, rest)))  # fresh Variables of this trace
        if not plan.taps:
            return valid * loss(model, example), None
        _instrument(model, plan.taps)
        value, inputs = nnx.capture(loss, _Input, init=probes)(model, example)
        return valid * value, inputs

    size = valid_C.shape[0]
    depth = {t.path: t.depth for t in plan.taps}
    probe_axes = input_axes = probes = None
    if plan.taps:
        probe_axes = _axes(plan.probes, depth)
        probes = jax.tree.map(lambda s, a: jnp.zeros((*s.shape[:a], size, *s.shape[a:]), s.dtype), plan.probes,
                              probe_axes)
        input_axes = nnx.from_flat_state([((*t.path, _keys(t.method)[0]), _Input((t.depth,))) for t in plan.taps])
    grad = jax.grad(one, argnums=(0, 1), has_aux=True)
    (direct_grads, dy), x = jax.vmap(grad, in_axes=(None, probe_axes, 0, 0), out_axes=((0, probe_axes), input_axes),
                                     spmd_axis_name=sharding.batch_axes_in_use() or None)(
        [leaves[i] for i in direct], probes, batch_C, valid_C.astype(jnp.float32))
    terms = [[] for _ in leaves]
    for i, g in zip(direct, direct_grads):
        terms[i].append(rules.Term("", (g,)))
    if plan.taps:
        modules = _modules(nnx.merge(graphdef, params, rest))
        for index, tap in enumerate(plan.taps):
            x_key, y_key = _keys(tap.method)
            by_param = tap.rule.terms(modules[tap.path], tap.method, _captured(x, tap.path, x_key)[0],
                                      _captured(dy, tap.path, y_key))
            for i, pairs in enumerate(plan.covered):
                for tap_index, name in pairs or ():
                    if tap_index == index:
                        terms[i] += by_param[name]
    return terms
