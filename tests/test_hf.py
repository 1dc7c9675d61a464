"""Hugging Face checkpoint IO: round trips through transformers, sharded and hub-style checkpoints, bad input."""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from factrecall_jax import models, sharding
from factrecall_jax.models import hf

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# Fields transformers adds on its own (path, version stamp) or that this port does not model (dropout, cache).
_CONFIG_FIELDS_NOT_KEPT = {"_name_or_path", "transformers_version", "attention_dropout", "hidden_dropout",
                           "classifier_dropout", "pretraining_tp", "use_cache", "is_decoder"}


def _hf_logits(model, input_ids) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(input_ids)).logits.float().numpy()


def _tensor_names(folder) -> set[str]:
    with safe_open(os.path.join(folder, "model.safetensors"), framework="numpy") as f:
        return set(f.keys())


def test_round_trip_through_transformers(hf_checkpoint, input_ids, tmp_path):
    """HF save -> from_pretrained -> save_pretrained -> AutoModelForCausalLM: same tensors, logits and config."""
    models.save_pretrained(models.from_pretrained(hf_checkpoint.path), tmp_path)
    assert _tensor_names(tmp_path) == _tensor_names(hf_checkpoint.path)
    reloaded, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    np.testing.assert_allclose(_hf_logits(reloaded.eval(), input_ids), hf_checkpoint.logits(input_ids), atol=1e-5,
                               rtol=0)
    expected, got = hf_checkpoint.model.state_dict(), reloaded.state_dict()
    assert expected.keys() == got.keys()
    assert [k for k in expected if not torch.equal(expected[k], got[k])] == []

    def kept(config):
        return {k: v for k, v in config.to_dict().items() if k not in _CONFIG_FIELDS_NOT_KEPT}

    assert kept(transformers.AutoConfig.from_pretrained(tmp_path)) == kept(hf_checkpoint.model.config)


def test_sharded_checkpoint_loads(hf_checkpoint, input_ids, logits_of):
    assert os.path.exists(os.path.join(hf_checkpoint.sharded_path, "model.safetensors.index.json"))
    np.testing.assert_array_equal(logits_of(models.from_pretrained(hf_checkpoint.sharded_path), input_ids),
                                  logits_of(models.from_pretrained(hf_checkpoint.path), input_ids))


def test_save_sharded(hf_checkpoints, input_ids, tmp_path):
    checkpoint = hf_checkpoints("llama_gqa_bias")
    models.save_pretrained(models.from_pretrained(checkpoint.path), tmp_path, max_shard_size="30KB")
    with open(tmp_path / "model.safetensors.index.json") as f:
        shards = set(json.load(f)["weight_map"].values())
    assert len(shards) > 2 and shards == {p.name for p in tmp_path.glob("model-*.safetensors")}
    assert not (tmp_path / "model.safetensors").exists()
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    np.testing.assert_array_equal(_hf_logits(reloaded, input_ids), checkpoint.logits(input_ids))


@pytest.mark.parametrize("name", ["llama_gqa_bias", "neox_parallel"])
def test_load_onto_a_mesh_equals_plain_load(name, hf_checkpoints):
    """The per-device read path on a 1-device mesh: bitwise the plain load, laid out as param_shardings says
    (the GPT-NeoX checkpoint has the fused qkv, whose Split has three parts)."""
    mesh = sharding.make_mesh((1, 1, 1))
    plain, on_mesh = (nnx.state(models.from_pretrained(hf_checkpoints(name).path, mesh=m)) for m in (None, mesh))
    jax.tree.map(np.testing.assert_array_equal, on_mesh, plain)
    jax.tree.map(lambda x, s: x.sharding.is_equivalent_to(s, x.ndim) or pytest.fail(f"{x.sharding} != {s}"),
                 on_mesh, sharding.param_shardings(on_mesh, mesh))


