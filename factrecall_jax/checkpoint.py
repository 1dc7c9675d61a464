"""Orbax checkpoints of a run's TrainState (parameters, optimizer state, step), one folder per saved step."""
import os

import jax
import orbax.checkpoint as ocp

from factrecall_jax.train import TrainState


class Checkpoints:
    """A run's checkpoint folder: save a TrainState, list the saved steps, restore one into a given structure.

    Saving is synchronous: a tiny model saves in milliseconds, and a run killed at any moment then leaves only
    complete checkpoints (orbax writes to a temporary folder and renames it when done).
    """

    def __init__(self, directory: str, max_to_keep: int | None = None, read_only: bool = False):
        self.directory = os.path.abspath(directory)
        if read_only and not os.path.isdir(self.directory):
            raise FileNotFoundError(f"no checkpoints at {self.directory}")
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=False,
                                               read_only=read_only, create=not read_only,
                                               save_interval_steps=0 if read_only else 1)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(self, state: TrainState) -> None:
        step = int(state.step)
        if step not in self._manager.all_steps():
            self._manager.save(step, args=ocp.args.StandardSave(state), force=True)

    def restore(self, step: int, like: TrainState) -> TrainState:
        """The state saved at `step`, with the structure, dtypes and shardings of `like` (arrays or abstract)."""
        if step not in self._manager.all_steps():
            raise FileNotFoundError(f"no checkpoint of step {step} in {self.directory}; saved steps: {self.steps()}")
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        return self._manager.restore(step, args=ocp.args.StandardRestore(abstract))

    def close(self) -> None:
        self._manager.close()
