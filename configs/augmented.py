"""The augmentation control: configs/default.py with BIO value dropout, everything else the same.

    python -m launch.reproduce --config=configs/augmented.py --workdir=runs/augmented

Each attribute-value token of a BIO input becomes the pad token with probability 0.3 (targets unchanged), so no fact
can be predicted from the values before it and the name is the only reliable key. Like Allen-Zhu & Li's augmentations
(several biographies per person, shuffled sentences: Physics of LMs 3.1, Fig. 3), it lifts two-stage training too,
which narrows the contrast: the README has the numbers of both configs.
"""
import importlib.util
import os

_spec = importlib.util.spec_from_file_location("default", os.path.join(os.path.dirname(__file__), "default.py"))
default = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(default)


def get_config(preset=None):
    config = default.get_config(preset)
    config.train.bio_value_dropout = 0.3
    return config
