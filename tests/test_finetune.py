"""Fine-tuning from a Hugging Face checkpoint, as configs/pythia_*.py do with real models, at a tiny size.

The main job (`python -m launch.reproduce`) starts from a GPT-NeoX checkpoint and a byte-level BPE tokenizer folder
in the style of Pythia's, both built and saved here (no network), with bfloat16 compute: attribute values are several
tokens each, so answers are multi-token. The checkpoint was trained a little in torch on the facts
of a few people, so its step-0 evaluation is neither all zeros nor all ones, and an evaluation computed from torch's
argmax, with answer spans found from the raw strings, can tell a wrong score from a right one.
"""
import json
import os
import subprocess
import sys
import time

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from conftest import config_file
from test_data import save_bpe
from factrecall_jax import checkpoint, data, evaluate, experiment, models, report
from factrecall_jax.data import schedules

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

KNOWN_PEOPLE = 8  # the QA-training people whose facts the checkpoint was pretrained on
TRAIN_SPLITS = ("bio", "qa_train")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The tiny preset cut to one fused call per run (every new shape compiles, and bfloat16 compiles slowly on a CPU), with
# the QA loss on the answers as configs/pythia_*.py train.
JOB_FLAGS = ("--config=configs/default.py:tiny", "--config.dtype=bfloat16", "--config.qa_loss=answer",
             "--config.optimizer.warmup_steps=1", "--config.mixed.steps=4", "--config.two_stage.stage1_steps=4",
             "--config.two_stage.stage2_steps=4", "--config.reproduce.stage2_learning_rates=(1e-3,)",
             "--config.train.eval_every=4", "--config.train.checkpoint_every=4", "--config.trace.num_checkpoints=2",
             "--config.trace.num_people=4", "--config.trace.chunk_size=8")
# The job's programs compile in about half the time with LLVM's optimizations off; they run for milliseconds.
JOB_ENV = {"XLA_FLAGS": (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip(),
           "JAX_NUMPY_RANK_PROMOTION": "raise"}


def _pad(rows, pad_id):
    ids = np.full((len(rows), max(map(len, rows))), pad_id, np.int64)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = r
    return ids


def _encode(tokenizer, text):
    """BOS + tokens + EOS, as a GPT-NeoX tokenizer (which adds neither) is used for training."""
    return [tokenizer.bos_token_id] + tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]


def pretrain(model, tokenizer, texts, steps=40, lr=2e-2):
    """Full-batch AdamW in torch on `texts` (loss on every token after BOS): a checkpoint that knows a few facts."""
    rows = [_encode(tokenizer, t) for t in texts]
    ids = torch.from_numpy(_pad(rows, tokenizer.pad_token_id))
    labels = torch.from_numpy(_pad(rows, -100))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: more threads only contend for the two cores
    try:
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
        for _ in range(steps):
            loss = model(input_ids=ids, labels=labels).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval()


def value_spans(tokenizer, row) -> list[tuple[str, int, int]]:
    """(attribute, first, end) token positions in `_encode(text)` of each value of a dataset row, found from the raw
    strings (tokenizing the text up to the value and up to its end), not from the library's offsets."""
    full = _encode(tokenizer, row["text"])
    spans = []
    for attribute, start, end in zip(row["span_attribute"], row["span_start"], row["span_end"]):
        first = 1 + len(tokenizer(row["text"][:start].rstrip())["input_ids"])
        stop = 1 + len(tokenizer(row["text"][:end])["input_ids"])
        assert full[:stop] == _encode(tokenizer, row["text"][:end])[:-1]  # prefixes tokenize as the whole does
        assert tokenizer.decode(full[first:stop]).strip() == row["text"][start:end]
        spans.append((attribute, first, stop))
    return spans


