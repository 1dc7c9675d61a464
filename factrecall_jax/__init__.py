"""factrecall-jax: synthetic biographies, Flax Llama / GPT-NeoX ports, training schedules and gradient traces."""

__version__ = "0.1.0"
