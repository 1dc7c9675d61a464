"""Shared-parameter selection against a sort-everything numpy reference, and the aggregations on hand-placed masks."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from factrecall_jax import analysis, models
from factrecall_jax.trace import TraceResult


def tiny_model(config, seed=0):
    """(graphdef, params) of a tiny model with its nnx metadata: shapes from nnx.eval_shape, so nothing is compiled,
    and values drawn in numpy (leaves can be edited in place)."""
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: models.from_config(config)), nnx.Param)
    rng = np.random.RandomState(seed)
    return graphdef, jax.tree.map(lambda x: rng.randn(*x.shape).astype(np.float32), abstract)


@pytest.fixture(scope="module")
def llama_params():
    return tiny_model(models.LlamaConfig.tiny())[1]


@pytest.fixture(scope="module")
def neox_params():
    return tiny_model(models.GPTNeoXConfig.tiny())[1]


def _filled(params, value=0, dtype=np.float32):
    """A fresh numpy tree like params (same nnx metadata) filled with `value`; its leaves can be edited in place."""
    return jax.tree.map(lambda x: np.full(x.shape, value, dtype), params)


def _brute_force(leaves, fraction):
    values = np.concatenate([np.ravel(x) for x in leaves])
    threshold = np.sort(values)[::-1][max(1, round(fraction * values.size)) - 1]
    return [(x >= threshold) & (x > 0) for x in leaves]


def _random_tree(seed):
    """Leaves of several ranks; many ties (few distinct values), negatives, zeros, and a wide range of magnitudes."""
    rng = np.random.RandomState(seed)
    return {"ties": (rng.randint(-3, 6, (7, 5, 3)) / 2).astype(np.float32),
            "wide": (rng.randn(40, 3) * 10.0 ** rng.randint(-44, 38, (40, 3))).astype(np.float32),
            "scalar": np.float32(rng.randn()), "vector": rng.randn(11).astype(np.float32),
            "empty": np.zeros((0, 4), np.float32)}


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("fraction", [1e-3, 0.01, 0.1, 0.37, 0.5, 1.0])
def test_top_fraction_mask_matches_brute_force(seed, fraction):
    tree = _random_tree(seed)
    mask = analysis.top_fraction_mask(tree, fraction)
    expected = _brute_force(jax.tree.leaves(tree), fraction)
    for got, want in zip(jax.tree.leaves(mask), expected, strict=True):
        assert got.dtype == jnp.bool_
        np.testing.assert_array_equal(got, want)


def test_top_fraction_mask_on_params_keeps_metadata(llama_params):
    scores = jax.tree.map(np.abs, llama_params)
    mask = analysis.top_fraction_mask(scores, 0.01)
    leaves = jax.tree.leaves(scores)
    for got, want in zip(jax.tree.leaves(mask), _brute_force([np.asarray(x) for x in leaves], 0.01), strict=True):
        np.testing.assert_array_equal(got, want)
    assert sum(int(m.sum()) for m in jax.tree.leaves(mask)) == round(0.01 * sum(x.size for x in leaves))  # no ties
    variables = [jax.tree.leaves(t, is_leaf=lambda x: isinstance(x, nnx.Variable)) for t in (mask, llama_params)]
    assert [v.get_metadata()["out_sharding"] for v in variables[0]] == \
        [v.get_metadata()["out_sharding"] for v in variables[1]]


@pytest.mark.parametrize("fraction", [1e-3, 0.1, 0.5])
def test_top_fraction_mask_per_tensor_matches_brute_force_per_leaf(fraction):
    tree = _random_tree(0)
    mask = analysis.top_fraction_mask(tree, fraction, scope="tensor")
    for got, leaf in zip(jax.tree.leaves(mask), jax.tree.leaves(tree), strict=True):
        want = _brute_force([leaf], fraction)[0] if np.size(leaf) else np.zeros(np.shape(leaf), bool)
        np.testing.assert_array_equal(got, want)


def test_top_fraction_mask_per_tensor_ranks_each_layer_of_a_stacked_leaf(llama_params):
    """A stacked leaf is one tensor per layer: each layer gets its own top fraction, whatever its scale."""
    scores = jax.tree.map(np.abs, llama_params)
    scores["layers"]["self_attn"]["v_proj"]["kernel"][0] += 100  # one layer of one tensor above everything
    variables = jax.tree.leaves(scores, is_leaf=lambda x: isinstance(x, nnx.Variable))
    mask = analysis.top_fraction_mask(scores, 0.05, scope="tensor")
    for got, leaf in zip(jax.tree.leaves(mask), variables, strict=True):
        x, got = np.asarray(leaf.get_value()), np.asarray(got)
        stacked = leaf.get_metadata()["out_sharding"][0] == "layers"
        for g, want in zip(*((got, x) if stacked else ([got], [x])), strict=True):
            np.testing.assert_array_equal(g, _brute_force([want], 0.05)[0])
            assert g.sum() == max(1, round(0.05 * g.size))  # no ties in random normal draws
    scaled = analysis.top_fraction_mask(scores, 0.05)["layers"]["self_attn"]["v_proj"]["kernel"]
    total = sum(x.size for x in jax.tree.leaves(scores))
    assert np.asarray(scaled)[0].sum() == min(scaled[0].size, round(0.05 * total))  # globally, that layer comes first


@pytest.mark.parametrize("fraction, expected", [
    (0.26, [8, 9, 10]),  # k = round(2.6) = 3
    (0.24, [9, 10]),  # k = round(2.4) = 2
    (0.01, [10]),  # k = max(1, round(0.1)) = 1
    (1.0, list(range(1, 11))),
])
def test_top_fraction_mask_rounds_k(fraction, expected):
    values = np.arange(1, 11, dtype=np.float32)
    mask = analysis.top_fraction_mask({"a": values[:4], "b": values[4:]}, fraction)
    np.testing.assert_array_equal(values[np.concatenate([mask["a"], mask["b"]])], expected)


def test_top_fraction_mask_includes_ties_and_never_nonpositive():
    tree = {"a": np.array([5, 1, 5], np.float32), "b": np.array([[5, -9], [0, 2]], np.float32)}
    mask = analysis.top_fraction_mask(tree, 1 / 6)  # k = 1, but three values tie at 5
    np.testing.assert_array_equal(mask["a"], [True, False, True])
    np.testing.assert_array_equal(mask["b"], [[True, False], [False, False]])
    mask = analysis.top_fraction_mask(tree, 1.0)  # every value, but only the positive ones
    np.testing.assert_array_equal(mask["b"], [[True, False], [False, True]])
    assert not analysis.top_fraction_mask({"a": -np.ones(3, np.float32)}, 0.5)["a"].any()


@pytest.mark.parametrize("fraction", [0, -0.1, 1.01, float("nan")])
def test_top_fraction_mask_rejects_bad_fraction(fraction):
    with pytest.raises(ValueError, match="fraction"):
        analysis.top_fraction_mask({"a": np.ones(3, np.float32)}, fraction)


def test_top_fraction_mask_rejects_unknown_scope():
    with pytest.raises(ValueError, match="scope='layer'.*global, tensor"):
        analysis.top_fraction_mask({"a": np.ones(3, np.float32)}, 0.5, scope="layer")


# Positions in the tiny Llama: (leaf path, index).
Q = (("layers", "self_attn", "q_proj", "kernel"), (1, 3, 2, 5))
OUT = (("layers", "self_attn", "o_proj", "kernel"), (0, 1, 4, 7))
UP = (("layers", "mlp", "up_proj", "kernel"), (1, 0, 9))
EMBED = (("embed_tokens", "embedding"), (17, 3))
NORM = (("norm", "scale"), (6,))


def _leaf(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def _tree_with(params, entries, dtype=np.float32):
    """A zero tree like params with value v at each (position, v) of `entries`."""
    tree = _filled(params, 0, dtype)
    for (path, index), value in entries:
        _leaf(tree, path)[index] = value
    return tree


def _positions(mask):
    """Dotted paths and indices of the True entries of a mask."""
    leaves = jax.tree_util.tree_leaves_with_path(mask, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return {(jax.tree_util.keystr(path, simple=True, separator="."), tuple(int(i) for i in index))
            for path, x in leaves for index in np.argwhere(np.asarray(x))}


def _named(*positions):
    return {(".".join(path), index) for path, index in positions}


def _result(bio_abs, qa_abs, cross, *, pair=((), (), ()), layer=((), (), ())):
    return TraceResult(*(np.asarray(x, np.float32) for x in pair), *(np.asarray(x, np.float32) for x in layer),
                       bio_abs=bio_abs, qa_abs=qa_abs, cross=cross)


@pytest.fixture(scope="module")
def hand_made_result(llama_params):
    size = sum(x.size for x in jax.tree.leaves(llama_params))
    # k = 3 for fraction 3 / size; bio and qa get a small positive background everywhere else, cross stays 0.
    bio = _tree_with(llama_params, [(Q, 5.0), (OUT, 4.0), (UP, 3.0), (EMBED, 0.5)])
    qa = _tree_with(llama_params, [(OUT, 5.0), (UP, 4.0), (NORM, 3.0), (Q, 0.5)])
    cross = _tree_with(llama_params, [(Q, 5.0), (OUT, -10.0), (UP, 3.0), (EMBED, 2.0), (NORM, 1.0)])
    bio, qa = (jax.tree.map(lambda x: x + 1e-3, t) for t in (bio, qa))
    return _result(bio, qa, cross), 3 / size


def test_shared_parameters_intersection(hand_made_result):
    result, fraction = hand_made_result
    assert _positions(analysis.shared_parameters(result, fraction)) == _named(OUT, UP)  # Q and NORM: top-3 of one only
    everything = analysis.shared_parameters(result, 1.0)
    assert len(_positions(everything)) == sum(x.size for x in jax.tree.leaves(result.bio_abs))


def test_shared_parameters_cross_uses_positive_part(hand_made_result):
    result, fraction = hand_made_result
    # OUT has the largest magnitude, but BIO and QA gradients disagree there.
    assert _positions(analysis.shared_parameters(result, fraction, rule="cross")) == _named(Q, UP, EMBED)
    assert _positions(analysis.shared_parameters(result, 1.0, rule="cross")) == _named(Q, UP, EMBED, NORM)


def test_shared_parameters_rejects_unknown_rule(hand_made_result):
    with pytest.raises(ValueError, match="'union'.*intersection, cross"):
        analysis.shared_parameters(hand_made_result[0], rule="union")


def test_module_and_head_counts_llama(llama_params):
    # tiny Llama: L 2, D 64, N 4 query heads, K 2 kv heads, H 16, F 128.
    mask = _filled(llama_params, False, bool)
    attn, mlp = mask["layers"]["self_attn"], mask["layers"]["mlp"]
    attn["q_proj"]["kernel"][1, :, 2, :] = True  # 64 * 16 = 1024 on head (1, 2)
    attn["o_proj"]["kernel"][1, 2, :3, :] = True  # 3 * 64 = 192 on head (1, 2)
    attn["o_proj"]["kernel"][0, 0, 0, 0] = True  # 1 on head (0, 0)
    attn["k_proj"]["kernel"][0, :, 1, :] = True  # 1024 on kv head (0, 1)
    mlp["gate_proj"]["kernel"][0, 5, :] = True  # one input dimension: 1 on every neuron of layer 0
    mlp["down_proj"]["kernel"][1, 7, :] = True  # 64 on neuron (1, 7)
    mask["norm"]["scale"][:4] = True

    counts = analysis.module_counts(mask)
    q = counts["modules"]["layers.self_attn.q_proj.kernel"]
    assert q == {"count": 1024, "size": 2 * 64 * 4 * 16, "fraction": 1024 / 8192, "per_layer": [0, 1024]}
    assert counts["modules"]["layers.self_attn.o_proj.kernel"]["per_layer"] == [1, 192]
    assert counts["modules"]["norm.scale"] == {"count": 4, "size": 64, "fraction": 4 / 64, "per_layer": None}
    assert counts["modules"]["lm_head.kernel"]["count"] == 0
    size = sum(x.size for x in jax.tree.leaves(llama_params))
    total = 1024 + 193 + 1024 + 128 + 64 + 4
    assert counts["total"] == {"count": total, "size": size, "fraction": total / size}
    layer_size = (size - 2 * 128 * 64 - 64) // 2  # all but the embeddings, lm_head and final norm
    assert counts["per_layer"] == [{"count": c, "size": layer_size, "fraction": c / layer_size}
                                   for c in (1 + 1024 + 128, 1024 + 192 + 64)]

    heads = analysis.head_counts(mask)
    expected = np.zeros((2, 4), np.int64)
    expected[1, 2], expected[0, 0] = 1024 + 192, 1
    np.testing.assert_array_equal(heads["heads"], expected)
    np.testing.assert_array_equal(heads["kv_heads"], [[0, 1024], [0, 0]])
    neurons = analysis.neuron_counts(mask)
    expected = np.zeros((2, 128), np.int64)
    expected[0, :], expected[1, 7] = 1, 64
    np.testing.assert_array_equal(neurons, expected)

    sizes = analysis.head_counts(_filled(llama_params, True, bool))
    np.testing.assert_array_equal(sizes["heads"], np.full((2, 4), 2 * 64 * 16))  # q_proj and o_proj
    np.testing.assert_array_equal(sizes["kv_heads"], np.full((2, 2), 2 * 64 * 16))  # k_proj and v_proj
    np.testing.assert_array_equal(analysis.neuron_counts(_filled(llama_params, True, bool)), np.full((2, 128), 3 * 64))


def test_head_counts_neox(neox_params):
    # tiny GPT-NeoX: L 2, D 64, N 4, H 16, F 256; the fused qkv kernel is [L, D, N, 3, H].
    mask = _filled(neox_params, False, bool)
    attention, mlp = mask["layers"]["attention"], mask["layers"]["mlp"]
    attention["query_key_value"]["kernel"][1, :, 3, :, :] = True  # 64 * 3 * 16 = 3072 on head (1, 3)
    attention["query_key_value"]["bias"][0, 2, :, :] = True  # 48 on head (0, 2)
    attention["dense"]["kernel"][0, 2, 0, :] = True  # 64 on head (0, 2)
    attention["dense"]["bias"][0, :] = True  # the output bias belongs to no head
    mlp["dense_h_to_4h"]["bias"][1, 10] = True

    heads = analysis.head_counts(mask)
    assert heads["kv_heads"] is None
    np.testing.assert_array_equal(heads["heads"], [[0, 0, 48 + 64, 0], [0, 0, 0, 3072]])
    expected = np.zeros((2, 256), np.int64)
    expected[1, 10] = 1
    np.testing.assert_array_equal(analysis.neuron_counts(mask), expected)
    assert analysis.module_counts(mask)["modules"]["layers.attention.query_key_value.kernel"]["per_layer"] == [0, 3072]

    everything = _filled(neox_params, True, bool)
    np.testing.assert_array_equal(analysis.head_counts(everything)["heads"], np.full((2, 4), 64 * 48 + 48 + 16 * 64))
    np.testing.assert_array_equal(analysis.neuron_counts(everything), np.full((2, 256), 64 + 1 + 64))


@pytest.mark.parametrize("params_fixture, head_leaves, kv_head_leaves", [
    ("llama_params", ["self_attn.q_proj.kernel", "self_attn.o_proj.kernel"],
     ["self_attn.k_proj.kernel", "self_attn.v_proj.kernel"]),
    ("neox_params", ["attention.query_key_value.kernel", "attention.query_key_value.bias", "attention.dense.kernel"],
     []),
])
def test_head_counts_sum_to_head_leaf_counts(params_fixture, head_leaves, kv_head_leaves, request):
    mask = analysis.top_fraction_mask(jax.tree.map(np.abs, request.getfixturevalue(params_fixture)), 0.2)
    counts, heads = analysis.module_counts(mask)["modules"], analysis.head_counts(mask)
    assert int(heads["heads"].sum()) == sum(counts[f"layers.{name}"]["count"] for name in head_leaves) > 0
    assert (0 if heads["kv_heads"] is None else int(heads["kv_heads"].sum())) == \
        sum(counts[f"layers.{name}"]["count"] for name in kv_head_leaves)


def test_counts_reject_non_boolean_mask(llama_params):
    with pytest.raises(ValueError, match="dtype float32"):
        analysis.module_counts(llama_params)


def test_concentration_known_values():
    assert analysis.concentration(np.full((3, 4), 7), top_k=3) == {"top_k_share": 0.25, "gini": 0.0}
    one_hot = np.zeros(8)
    one_hot[5] = 2
    assert analysis.concentration(one_hot) == {"top_k_share": 1.0, "gini": 7 / 8}
    # [0, 1, 3]: mean |x_i - x_j| over ordered pairs 12 / 9, divided by 2 * mean 8 / 3: gini 1 / 2.
    out = analysis.concentration([3, 0, 1], top_k=1)
    assert out["top_k_share"] == 0.75 and out["gini"] == pytest.approx(0.5)
    assert analysis.concentration(np.zeros(5)) == {"top_k_share": 0.0, "gini": 0.0}
    with pytest.raises(ValueError, match="values >= 0"):
        analysis.concentration([1, -1])
    with pytest.raises(ValueError, match="top_k=0"):
        analysis.concentration([1, 2], top_k=0)


def test_gradient_consistency_known_cosines():
    # cosines 3/3, 0/2, -2/4, and 0 where the BIO gradient is zero.
    pair = ([3, 0, -2, 0], [9, 4, 4, 0], [1, 1, 4, 5])
    # layer 0 cosines 1, -1, 0 (zero QA norm), 0.5; layer 1 all 0.
    layer = ([[2, 0], [-1, 0], [1, 0], [2, 0]], [[4, 1], [1, 1], [1, 1], [4, 0]], [[1, 1], [1, 1], [0, 1], [4, 0]])
    result = _result({}, {}, {}, pair=pair, layer=layer)
    np.testing.assert_allclose(analysis.pair_cosines(result), [1, 0, -0.5, 0])
    out = analysis.gradient_consistency(result, groups={"attribute": ["city", "job", "city", "job"]})
    assert out["mean"] == pytest.approx(0.125)
    np.testing.assert_allclose(out["per_layer"], [0.125, 0])
    assert out["by_attribute"] == pytest.approx({"city": 0.25, "job": 0.0})
    assert set(analysis.gradient_consistency(result)) == {"mean", "per_layer"}
    with pytest.raises(ValueError, match="groups\\['attribute'\\] has shape \\(3,\\)"):
        analysis.gradient_consistency(result, groups={"attribute": ["a", "b", "c"]})
