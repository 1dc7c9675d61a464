"""The Llama and GPT-NeoX ports against transformers' PyTorch models, and their JAX-side properties."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import config_file
from factrecall_jax import models
from factrecall_jax.models import layers

pytest.importorskip("torch")


def _default_model_config():
    """The model section (a ConfigDict) of configs/default.py, the tiny from-scratch run, with a vocabulary size."""
    model_config = config_file("default.py").model
    model_config.vocab_size = 2048
    return model_config


def test_logits_match_transformers(hf_checkpoint, input_ids, logits_of, record_property):
    ours = logits_of(models.from_pretrained(hf_checkpoint.path), input_ids)
    ref = hf_checkpoint.logits(input_ids)
    diff, scale = np.abs(ours - ref).max(), np.abs(ref).max()
    # conftest's terminal summary prints this line for every config, pass or fail
    record_property("parity", f"{hf_checkpoint.name}: max abs logit diff {diff:.2e} (logits up to {scale:.2f})")
    assert ours.dtype == np.float32
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)


def test_rope_frequencies_match_transformers(hf_checkpoint):
    config = models.from_pretrained(hf_checkpoint.path).config
    ours = layers.rope_inv_freq(config.rope_parameters, config.head_dim)
    base = hf_checkpoint.model.base_model
    np.testing.assert_allclose(ours, base.rotary_emb.inv_freq.numpy(), rtol=1e-6, atol=0)
    if config.rope_parameters.rope_type == "llama3":  # the tiny config must exercise the scaling
        plain = layers.rope_inv_freq(layers.RopeParameters(rope_theta=config.rope_parameters.rope_theta),
                                     config.head_dim)
        assert (ours < plain).sum() >= 4 and (ours == plain).sum() >= 1


def test_padded_batch(hf_checkpoint, input_ids, logits_of):
    """Padded rows equal transformers on real tokens and the same example unpadded; padding yields no NaN."""
    t = input_ids.shape[1]
    ids = np.concatenate([input_ids, input_ids[:1]])
    mask = np.ones_like(ids)
    mask[1, 11:] = mask[2, :t - 9] = 0  # row 1 right-padded to 11 real tokens, row 2 left-padded to 9
    ids = np.where(mask == 1, ids, 0)
    real = mask == 1
    model = models.from_pretrained(hf_checkpoint.path)
    ours = logits_of(model, ids, mask)
    assert np.isfinite(ours).all()
    np.testing.assert_allclose(ours[real], hf_checkpoint.logits(ids, mask)[real], atol=1e-4, rtol=0)
    # Left padding shifts the default positions; position_ids that count real tokens only undo that.
    position_ids = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
    shifted = logits_of(model, ids, mask, position_ids)
    for row, logits in enumerate((ours[0], ours[1], shifted[2])):
        alone = logits_of(model, ids[row:row + 1, real[row]])
        np.testing.assert_allclose(logits[real[row]], alone[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["llama_gqa_bias", "neox_parallel"])
def test_jit_over_split_state_matches_eager(name, hf_checkpoints, input_ids, logits_of):
    model = models.from_pretrained(hf_checkpoints(name).path)
    np.testing.assert_allclose(logits_of(model, input_ids), np.asarray(model(jnp.asarray(input_ids))), atol=1e-6,
                               rtol=0)


@pytest.mark.parametrize("name", ["llama3_tied", "neox_sequential_gelu_new"])
def test_bfloat16(name, hf_checkpoints, input_ids, logits_of):
    path = hf_checkpoints(name).path
    reference = logits_of(models.from_pretrained(path), input_ids)
    for param_dtype in (jnp.float32, jnp.bfloat16):
        model = models.from_pretrained(path, dtype=jnp.bfloat16, param_dtype=param_dtype)
        assert {v.dtype for v in jax.tree.leaves(nnx.state(model))} == {jnp.dtype(param_dtype)}
        logits = logits_of(model, input_ids)
        assert logits.dtype == np.float32
        # bfloat16 keeps 8 significant bits (0.4% per rounding) and these logits reach about 4.
        assert 1e-3 < np.abs(logits - reference).max() < 0.1


def test_from_config_default_tiny_config():
    """The configs/default.py model: its configured init scale, parameter count, finite loss and gradients."""
    hf_config = _default_model_config()
    model = models.from_config(hf_config, seed=0)
    assert isinstance(model, models.Llama)
    d, f, v, n_layers = (hf_config[k] for k in ("hidden_size", "intermediate_size", "vocab_size", "num_hidden_layers"))
    state = nnx.state(model)
    assert sum(x.size for x in jax.tree.leaves(state)) == 2 * v * d + n_layers * (4 * d * d + 3 * d * f + 2 * d) + d
    assert state["layers"]["self_attn"]["q_proj"]["kernel"].shape == (n_layers, d, 4, d // 4)
    np.testing.assert_allclose(np.std(state["layers"]["mlp"]["up_proj"]["kernel"][...]),
                               hf_config["initializer_range"], rtol=0.05)
    np.testing.assert_array_equal(state["norm"]["scale"][...], 1.0)

    graphdef, params = nnx.split(model)
    input_ids = jnp.asarray(np.random.RandomState(1).randint(0, v, (2, 12)))

    def loss_fn(params):
        logits = nnx.merge(graphdef, params)(input_ids[:, :-1])
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), input_ids[:, 1:, None], axis=-1))

    loss, grads = jax.jit(jax.value_and_grad(loss_fn))(params)
    np.testing.assert_allclose(loss, np.log(v), rtol=0.05)  # near-uniform predictions at init
    assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
    assert jax.tree.structure(grads) == jax.tree.structure(params)


def test_trace_size_does_not_grow_with_depth():
    """The scanned layers trace to one body, so the program (and its compile time) is the same for 2 and 8 layers."""
    def num_equations(config):
        model = models.from_config(config)
        graphdef, state = nnx.split(model)
        jaxpr = jax.make_jaxpr(lambda s, x: nnx.merge(graphdef, s)(x))(state, jnp.zeros((1, 8), jnp.int32))
        return len(str(jaxpr).splitlines())

    for config_cls in (models.LlamaConfig, models.GPTNeoXConfig):
        tiny = config_cls.tiny()
        deep = dataclasses.replace(tiny, num_hidden_layers=8)
        assert num_equations(tiny) == num_equations(deep)


def test_parameters_carry_logical_axis_names():
    for config in (models.LlamaConfig.tiny(), models.GPTNeoXConfig.tiny()):
        for path, var in nnx.to_flat_state(nnx.state(models.from_config(config))):
            names = var.get_metadata()["out_sharding"]
            assert len(names) == var.ndim, path
            assert (names[0] == "layers") == (path[0] == "layers"), path


def test_config_rejects_what_it_cannot_compute():
    with pytest.raises(ValueError, match="unsupported hidden_act 'gelu_10'.*gelu_new"):
        models.GPTNeoXConfig.from_hf_config({"hidden_act": "gelu_10"})
    with pytest.raises(ValueError, match="unsupported rope_type 'yarn'.*llama3"):
        models.LlamaConfig.from_hf_config({"rope_scaling": {"type": "yarn", "factor": 2.0}})
    with pytest.raises(ValueError, match="llama3.*low_freq_factor"):
        models.LlamaConfig.from_hf_config({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}})
