"""The negative control: configs/default.py without BIO value dropout.

    python -m launch.reproduce --config=configs/plain.py --workdir=runs/plain

Without the augmentation a tiny model keys later facts of a biography on its earlier values rather than on the
name, so neither regime answers much about held-out people (../shared/notes/tiny-recall.md measured mixed ~0.35).
"""
import importlib.util
import os

_spec = importlib.util.spec_from_file_location("default", os.path.join(os.path.dirname(__file__), "default.py"))
default = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(default)


def get_config(preset=None):
    config = default.get_config(preset)
    config.train.bio_value_dropout = 0.0
    return config
