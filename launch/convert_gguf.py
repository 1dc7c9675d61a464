"""Converts a GGUF checkpoint (llama.cpp's format) to a Hugging Face folder that models.from_pretrained loads.

    python -m launch.convert_gguf --gguf=SmolLM2-135M-Instruct.Q4_1.gguf --out_dir=/tmp/smollm2

Needs torch, gguf and accelerate (the test extra has them). The folder holds config.json, model.safetensors (float32)
and the tokenizer; it appears only when everything is written.
"""
from absl import flags

from factrecall_jax import cli, models

_GGUF = flags.DEFINE_string("gguf", None, "The .gguf file to convert.", required=True)
_OUT_DIR = flags.DEFINE_string("out_dir", None, "Output folder; must not exist yet, unless --overwrite.", required=True)
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace out_dir if it exists (only once the new one is complete).")


def main(_):
    print(f"wrote {models.convert_gguf(_GGUF.value, _OUT_DIR.value, overwrite=_OVERWRITE.value)}")


if __name__ == "__main__":
    cli.launch(main)
