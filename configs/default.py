"""The tiny CPU experiment: 1000 people, word-level tokens, a 2-layer Llama-architecture model from scratch.

    python -m launch.generate_data --config=configs/default.py --out_dir=/tmp/factrecall-data

Settings follow ../shared/notes/tiny-recall.md (the setting measured to work on 2 CPU cores).
"""
import ml_collections


def get_config():
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
    # QA loss on the answer tokens only ("answer") or on the whole question and answer ("all").
    config.qa_loss = "answer"

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
    return config
