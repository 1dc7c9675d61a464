"""GGUF files (llama.cpp's format) converted once to a Hugging Face folder that `from_pretrained` loads.

`from_pretrained` does not read GGUF itself: a GGUF file holds quantized blocks in llama.cpp's layout, with
per-architecture permutations of the attention weights that transformers already undoes (in torch, as it
dequantizes). Converting once to safetensors reuses that, and every loading path here then works on the result,
the per-device reads of a sharded load included, which a quantized block layout would not allow.
"""
import importlib.util
import os

from factrecall_jax import cli, errors

# What transformers reads a GGUF file with, beyond itself.
REQUIRED = ("torch", "gguf", "accelerate")


def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike, *, overwrite: bool = False) -> str:
    """Writes the GGUF checkpoint `gguf_path` as a Hugging Face folder: config.json, float32 safetensors, tokenizer.

    Weights are dequantized to float32, as transformers does; a tied lm_head is not written. The folder appears only
    once everything is written (cli.atomic_output_dir); an existing `out_dir` is an error unless `overwrite`.
    Returns the folder's absolute path.
    """
    if missing := [name for name in REQUIRED if importlib.util.find_spec(name) is None]:
        raise errors.MissingPackage(f"converting a GGUF file needs {', '.join(missing)}, which transformers reads it "
                                    f"with: pip install {' '.join(missing)}")
    import torch
    import transformers

    from factrecall_jax.models import MODELS

    gguf_path = os.path.abspath(os.fspath(gguf_path))
    if not os.path.isfile(gguf_path):
        raise errors.MissingPath(f"{gguf_path} is not a file")
    folder, name = os.path.split(gguf_path)
    with cli.atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        try:
            quantized = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
            tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
        except Exception as e:  # not a GGUF file, an architecture transformers cannot dequantize, a truncated file
            raise errors.InvalidValue(f"cannot read {gguf_path} as a GGUF checkpoint: {e}") from e
        hf_config = quantized.config.to_dict()
        if hf_config["model_type"] not in MODELS:
            raise errors.InvalidValue(f"{gguf_path} holds a {hf_config['model_type']!r} model; supported: "
                                      f"{', '.join(MODELS)}")
        # A GGUF-loaded model refuses save_pretrained: its weights go into a plain model of the same config instead,
        # built on the meta device so that no random initialization is drawn only to be replaced.
        del hf_config["quantization_config"]
        with torch.device("meta"):
            model = transformers.AutoModelForCausalLM.from_config(type(quantized.config).from_dict(hf_config))
        model.load_state_dict(quantized.state_dict(), strict=True, assign=True)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return os.path.abspath(os.fspath(out_dir))
