"""A real pretrained checkpoint (conftest's `smollm2`, SmolLM2-135M-Instruct) against transformers on English text:
logits with padding, bfloat16, greedy generation, its BPE tokenizer on the bioS data, the trace and the HF round trip.
"""
import importlib.util
import itertools

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from factrecall_jax import data, evaluate, models, trace

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

SENTENCES = ("The capital of France is Paris, and the capital of Italy is Rome.",
             "Water boils at one hundred degrees Celsius at sea level.",
             "She opened the door and walked into the garden.",
             "In 1969, Neil Armstrong became the first person to walk on the Moon.",
             "Most birds can fly, but penguins cannot.")
PROMPTS = ("The capital of France is", "Once upon a time, there", "My favorite food is")


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """torch on one thread while this module runs: on busy shared cores its OpenMP threads wait for each other at
    every barrier, and a forward pass of this model took 20 times longer on 2 threads than on 1."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference(smollm2):
    return transformers.AutoModelForCausalLM.from_pretrained(smollm2).eval()


@pytest.fixture(scope="module")
def model(smollm2):
    return models.from_pretrained(smollm2)


@pytest.fixture(scope="module")
def tokenizer(smollm2):
    return data.load_tokenizer(smollm2)


@pytest.fixture(scope="module", params=["right", "left"])
def batch(request, tokenizer):
    """(input_ids, attention_mask, position_ids) [B, T] of SENTENCES, padded on one side; positions count real
    tokens, so a left-padded row sees the positions it would see alone."""
    encoded = tokenizer(list(SENTENCES), padding=True, padding_side=request.param, return_tensors="np")
    mask = encoded["attention_mask"].astype(np.int32)
    return encoded["input_ids"].astype(np.int32), mask, np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)


def _hf_logits(hf_model, input_ids, attention_mask, position_ids) -> np.ndarray:
    with torch.no_grad():
        return hf_model(**{k: torch.from_numpy(v.astype(np.int64)) for k, v in dict(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).items()}).logits.numpy()


@pytest.fixture(scope="module")
def reference_logits(reference, batch) -> np.ndarray:
    return _hf_logits(reference, *batch)


def test_logits_match_transformers(model, batch, reference_logits, logits_of, request, record_property):
    real = batch[1] == 1
    ours, ref = logits_of(model, *batch)[real], reference_logits[real]
    diff, agreement = np.abs(ours - ref).max(), np.mean(ours.argmax(-1) == ref.argmax(-1))
    record_property("parity", f"SmolLM2-135M, English text, {request.node.callspec.id}-padded: max abs logit diff "
                              f"{diff:.2e} (logits up to {np.abs(ref).max():.1f}), argmax agreement {agreement:.1%} "
                              f"of {real.sum()} positions")
    # 1e-3 for a real checkpoint (bonsai's tolerance): 30 layers of float32 reductions in another order add up.
    np.testing.assert_allclose(ours, ref, atol=1e-3, rtol=0)
    assert agreement == 1


@pytest.fixture(scope="module")
def bfloat16_model(smollm2):
    return models.from_pretrained(smollm2, dtype=jnp.bfloat16)


def test_bfloat16_argmax_agrees(bfloat16_model, batch, reference_logits, logits_of, request, record_property):
    """bfloat16 computation against torch float32: near ties flip (torch's own bfloat16 agrees about 97%)."""
    real = batch[1] == 1
    ours = logits_of(bfloat16_model, *batch)[real]
    agreement = np.mean(ours.argmax(-1) == reference_logits[real].argmax(-1))
    record_property("parity", f"SmolLM2-135M, English text, {request.node.callspec.id}-padded: bfloat16 compute, "
                              f"argmax agreement with torch float32 {agreement:.1%}")
    assert agreement >= 0.95


def test_greedy_generation_matches_transformers(model, reference, tokenizer):
    """Our batched, left-padded generation against transformers' on each prompt alone, token for token."""
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS]
    graphdef, params = nnx.split(model)
    ours = evaluate.generate(graphdef, params, prompts, max_new_tokens=8, pad_id=tokenizer.pad_token_id)
    for prompt, tokens in zip(prompts, ours):
        with torch.no_grad():
            expected = reference.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=int),
                                          max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        expected = expected[0, len(prompt):].tolist()
        assert tokens.tolist() == expected, (tokenizer.decode(tokens), tokenizer.decode(expected))


@pytest.fixture(scope="module")
def bios(smollm2):
    """(tokenizer, tokenized): 50 people's bioS data with the checkpoint's own tokenizer."""
    dataset = data.build_dataset(data.DatasetConfig(num_people=50))
    tokenizer = data.get_tokenizer(smollm2, dataset)
    return tokenizer, data.tokenize(dataset, tokenizer, qa_loss="answer")


def _rows(split):
    columns = split.to_dict()
    return [dict(zip(columns, values)) for values in zip(*columns.values())]


