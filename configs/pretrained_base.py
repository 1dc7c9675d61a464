"""The paper's protocol in miniature: both regimes fine-tune one base model instead of a random init.

    python -m launch.reproduce --config=configs/pretrained_base.py --workdir=runs/pretrained_base

A base is first trained (mixed, as configs/default.py trains) on 1000 other people, drawn with config.base.seed, and
saved once as a Hugging Face folder (runs/.../base/hf) with a word tokenizer that knows both populations; mixed and
two-stage training then fine-tune it on the study's people, with the stage-2 sweep as in the default. The paper
fine-tunes one pretrained model both ways, which is what lets grafting one regime's shared parameters into the other
transfer recall; Physics 3.1 (section 6) finds that such pretraining lifts two-stage recall of other people.
"""
import importlib.util
import os

_spec = importlib.util.spec_from_file_location("default", os.path.join(os.path.dirname(__file__), "default.py"))
default = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(default)


def get_config(preset=None):
    """preset "tiny": the tiny preset of configs/default.py with a base of 40 people (a smoke test)."""
    config = default.get_config(preset)
    config.base.num_people = 40 if preset == "tiny" else 1000
    return config