def torch_recall(model, tokenizer, split) -> np.ndarray:
    """recalled [rows, A] of a dataset split (False where a row has no value of the attribute) by torch's argmax given
    the true prefix: the greedy answer, token by token (evaluate.py's definition)."""
    rows = [dict(zip(split.column_names, values)) for values in zip(*split.to_dict().values())]
    encoded = [_encode(tokenizer, r["text"]) for r in rows]
    with torch.no_grad():
        logits = model(input_ids=torch.from_numpy(_pad(encoded, tokenizer.pad_token_id))).logits
    predicted = logits.argmax(-1).numpy()
    recalled = np.zeros((len(rows), len(data.ATTRIBUTES)), bool)
    for i, (row, ids) in enumerate(zip(rows, encoded)):
        for attribute, first, stop in value_spans(tokenizer, row):
            hits = [predicted[i, j - 1] == ids[j] for j in range(first, stop)]  # position j - 1 predicts token j
            recalled[i, data.ATTRIBUTES.index(attribute)] = all(hits)
    return recalled


def torch_evaluation(model, tokenizer, dataset_dict) -> dict:
    """{"<split>_accuracy"} as the Evaluator defines them, from torch_recall (a QA row holds one value, a biography
    six)."""
    out = {}
    for split in dataset_dict:
        recalled = torch_recall(model, tokenizer, dataset_dict[split])
        values = sum(len(a) for a in dataset_dict[split]["span_attribute"])
        out[f"{split}_accuracy"] = recalled.sum() / values
    return out


def torch_loss(model, tokenizer, texts) -> float:
    """Mean next-token loss over `texts` (every token after BOS), as training weighs them."""
    rows = [_encode(tokenizer, t) for t in texts]
    with torch.no_grad():
        return float(model(input_ids=torch.from_numpy(_pad(rows, tokenizer.pad_token_id)),
                           labels=torch.from_numpy(_pad(rows, -100))).loss)


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    """The main job at a tiny size from a saved GPT-NeoX checkpoint and BPE tokenizer, in bfloat16."""
    transformers.logging.disable_progress_bar()
    root = tmp_path_factory.mktemp("finetune")
    config = config_file("default.py", "tiny")
    dataset_dict = data.build_dataset(data.DatasetConfig(seed=config.seed, **config.data))
    texts = [t for split in dataset_dict.values() for t in split["text"]]
    tokenizer_dir = str(save_bpe(root / "tokenizer", texts, "neox"))
    tokenizer = data.load_tokenizer(tokenizer_dir)

    hf_config = transformers.GPTNeoXConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=256, rotary_pct=0.25, use_parallel_residual=True, initializer_range=0.1,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    known = sorted(set(dataset_dict["qa_train"]["person_id"]))[:KNOWN_PEOPLE]
    facts = [r["text"] for name in TRAIN_SPLITS for r in dataset_dict[name] if r["person_id"] in known]
    model = pretrain(transformers.GPTNeoXForCausalLM(hf_config), tokenizer, facts)
    checkpoint_dir = str(root / "checkpoint")
    model.save_pretrained(checkpoint_dir)  # config.json and model.safetensors, float32

    workdir = str(root / "job")
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "launch.reproduce", *JOB_FLAGS, f"--config.init_from={checkpoint_dir}",
                           f"--config.tokenizer={tokenizer_dir}", "--config.model.model_type=gpt_neox",
                           "--config.model.initializer_range=0.1",  # config.model must not contradict the checkpoint
                           f"--workdir={workdir}"], cwd=REPO,
                          env={**os.environ, **JOB_ENV}, capture_output=True, text=True, timeout=900)
    wall = time.perf_counter() - start
    assert done.returncode == 0, done.stderr[-5000:]
    print(f"fine-tuning job: {wall:.1f} s")
    with open(os.path.join(workdir, "summary.json"), encoding="utf-8") as f:
        summary = json.load(f)
    config = experiment.load_config(workdir)
    tokenized, _ = experiment.load_data(config)  # as the job tokenized it
    return dict(config=config, workdir=workdir, summary=summary, log=done.stdout, wall=wall, model=model,
                tokenizer=tokenizer, dataset=dataset_dict, tokenized=tokenized, checkpoint=checkpoint_dir)


def _metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def test_answers_are_multi_token(finetuned):
    tokenized, tokenizer = finetuned["tokenized"], finetuned["tokenizer"]
    assert tokenizer.bos_token_id == tokenizer.eos_token_id == tokenizer.pad_token_id  # GPT-NeoX: one special token
    for split in ("qa_train", "qa_test"):
        rows = tokenized[split].to_dict()
        lengths = []
        for ids, values, answer in zip(rows["input_ids"], rows["value_attribute_ids"], rows["answer"]):
            answer_ids = [i for i, v in zip(ids, values) if v >= 0]
            assert tokenizer.decode(answer_ids).strip() == answer
            lengths.append(len(answer_ids))
        assert np.mean(lengths) > 1.5, (split, np.bincount(lengths))


