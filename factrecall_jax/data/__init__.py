"""bioS data: people, biographies and QA pairs as a Hugging Face DatasetDict, tokenizers and loss masks."""
from factrecall_jax.data.dataset import DatasetConfig, build_dataset, tokenize
from factrecall_jax.data.pairs import fact_pairs
from factrecall_jax.data.population import ATTRIBUTES, Person, sample_people
from factrecall_jax.data.tokenizer import get_tokenizer, load_tokenizer, train_word_tokenizer

__all__ = ["ATTRIBUTES", "DatasetConfig", "Person", "build_dataset", "fact_pairs", "get_tokenizer", "load_tokenizer",
           "sample_people", "tokenize", "train_word_tokenizer"]