def test_blocks_that_cut_inside_a_split_read_the_axis_whole(hf_checkpoints):
    """A block cutting a split's inner axes (the fused q/k/v, head_dim) reads that HF axis whole and cuts it after;
    the sharding rules never ask for one, so it is checked here directly against the whole tensor's conversion."""
    path = hf_checkpoints("neox_parallel").path
    config = models.GPTNeoXConfig.from_hf_config(hf.read_config(path))
    template = "gpt_neox.layers.{i}.attention.query_key_value.weight"
    (ops,) = [ops for hf_key, _, ops in models.gpt_neox.HF_WEIGHTS if hf_key == template]
    with safe_open(os.path.join(path, "model.safetensors"), framework="numpy") as f:
        tensor, whole = f.get_slice(template.format(i=1)), f.get_tensor(template.format(i=1))
        kernel = hf._to_nnx(ops, whole, config)  # [D, N, 3, H] = [64, 4, 3, 16]
        for box in ([(0, 64), (1, 3), (0, 3), (0, 16)], [(8, 24), (0, 4), (1, 2), (0, 16)],
                    [(0, 64), (2, 3), (0, 3), (4, 12)]):
            np.testing.assert_array_equal(hf._read_block(tensor, ops, box, config, np.float32),
                                          kernel[tuple(slice(*r) for r in box)])


def _hub_style(hf_config: dict) -> dict:
    """The config.json keys released checkpoints use instead of transformers 5's rope_parameters."""
    hf_config = dict(hf_config)
    rope = dict(hf_config.pop("rope_parameters"))
    if hf_config["model_type"] == "gpt_neox":
        return {**hf_config, "rotary_emb_base": rope["rope_theta"], "rotary_pct": rope["partial_rotary_factor"]}
    theta, rope_type = rope.pop("rope_theta"), rope.pop("rope_type")
    rope_scaling = None if rope_type == "default" else {"type": rope_type, **rope}  # older files say "type"
    return {**hf_config, "rope_theta": theta, "rope_scaling": rope_scaling}


def test_hub_style_config(hf_checkpoint, input_ids, logits_of, tmp_path):
    folder = shutil.copytree(hf_checkpoint.path, tmp_path / "hub")
    with open(folder / "config.json") as f:
        hf_config = json.load(f)
    with open(folder / "config.json", "w") as f:
        json.dump(_hub_style(hf_config), f)
    hub_model = models.from_pretrained(folder)
    assert hub_model.config == models.from_pretrained(hf_checkpoint.path).config
    hub_rope = transformers.AutoConfig.from_pretrained(folder).rope_parameters  # transformers keeps "type" as well
    assert {k: v for k, v in hub_rope.items() if k != "type"} == hf_checkpoint.model.config.rope_parameters
    np.testing.assert_allclose(logits_of(hub_model, input_ids), hf_checkpoint.logits(input_ids), atol=1e-4, rtol=0)


def test_bfloat16_safetensors(hf_checkpoints, input_ids, logits_of, tmp_path):
    """A bf16 checkpoint loads (to float32 or bf16 parameters), and bf16 parameters save back bit for bit."""
    checkpoint = hf_checkpoints("neox_parallel")
    bf16 = transformers.AutoModelForCausalLM.from_pretrained(checkpoint.path, dtype=torch.bfloat16)
    bf16.save_pretrained(tmp_path / "bf16")
    as_f32 = models.from_pretrained(tmp_path / "bf16")
    assert {v.dtype for v in jax.tree.leaves(nnx.state(as_f32))} == {jnp.dtype(jnp.float32)}
    np.testing.assert_allclose(logits_of(as_f32, input_ids), checkpoint.logits(input_ids), atol=0.1, rtol=0)
    models.save_pretrained(models.from_pretrained(tmp_path / "bf16", param_dtype=jnp.bfloat16), tmp_path / "out")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert reloaded.dtype == torch.bfloat16
    assert all(torch.equal(v, reloaded.state_dict()[k]) for k, v in bf16.state_dict().items())