def test_port_matches_torch_on_the_checkpoint(finetuned):
    """The JAX port of the saved checkpoint: float32 logits equal torch's; bfloat16 ones (the job's) stay close."""
    tokenizer, dataset = finetuned["tokenizer"], finetuned["dataset"]
    texts = dataset["bio"]["text"][:4] + dataset["qa_train"]["text"][:4] + dataset["qa_test"]["text"][:4]
    rows = [_encode(tokenizer, t) for t in texts]
    ids = _pad(rows, tokenizer.pad_token_id)
    real = np.arange(ids.shape[1])[None, :] < np.array([len(r) for r in rows])[:, None]
    with torch.no_grad():
        expected = finetuned["model"](input_ids=torch.from_numpy(ids)).logits.numpy()
    logits = {}
    for dtype in (jnp.float32, jnp.bfloat16):
        model = models.from_pretrained(finetuned["checkpoint"], dtype=dtype)
        assert isinstance(model, models.GPTNeoX)
        logits[dtype] = np.asarray(model(jnp.asarray(ids, jnp.int32)))
    np.testing.assert_allclose(logits[jnp.float32][real], expected[real], atol=1e-4, rtol=1e-4)
    scale = np.abs(expected[real]).max()
    assert np.abs(logits[jnp.bfloat16][real] - expected[real]).max() < 0.05 * scale
    assert np.mean(logits[jnp.bfloat16][real].argmax(-1) == expected[real].argmax(-1)) > 0.95


def test_step0_evaluation_matches_torch(finetuned):
    """The job's step-0 evaluation of the loaded checkpoint agrees with one computed from torch's argmax; in float32
    the library's Evaluator agrees with it row by row."""
    tokenizer, dataset, model = finetuned["tokenizer"], finetuned["dataset"], finetuned["model"]
    expected = torch_evaluation(model, tokenizer, dataset)
    # the checkpoint knows the facts of KNOWN_PEOPLE of the 20 QA-training people, and is no oracle
    assert 0.1 < expected["qa_train_accuracy"] < 0.9 and expected["qa_test_accuracy"] < 0.1
    assert 0 < expected["bio_accuracy"] < 0.9

    tables = schedules.token_tables(finetuned["tokenized"], tokenizer.pad_token_id)
    graphdef, params = nnx.split(models.from_pretrained(finetuned["checkpoint"]), nnx.Param)
    evaluator = evaluate.Evaluator(tables, graphdef, 64)
    for split in dataset:
        present, recalled = evaluator.recall(params, split)
        np.testing.assert_array_equal(recalled, torch_recall(model, tokenizer, dataset[split]), err_msg=split)
        assert present.sum() == sum(len(a) for a in dataset[split]["span_attribute"])

    step0 = _metrics(os.path.join(finetuned["workdir"], "mixed"))[0]
    assert step0["step"] == 0
    for key, value in expected.items():
        assert step0["eval"][key] == pytest.approx(value, abs=0.05), key  # bfloat16 may flip a near tie


def test_finetuning_lowers_the_loss_and_exports(finetuned):
    """The final mixed model, saved as an HF checkpoint and read by torch: a lower loss on the biographies than the
    checkpoint it started from, and the accuracies the summary reports."""
    tokenizer, dataset = finetuned["tokenizer"], finetuned["dataset"]
    run_dir = os.path.join(finetuned["workdir"], "mixed")
    assert checkpoint.saved_steps(run_dir)[-1] == finetuned["config"].mixed.steps
    run = experiment.Run.load(run_dir)
    out = os.path.join(finetuned["workdir"], "exported")
    models.save_pretrained(nnx.merge(run.graphdef, run.params()), out)
    trained = transformers.GPTNeoXForCausalLM.from_pretrained(out).eval()
    texts = dataset["bio"]["text"]  # trained on every token (QA rows: on the answers only)
    before, after = torch_loss(finetuned["model"], tokenizer, texts), torch_loss(trained, tokenizer, texts)
    assert after < before - 0.05, (before, after)
    final = finetuned["summary"]["mixed"]
    for key, value in torch_evaluation(trained, tokenizer, dataset).items():
        assert final[key] == pytest.approx(value, abs=0.05), key


