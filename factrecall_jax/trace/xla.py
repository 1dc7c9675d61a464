"""How the contraction is laid out for the compiler: XLA workarounds and hardware tuning, gathered here so that the
math in `engine` reads plainly. Each says what it works around, measured with jax and jaxlib 0.10.2 (the pin in
setup.py); recheck them when that pin moves.
"""
import jax
import jax.numpy as jnp

from factrecall_jax import sharding

# A parameter whose per-example gradients for a whole chunk take at most this many elements is contracted at once;
# larger ones pair by pair (`default_group`).
SMALL = 2**20
# On an accelerator, the per-example gradients of one parameter formed at once take at most this many elements.
GROUP_ELEMENTS = 2**28


def reduce_pairs(b: jax.Array, q: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(sum |b|, sum |q|, sum b * q) over the leading pair axis in one variadic reduction: XLA:CPU runs three separate
    reductions over a major axis several times slower."""
    return jax.lax.reduce((jnp.abs(b), jnp.abs(q), b * q), (jnp.zeros((), b.dtype),) * 3,
                          lambda x, y: tuple(u + v for u, v in zip(x, y)), (0,))


def written_once(*products: jax.Array) -> tuple[jax.Array, ...]:
    """The products, materialized before they are reduced: left to itself, XLA:CPU fuses each product into its
    reduction and rewrites those into tree reductions, the costliest ops of the trace (1.2x at 30M parameters)."""
    return jax.lax.optimization_barrier(products)


def replicated(gram: jax.Array) -> jax.Array:
    """A Gram product whole on every device of the ambient mesh. XLA's SPMD partitioner otherwise reshards a Gram
    summed over a vocabulary split on (tensor, fsdp) to pairs split on (data, fsdp) without reducing it, and the
    product is wrong on a (2, 2, 2) mesh (tests/sharded_cases.py)."""
    return sharding.constrain_replicated(gram)


def default_group(devices: int, num_pairs: int, size: int) -> int:
    """Pairs whose per-example gradients of one parameter (`size` elements) are formed at once: on a CPU one per
    device, whose gradient stays in cache while it is read and added (forming the chunk's first would write and
    read them through memory); on an accelerator as many as keep them within GROUP_ELEMENTS."""
    if jax.default_backend() == "cpu":
        return devices
    return max(g for g in range(devices, num_pairs + 1, devices)
               if num_pairs % g == 0 and (g == devices or g * size <= GROUP_ELEMENTS))


def contract_at_once(num_pairs: int, size: int, group: int) -> bool:
    return num_pairs * size <= SMALL or group >= num_pairs
