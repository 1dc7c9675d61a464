"""representations: batched hidden states at positions, and BIO-QA cosine consistency, against plain loops."""
import json

import jax
import numpy as np
import pytest
from flax import nnx

from factrecall_jax import data, models, representations
from factrecall_jax.data.pairs import fact_pairs

N, T = 7, 12


@pytest.fixture(scope="module")
def model():
    return models.from_config(models.LlamaConfig.tiny(), seed=1)


@pytest.fixture(scope="module")
def hidden_loop(model):
    """hidden_loop(inputs_NT, positions_N) -> [L + 1, N, D]: model.hidden_states one row at a time."""
    graphdef, params = nnx.split(model)
    forward = jax.jit(lambda ids_1T: nnx.merge(graphdef, params).hidden_states(ids_1T))
    return lambda inputs_NT, positions_N: np.stack(
        [np.asarray(forward(inputs_NT[i:i + 1]))[:, 0, p] for i, p in enumerate(positions_N)], axis=1)


def random_pairs(seed, vocab_size=128):
    """A pairs dict of random tokens: BIO rows [N, T], QA rows [N, T - 4], positions anywhere in them."""
    rng = np.random.default_rng(seed)
    pairs = {}
    for fmt, length in (("bio", T), ("qa", T - 4)):
        pairs[fmt] = {"inputs": rng.integers(vocab_size, size=(N, length)).astype(np.int32)}
        pairs[f"{fmt}_positions"] = {site: rng.integers(length, size=N) for site in representations.SITES}
    return pairs


def cosine_loop(hidden_loop, pairs):
    out = {}
    for site in representations.SITES:
        bio = hidden_loop(pairs["bio"]["inputs"], pairs["bio_positions"][site])
        qa = hidden_loop(pairs["qa"]["inputs"], pairs["qa_positions"][site])
        out[site] = [np.mean([b @ q / np.linalg.norm(b) / np.linalg.norm(q) for b, q in zip(bio[layer], qa[layer])])
                     for layer in range(len(bio))]
    return out


@pytest.mark.parametrize("batch_size", [3, 256])  # 3 does not divide N; 256 > N
def test_hidden_at_equals_a_loop_over_rows(model, hidden_loop, batch_size):
    pairs = random_pairs(0)
    inputs, positions = pairs["bio"]["inputs"], pairs["bio_positions"]["answer"]
    graphdef, params = nnx.split(model)
    compiled = representations._hidden_at_batch._cache_size()
    hidden = representations.hidden_at(graphdef, params, inputs, positions, batch_size=batch_size)
    assert representations._hidden_at_batch._cache_size() - compiled <= 1  # one shape for every batch of a call
    expected = hidden_loop(inputs, positions)
    assert hidden.shape == (model.config.num_hidden_layers + 1, N, model.config.hidden_size)
    assert hidden.dtype == np.float32
    np.testing.assert_allclose(hidden, expected, rtol=1e-5, atol=1e-5)
    both_NK = np.stack([positions, pairs["bio_positions"]["subject"]], axis=1)
    two = representations.hidden_at(graphdef, params, inputs, both_NK, batch_size=batch_size)
    np.testing.assert_allclose(two[:, :, 0], hidden, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(two[:, :, 1], hidden_loop(inputs, both_NK[:, 1]), rtol=1e-5, atol=1e-5)


def test_right_padding_changes_nothing_before_it(model, hidden_loop):
    """Why hidden_at needs no attention mask: a row cut right after the position gives the same hidden state."""
    inputs, position = random_pairs(3)["bio"]["inputs"][:1], 4
    hidden = representations.hidden_at(*nnx.split(model), inputs, [position])
    np.testing.assert_allclose(hidden, hidden_loop(inputs[:, :position + 1], [position]), rtol=1e-5, atol=1e-5)


def test_consistency_equals_a_cosine_loop(model, hidden_loop):
    pairs = random_pairs(1)
    graphdef, params = nnx.split(model)
    result = representations.representation_consistency(graphdef, params, pairs, batch_size=4)
    expected = cosine_loop(hidden_loop, pairs)
    assert set(result) == {"subject", "answer"}
    for site in result:
        assert len(result[site]) == model.config.num_hidden_layers + 1
        assert all(type(c) is float for c in result[site])
        np.testing.assert_allclose(result[site], expected[site], rtol=1e-5, atol=1e-5)
        assert max(result[site]) < 0.99  # random rows differ
    json.dumps(result)


def test_identical_formats_are_fully_consistent(model):
    pairs = random_pairs(2)
    pairs["qa"], pairs["qa_positions"] = pairs["bio"], pairs["bio_positions"]
    result = representations.representation_consistency(*nnx.split(model), pairs)
    for site in result:
        np.testing.assert_allclose(result[site], 1.0, atol=1e-6)


def test_fact_pairs_share_the_subject_token():
    """On real pairs (word tokenizer) the subject is the same last-name token in both formats, so the embeddings
    (layer 0, no position embedding in Llama) agree exactly; the answer positions hold other tokens."""
    dataset = data.build_dataset(data.DatasetConfig(num_people=6, seed=0))
    tokenizer = data.get_tokenizer("word", dataset)
    pairs = fact_pairs(data.tokenize(dataset, tokenizer), tokenizer.pad_token_id)
    model = models.from_config({**models.LlamaConfig.tiny().to_hf_config(), "vocab_size": len(tokenizer)})
    result = representations.representation_consistency(*nnx.split(model), pairs)
    assert result["subject"][0] == pytest.approx(1.0, abs=1e-6) and result["answer"][0] < 0.9


def test_bad_arguments_raise(model):
    graphdef, params = nnx.split(model)
    inputs = np.zeros((3, 5), np.int32)
    for positions, message in (([0, 1], r"positions of shape \(2,\) are invalid: expected \[3\] or \[3, K\]"),
                               ([0, 1, 5], r"positions in \[0, 5\] are invalid: expected values in \[0, 5\)")):
        with pytest.raises(ValueError, match=message):
            representations.hidden_at(graphdef, params, inputs, positions)
    with pytest.raises(ValueError, match=r"batch_size=0 is invalid: expected a positive integer"):
        representations.hidden_at(graphdef, params, inputs, [0, 1, 2], batch_size=0)
    with pytest.raises(ValueError, match=r"inputs of shape \(5,\) are invalid"):
        representations.hidden_at(graphdef, params, inputs[0], [0])
