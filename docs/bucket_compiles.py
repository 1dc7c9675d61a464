"""How often a subword-tokenized run compiles its train step, with and without length buckets (config.train.
length_buckets): 20 mixed steps of a Hugging Face checkpoint at 8 + 8 rows, one step per call.

    python docs/bucket_compiles.py --model=$HOME/.cache/factrecall-jax/SmolLM2-135M-Instruct [--buckets=0,3]

Prints, per setting, the compiles of the fused train step (`jax_log_compiles`) and the wall time of the run.
"""
import argparse
import logging
import os
import sys
import tempfile
import time

import jax

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from conftest import config_file, override  # noqa: E402
from factrecall_jax import experiment  # noqa: E402


class _Compiles(logging.Handler):
    def __init__(self):
        super().__init__()
        self.count = 0

    def emit(self, record):
        message = record.getMessage()
        self.count += message.startswith("Compiling") and "steps" in message


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True, help="A Hugging Face checkpoint folder (config, weights, tokenizer).")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--buckets", default="0,3", help="The settings of train.length_buckets to run, in order.")
    args = parser.parse_args()
    jax.config.update("jax_log_compiles", True)
    compiles = _Compiles()
    logging.getLogger("jax").addHandler(compiles)
    for buckets in map(int, args.buckets.split(",")):
        config = override(config_file("default.py"), **{
            "init_from": args.model, "tokenizer": args.model, "model": {}, "qa_loss": "answer",
            "data.num_people": 40, "mixed.steps": args.steps, "mixed.bio_batch": 8, "mixed.qa_batch": 8,
            "mixed.qa_token_share": 0.0, "train.steps_per_call": 1, "train.eval_every": 10 * args.steps,
            "train.checkpoint_every": 10 * args.steps, "train.tensorboard": False, "train.length_buckets": buckets,
            "optimizer.learning_rate": 1e-5, "optimizer.warmup_steps": 2})
        compiles.count = 0
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as workdir:
            experiment.train(config, workdir, log=lambda *_: None)
        print(f"length_buckets={buckets}: {compiles.count} compiles of the train step in {args.steps} steps, "
              f"{time.perf_counter() - start:.0f} s (with the final evaluation)", flush=True)


if __name__ == "__main__":
    main()