def test_job_reports_both_regimes_and_looks_inside(finetuned):
    summary, workdir, config = finetuned["summary"], finetuned["workdir"], finetuned["config"]
    saved = experiment.load_config(os.path.join(workdir, "mixed"))
    assert (saved.init_from, saved.dtype) == (finetuned["checkpoint"], "bfloat16")
    for entry in [summary["mixed"], *summary["two_stage_sweep"]]:
        assert {"qa_train_accuracy", "qa_test_accuracy", "bio_accuracy"} <= set(entry)
        assert set(entry["per_attribute"]["qa_test"]) == set(data.ATTRIBUTES)
    assert [e["stage2_lr"] for e in summary["two_stage_sweep"]] == list(config.reproduce.stage2_learning_rates)

    # the trace: the checkpoints of each regime, finite combined traces that differ between the regimes
    assert [c["step"] for c in summary["trace"]["mixed"]["checkpoints"]] == [4]
    assert [c["step"] for c in summary["trace"]["two_stage"]["checkpoints"]] == [4, 8]  # stage 1's, then stage 2's
    traces = {r: load_file(os.path.join(workdir, "trace", f"{r}.safetensors")) for r in ("mixed", "two_stage")}
    assert traces["mixed"].keys() == traces["two_stage"].keys()
    for name, value in traces["mixed"].items():
        assert np.all(np.isfinite(value)) and np.all(np.isfinite(traces["two_stage"][name])), name
    assert any(not np.allclose(v, traces["two_stage"][k]) for k, v in traces["mixed"].items())

    # shared parameters counted in GPT-NeoX's modules: the fused qkv, heads of both layers, no unknown module group
    for regime in ("mixed", "two_stage"):
        for scope in ("global", "tensor"):
            stats = summary["trace"][regime]["shared"][scope]["intersection"]
            groups = report.grouped_counts(stats)
            assert "other" not in groups and {"qkv", "o", "up", "down", "embeddings", "head"} <= set(groups)
            assert stats["total"]["count"] > 0
            assert np.asarray(stats["heads"]).shape == (2, 2) and stats["kv_heads"] is None
        for split in ("qa_train", "qa_test"):
            assert -1 <= summary["consistency"]["gradient"][regime][split]["mean"] <= 1
            rep = summary["consistency"]["representation"][regime][split]
            assert len(rep["subject"]) == len(rep["answer"]) == 3  # embeddings + 2 layers
            assert np.all(np.isfinite(rep["subject"] + rep["answer"]))

    # interventions: the unablated rows are the trained models, shared and random masks of equal counts
    rows = {(r["model"], r["kind"], r["scope"], r["mask"]): r for r in summary["interventions"]}
    assert len(rows) == len(summary["interventions"]) == 2 + 2 * 10
    for key in ("qa_train_accuracy", "qa_test_accuracy", "bio_accuracy"):
        assert rows["mixed", "none", "-", "-"]["accuracies"][key] == summary["mixed"][key]
    for scope in ("global", "tensor"):
        shared, rand = (rows["mixed", "ablate", scope, mask]["count"] for mask in ("shared", "random"))
        assert shared == rand > 0

    with open(os.path.join(workdir, "report.md"), encoding="utf-8") as f:
        text = f.read()
    assert report.results_table(summary) in text and report.results_table(summary) in finetuned["log"]
    assert "## Inside the models" in text and report.interventions_table(summary["interventions"]) in text
    # the greedy answers about a held-out person: a row per question, with the true answer and each model's
    qa_test = finetuned["dataset"]["qa_test"]
    person = min(qa_test["person_id"])
    for row in (r for r in qa_test if r["person_id"] == person):
        line = next(line for line in text.splitlines() if line.startswith(f"| {row['prompt']} | {row['answer']} |"))
        assert line.count("|") == 5, line  # question, answer, mixed, two-stage
