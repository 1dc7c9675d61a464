"""The tiny CPU experiment: 1000 people, word-level tokens, a 2-layer Llama-architecture model from scratch, and
no augmentation (one biography per person, sentences in a fixed order), as in Physics of LMs 3.1's bioS single.

    python -m launch.reproduce --config=configs/default.py --workdir=runs/default
    python -m launch.train --config=configs/default.py --config.schedule=two_stage --workdir=runs/two_stage
    python -m launch.reproduce --config=configs/default.py:tiny --workdir=/tmp/smoke   # seconds: a smoke test

Mixed training follows Physics 3.1's mixing (QA 80% of the training tokens, loss on the whole QA text); the optimizer
and model size come from the search in docs/search.md, which also says what was tried and what bounds the result.
configs/augmented.py is the same with BIO value dropout (the augmentation control).
"""
import ml_collections


def get_config(preset=None):
    """preset "tiny": 40 people, a width-32 model and a few dozen steps, for smoke tests (results mean nothing)."""
    if preset not in (None, "tiny"):
        raise ValueError(f"unknown preset {preset!r}: expected none or 'tiny' (configs/default.py:tiny)")
    config = ml_collections.ConfigDict()
    # One seed for the data (people, templates, split) and, in training, the model init.
    config.seed = 0

    # Fields of data.DatasetConfig (its docstring explains each); the seed comes from config.seed.
    config.data = ml_collections.ConfigDict()
    config.data.num_people = 1000
    config.data.qa_train_fraction = 0.5
    config.data.bio_variants = 1
    # One template per attribute: the notes measured 5 templates to hurt a tiny model (0.21 vs 0.95 held-out).
    config.data.bio_templates = 1
    config.data.permute = False
    config.data.fullname = False
    config.data.qa_paraphrases = 0

    # "word": train a word-level tokenizer on the dataset (one token per word or attribute value); otherwise
    # a Hugging Face tokenizer folder or hub id, for pretrained models.
    config.tokenizer = "word"
    # QA loss on the answer tokens only ("answer") or on the whole question and answer ("all", as Physics 3.1 trains
    # QA entries like any text): "all" lifted mixed held-out accuracy from 0.37 to 0.51 (docs/search.md).
    config.qa_loss = "all"

    # A Hugging Face style model config (config.json fields); the vocabulary size comes from the tokenizer.
    config.model = ml_collections.ConfigDict()
    config.model.model_type = "llama"
    config.model.hidden_size = 128
    config.model.intermediate_size = 344
    config.model.num_hidden_layers = 2
    config.model.num_attention_heads = 4
    config.model.num_key_value_heads = 4
    config.model.max_position_embeddings = 256
    config.model.rope_theta = 10000.0
    config.model.rms_norm_eps = 1e-5
    config.model.tie_word_embeddings = False
    # About 1/sqrt(hidden_size): transformers' 0.02 suits widths near 2500; at width 128 it halved held-out accuracy
    # after 1000 mixed steps (0.42 vs 0.72 on seed 0).
    config.model.initializer_range = 0.088
    # "" trains config.model from a seeded random init; an HF folder or hub id fine-tunes that checkpoint instead.
    config.init_from = ""
    # Computation dtype ("float32" or "bfloat16"); parameters and optimizer state stay float32.
    config.dtype = "float32"

    # "mixed" or "two_stage"; both start from the same init (config.seed or config.init_from).
    config.schedule = "mixed"
    # AdamW (weight decay on matrices only), linear warmup, cosine decay to end_lr_fraction of the peak over the last
    # decay_fraction of the steps after warmup (1.0: all of them; less: warmup-stable-decay), clipping. A high peak and
    # strong decay make mixed training generalize: Physics 3.1's lr 1e-3 and weight decay 0.1 gave mixed 0.10
    # held-out here, lr 3e-3 0.51, lr 5e-3 0.58 (docs/search.md). Warmup-stable-decay (decay over the last 20%)
    # lifted the one-hop mean from 0.67 to 0.77-0.79 on three seeds: held-out recall rises during the decay.
    config.optimizer = ml_collections.ConfigDict(dict(
        learning_rate=5e-3, warmup_steps=100, end_lr_fraction=0.1, weight_decay=1.0, b1=0.9, b2=0.98,
        eps=1e-8, clip_norm=1.0, decay_fraction=0.2))
    # Mixed: every step trains on bio_batch biographies and qa_batch training QA pairs; qa_token_share > 0 replaces
    # qa_batch by the rows that make QA that share of a step's tokens (Physics 3.1: 0.8; config.json records them).
    config.mixed = ml_collections.ConfigDict(dict(steps=2500, bio_batch=16, qa_batch=192, qa_token_share=0.8))
    config.two_stage = ml_collections.ConfigDict()
    # Stage 1: biographies only, as many as mixed training reads (1250 x 32 = 2500 x 16).
    config.two_stage.stage1_steps = 1250
    config.two_stage.bio_batch = 32
    # Stage 2: training QA pairs only, with its own peak learning rate and weight decay (other optimizer settings
    # as config.optimizer); fresh_optimizer=False carries stage 1's Adam moments over.
    config.two_stage.stage2_steps = 500
    config.two_stage.qa_batch = 64
    config.two_stage.stage2_learning_rate = 3e-4
    config.two_stage.stage2_weight_decay = 0.1
    config.two_stage.fresh_optimizer = True
    # A two-stage work directory whose stage-boundary checkpoint this run's stage 2 starts from ("": run stage 1).
    config.two_stage.fork_from = ""
    # Which people a step reads (Zucchet et al. 2025's data-order levers), in every phase of both schedules; both are
    # off here (start_fraction 1, power 0), and steps read every row once per epoch.
    config.people = ml_collections.ConfigDict()
    # The share of the people each phase's first step reads (1.0: all); a seeded order admits them, e.g. 0.25.
    config.people.start_fraction = 1.0
    # The share of each phase's steps over which the admitted share grows linearly to all people (0: all from step 1).
    config.people.widen_fraction = 0.5
    # Rows drawn with weight (rank + 1) ** -power of their person, over a seeded order (0: uniform; Zucchet: 0.6-0.8).
    config.people.power = 0.0

    # The paper's protocol in miniature (configs/pretrained_base.py): num_people > 0 first trains a base model
    # (mixed) on that many other people, drawn with `seed`, and both regimes fine-tune from it. 0: no base.
    config.base = ml_collections.ConfigDict(dict(num_people=0, seed=1000))
    # launch.train and launch.reproduce compile the job's programs first and refuse a plan that does not fit one
    # device (plan.check): limit_gib is that device's memory (0: what the backend reports; a CPU reports none, so the
    # check is skipped there unless it is set), seq_len the row length the plan assumes (a biography here is 37).
    config.memory = ml_collections.ConfigDict(dict(limit_gib=0.0, seq_len=64))
    # The device mesh (sharding.make_mesh): sizes of the data, fsdp and tensor axes, -1 for the rest of the devices.
    # Batches split over data x fsdp; parameters and optimizer state by their logical axis names (sharding.RULES).
    config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    # Call jax.distributed.initialize() first: a multi-host job (a TPU slice, several GPU hosts).
    config.distributed = False

    config.train = ml_collections.ConfigDict()
    # Each attribute-value token of a BIO input becomes the pad token with this probability (targets unchanged): an
    # augmentation, off here; configs/augmented.py turns it on as the control.
    config.train.bio_value_dropout = 0.0
    # Multipliers of each task's summed token loss; the loss is divided by all loss tokens of the batch.
    config.train.task_weights = ml_collections.ConfigDict(dict(bio=1.0, qa=1.0))
    # Micro-batches per step (the update equals the full batch's).
    config.train.grad_accum_steps = 1
    # Steps fused into one jitted call: on a CPU the per-call dispatch costs as much as a tiny model's step.
    config.train.steps_per_call = 50
    config.train.eval_every = 250
    config.train.eval_batch_size = 512
    config.train.checkpoint_every = 500
    # Checkpoints kept per run (0: all; the gradient trace reads several).
    config.train.keep_checkpoints = 0
    # TensorBoard event files next to metrics.jsonl (the same scalars), to watch a run live.
    config.train.tensorboard = True
    # What the backward pass keeps of each layer (models.layers.REMAT_POLICIES): "none" keeps everything (fastest);
    # "nothing_saveable" recomputes each layer, for models whose activations do not fit (launch.plan measures both).
    config.train.remat = "none"
    # Rows of a batch are padded up to one of this many lengths of their split (schedules.TokenTable.bucket_lengths),
    # the same bucket for both tasks of a step, so a subword tokenizer's varying lengths compile each step at most this
    # many times; the word tokenizer's few lengths are all buckets, so nothing changes for it. 0: pad each batch to its
    # own longest row.
    config.train.length_buckets = 3

    # launch.reproduce: stage 2 is forked from one stage-1 run at each of these peak learning rates and weight decays
    # (Physics 3.1's fair two-stage, appendix D, sweeps both and reports the best run). Weight decay 0.01 against 0.1
    # changed no stage-2 result measurably (docs/search.md), so one value is swept here.
    config.reproduce = ml_collections.ConfigDict(dict(stage2_learning_rates=(1e-4, 3e-4, 1e-3),
                                                      stage2_weight_decays=(0.1,)))
    # The look inside (study.mechanisms): TracInCP over num_checkpoints saved steps of each regime, on the six facts
    # of num_people training people (and as many held-out people for consistency), in chunks of chunk_size pairs;
    # shared parameters are the top_fraction by both tasks' summed absolute gradients. trace/<regime>.safetensors keeps
    # the shared masks as bits and, with save_sums, the three float32 sums (3x the model: off for real models).
    config.trace = ml_collections.ConfigDict(dict(num_checkpoints=4, num_people=100, top_fraction=0.01, chunk_size=32,
                                                  save_sums=True))
    if preset == "tiny":
        config.data.num_people = 40
        config.model.update(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=2)
        config.optimizer.warmup_steps = 4
        config.mixed.update(steps=24, bio_batch=8, qa_batch=8, qa_token_share=0.0)
        config.two_stage.update(stage1_steps=16, bio_batch=8, stage2_steps=8, qa_batch=16)
        config.train.update(steps_per_call=4, eval_every=8, checkpoint_every=8, eval_batch_size=64)
        config.reproduce.update(stage2_learning_rates=(3e-4, 1e-3), stage2_weight_decays=(0.1,))
        config.trace.update(num_checkpoints=3, num_people=10, chunk_size=16)
    return config
