"""Generates the bioS dataset, trains or loads its tokenizer, tokenizes, and writes them to one folder.

    python -m launch.generate_data --config=configs/default.py --out_dir=/tmp/factrecall-data

The folder holds dataset/ (DatasetDict.save_to_disk), tokenizer/ (save_pretrained) and config.json; it appears only
when everything is written.
"""
import os

from absl import flags
from ml_collections import config_flags

from factrecall_jax import cli, configuration, experiment

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/default.py.", lock_config=True)
_OUT_DIR = flags.DEFINE_string("out_dir", None, "Output folder; must not exist yet, unless --overwrite.", required=True)
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace out_dir if it exists (only once the new one is complete).")
flags.mark_flag_as_required("config")


def summary(dataset_dict, tokenizer, num_people):
    """A table of rows and tokens per split."""
    lines = [f"{'split':<20} {'rows':>8} {'tokens':>10} {'longest':>8}"]
    for name, split in dataset_dict.items():
        lengths = [len(ids) for ids in split["input_ids"]]
        lines.append(f"{name:<20} {len(split):>8} {sum(lengths):>10} {max(lengths, default=0):>8}")
    lines.append(f"people: {num_people}, vocabulary: {len(tokenizer)} tokens")
    return "\n".join(lines)


def main(_):
    given = _CONFIG.value
    config = configuration.read(given, "data")
    with cli.atomic_output_dir(_OUT_DIR.value, overwrite=_OVERWRITE.value) as tmp:
        tokenized, tokenizer = experiment.load_data(config)
        tokenized.save_to_disk(os.path.join(tmp, "dataset"))
        tokenizer.save_pretrained(os.path.join(tmp, "tokenizer"))
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
            f.write(given.to_json_best_effort(indent=2) + "\n")
    print(summary(tokenized, tokenizer, config.data.num_people))
    print(f"wrote {os.path.abspath(_OUT_DIR.value)}: dataset/, tokenizer/, config.json")


if __name__ == "__main__":
    cli.launch(main)
