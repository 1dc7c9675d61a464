"""One process of a two-process JAX job on CPU (two devices each, one mesh over both: data 2 x fsdp 2, so every
parameter is split across the processes). test_multiprocess.py starts two of these with the same port and work
directory, then checks what they wrote against one process.

    python tests/multiprocess_cases.py PROCESS_ID PORT WORKDIR
"""
import os
import sys

import jax

jax.config.update("jax_cpu_collectives_implementation", "gloo")
process_id, port, workdir = int(sys.argv[1]), sys.argv[2], sys.argv[3]
jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=process_id)

from conftest import tiny_run_config  # noqa: E402  (after jax.distributed.initialize)
from factrecall_jax import experiment, study  # noqa: E402
from factrecall_jax.data import pairs as pairs_lib  # noqa: E402

assert jax.process_count() == 2 and jax.device_count() == 4 and jax.local_device_count() == 2
config = tiny_run_config(data=2, fsdp=2)
experiment.train(config, os.path.join(workdir, "run"), log=lambda *_: None)
run = experiment.Run.load(os.path.join(workdir, "run"))
pairs = pairs_lib.fact_pairs(run.tokenized, run.tokenizer.pad_token_id, "qa_train", 4, seed=config.seed)
combined, records = study.trace_run(run, pairs, num_checkpoints=2, chunk_size=4, log=lambda *_: None)
study.save_trace(combined, records, os.path.join(workdir, "trace.safetensors"))