def _edited_copy(src, dst, edit):
    """A copy of checkpoint folder `src` whose tensors went through `edit(dict) -> dict`."""
    shutil.copytree(src, dst)
    tensors = edit(load_file(os.path.join(dst, "model.safetensors")))
    save_file(tensors, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    return dst


def _assert_one_line(error):
    """Launch scripts print a user error as `error: <message>`: the message must be one line."""
    assert "\n" not in str(error.value), str(error.value)


def _without(name):
    return lambda tensors: {k: v for k, v in tensors.items() if k != name}


def _with(name, value):
    return lambda tensors: {**tensors, name: value}


@pytest.mark.parametrize("edit, message", [
    (_without("lm_head.weight"), r"missing \(1\): lm_head\.weight"),
    (_without("model.layers.2.mlp.up_proj.bias"), r"missing \(1\): model\.layers\.2\.mlp\.up_proj\.bias"),
    (_with("model.layers.1.self_attn.k_proj.weight", np.zeros((16, 64), np.float32)),
     r"wrong shape \(1\): model\.layers\.1\.self_attn\.k_proj\.weight \(expected \(32, 64\), got \(16, 64\)\)"),
    (_with("model.layers.3.mlp.up_proj.weight", np.zeros((128, 64), np.float32)),
     r"unexpected \(1\): model\.layers\.3\.mlp\.up_proj\.weight"),
], ids=["missing_lm_head", "missing_bias", "wrong_shape", "unexpected"])
def test_bad_tensors(edit, message, hf_checkpoints, tmp_path):
    folder = _edited_copy(hf_checkpoints("llama_gqa_bias").path, tmp_path / "bad", edit)
    with pytest.raises(ValueError, match=message) as error:
        models.from_pretrained(folder)
    _assert_one_line(error)


def test_all_tensor_problems_reported_together(hf_checkpoints, tmp_path):
    def edit(tensors):
        tensors = _without("model.norm.weight")(tensors)
        return {**tensors, "extra.weight": np.zeros(3, np.float32), "lm_head.weight": np.zeros((127, 64), np.float32)}

    folder = _edited_copy(hf_checkpoints("llama_gqa_bias").path, tmp_path / "bad", edit)
    with pytest.raises(ValueError) as error:
        models.from_pretrained(folder)
    assert all(s in str(error.value) for s in ("missing (1): model.norm.weight", "unexpected (1): extra.weight",
                                               "lm_head.weight (expected (128, 64), got (127, 64))"))
    _assert_one_line(error)


def test_buffers_in_old_checkpoints_are_ignored(hf_checkpoints, input_ids, logits_of, tmp_path):
    checkpoint = hf_checkpoints("neox_parallel")
    folder = _edited_copy(checkpoint.path, tmp_path / "old", lambda t: {
        **t, "gpt_neox.layers.0.attention.bias": np.ones((1, 1, 4, 4), bool),
        "gpt_neox.layers.0.attention.masked_bias": np.array(-1e9, np.float32),
        "gpt_neox.layers.0.attention.rotary_emb.inv_freq": np.ones(2, np.float32)})
    np.testing.assert_array_equal(logits_of(models.from_pretrained(folder), input_ids),
                                  logits_of(models.from_pretrained(checkpoint.path), input_ids))


def test_bad_folders(hf_checkpoints, tmp_path):
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'nowhere'} is not a folder") as error:
        models.from_pretrained(str(tmp_path / "nowhere"))
    _assert_one_line(error)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'empty'} has no config.json") as error:
        models.from_pretrained(str(tmp_path / "empty"))
    _assert_one_line(error)
    folder = shutil.copytree(hf_checkpoints("llama_gqa_bias").path, tmp_path / "gpt2")
    with open(folder / "config.json", "w") as f:
        json.dump({"model_type": "gpt2"}, f)
    with pytest.raises(ValueError, match="unsupported model_type 'gpt2'; supported: llama, gpt_neox") as error:
        models.from_pretrained(str(folder))
    _assert_one_line(error)