def test_tokenizer_on_the_bios_data(bios, record_property):
    """As tests/test_data.py checks its BPE tokenizers: one run of tokens per biography value, decoding to the value;
    a QA row's loss on its answer's tokens and the EOS."""
    tokenizer, tokenized = bios
    assert tokenizer.is_fast and tokenizer.eos_token_id is not None
    mismatched, spans = [], 0
    for row in _rows(tokenized["bio"]):
        values = {a: row["text"][s:e] for a, s, e in zip(row["span_attribute"], row["span_start"], row["span_end"])}
        runs = [(data.ATTRIBUTES[v], [i for i, _ in group]) for v, group in
                itertools.groupby(zip(row["input_ids"], row["value_attribute_ids"]), key=lambda p: p[1]) if v >= 0]
        assert [a for a, _ in runs] == row["span_attribute"]  # one run per value, in text order
        spans += len(runs)
        mismatched += [(a, values[a]) for a, ids in runs if tokenizer.decode(ids).strip() != values[a]]
    record_property("parity", f"SmolLM2-135M tokenizer on bioS: {len(mismatched)} of {spans} biography value spans "
                              f"mismatched")
    assert mismatched == []
    for name in ("qa_train", "qa_test"):
        for row in _rows(tokenized[name]):
            ids, mask = row["input_ids"], row["loss_mask"]
            targets = [i for i, m in zip(ids, mask) if m]
            assert mask[0] == 0 and targets[-1] == tokenizer.eos_token_id and mask[-1] == 1
            assert tokenizer.decode(targets[:-1]).strip() == row["answer"]
            target_values = [v for v, m in zip(row["value_attribute_ids"], mask) if m]
            assert target_values == [data.ATTRIBUTES.index(row["attribute"])] * (len(targets) - 1) + [-1]


def _torch_gradient(hf_model, example) -> torch.Tensor:
    """The flat gradient of `trace.example_loss` (mean cross-entropy over weighted positions) of one row."""
    logits = hf_model(input_ids=torch.from_numpy(example["inputs"][None].astype(np.int64))).logits[0]
    losses = torch.nn.functional.cross_entropy(logits, torch.from_numpy(example["targets"].astype(np.int64)),
                                               reduction="none")
    weights = torch.from_numpy(example["weights"])
    loss = (losses * weights).sum() / weights.sum().clamp(min=1)
    return torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(hf_model.parameters()))]).double()


def test_trace_matches_torch_autograd(model, reference, bios, record_property):
    """pair_dot and the squared norms of 2 fact pairs against per-example gradients from torch autograd."""
    tokenizer, tokenized = bios
    pairs = data.fact_pairs(tokenized, tokenizer.pad_token_id, num_people=1)
    bio, qa = ({k: v[:2] for k, v in pairs[side].items()} for side in ("bio", "qa"))
    result = trace.cross_task_trace(trace.lm_loss, model, bio, qa, chunk_size=2)  # the default 16 pads to 16 pairs
    relative_errors = {"pair_dot": [], "bio_sq_norm": [], "qa_sq_norm": []}
    for i in range(2):
        g_bio, g_qa = (_torch_gradient(reference, {k: v[i] for k, v in batch.items()}) for batch in (bio, qa))
        for field, u, v in (("pair_dot", g_bio, g_qa), ("bio_sq_norm", g_bio, g_bio), ("qa_sq_norm", g_qa, g_qa)):
            error = abs(float(getattr(result, field)[i]) - float(u @ v)) / float(u.norm() * v.norm())
            relative_errors[field].append(error)
    record_property("parity", "SmolLM2-135M trace of 2 fact pairs vs torch autograd, max error relative to |u||v|: "
                    + ", ".join(f"{field} {max(e):.1e}" for field, e in relative_errors.items()))
    assert max(map(max, relative_errors.values())) <= 1e-4


def test_round_trip_through_transformers(model, reference, tokenizer, tmp_path, record_property):
    """save_pretrained of the loaded model: transformers reads back the same tensors and computes the same logits."""
    models.save_pretrained(model, tmp_path)
    reloaded, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    expected, got = reference.state_dict(), reloaded.state_dict()
    assert expected.keys() == got.keys()
    assert [k for k in expected if not torch.equal(expected[k], got[k])] == []
    input_ids = np.array([tokenizer(SENTENCES[0])["input_ids"]])
    logits = [_hf_logits(m.eval(), input_ids, np.ones_like(input_ids), np.arange(input_ids.shape[1])[None])
              for m in (reloaded, reference)]
    record_property("parity", f"SmolLM2-135M saved by save_pretrained, read by transformers: equal state dicts, max "
                              f"abs logit diff {np.abs(logits[0] - logits[1]).max():.1e}")
    np.testing.assert_array_equal(*logits)


def test_convert_gguf_names_a_missing_package(monkeypatch, tmp_path):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None if name == "gguf" else find_spec(name))
    with pytest.raises(ImportError, match=r"^converting a GGUF file needs gguf, .*: pip install gguf$"):
        models.convert_gguf(tmp_path / "model.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()
