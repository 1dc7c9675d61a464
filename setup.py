"""factrecall-jax: fact recall, two-stage vs mixed training, and the cross-task gradient trace in JAX."""
from setuptools import find_packages, setup

setup(
    name="factrecall-jax",
    version="0.1.0",
    description="Why two-stage training memorizes and mixed training teaches knowledge: a JAX/Flax NNX library",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["factrecall_jax", "factrecall_jax.*"]),
    package_data={"factrecall_jax": ["py.typed"], "factrecall_jax.data": ["pools/*.txt", "pools/*.tsv"]},
    install_requires=[
        "jax>=0.10",
        "flax>=0.12.8",
        "optax>=0.2.8",
        "orbax-checkpoint",
        "transformers>=5.0",
        "tokenizers",
        "datasets>=5.0",
        "safetensors",
        "numpy",
        "chex",
        "absl-py",
        "ml_collections",
        "matplotlib",
        "tensorboardX",
    ],
    # torch is pinned: an unpinned torch pulls the newest CUDA build (several GB); 2.13.0 has a CPU wheel. Opacus is
    # the per-example gradient peer of launch.benchmark_trace, pinned like torch. gguf and accelerate let transformers
    # read the GGUF file of the real checkpoint in tests/test_real_checkpoint.py (models.convert_gguf), pinned too.
    extras_require={"test": ["pytest", "torch==2.13.0", "opacus==1.6.0", "gguf==0.19.0", "accelerate==1.16.0"]},
)
