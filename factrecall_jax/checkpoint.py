"""Orbax checkpoints of a run's TrainState, one folder per saved step, with the parameters an item of their own
("params"; "optimizer": the optimizer state and step), so that evaluation, the trace and interventions read the
parameters alone: for AdamW a third of the bytes."""
import os

import jax
import orbax.checkpoint as ocp

from factrecall_jax import errors
from factrecall_jax.train import TrainState


class Checkpoints:
    """A run's checkpoint folder: save a TrainState, list the saved steps, restore one into a given structure.

    Saving is synchronous: a tiny model saves in milliseconds, and a run killed at any moment then leaves only
    complete checkpoints (orbax writes to a temporary folder and renames it when done).
    """

    def __init__(self, directory: str, max_to_keep: int | None = None, read_only: bool = False):
        self.directory = os.path.abspath(directory)
        if read_only and not os.path.isdir(self.directory):
            raise errors.MissingPath(f"no checkpoints at {self.directory}")
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=False,
                                               read_only=read_only, create=not read_only,
                                               save_interval_steps=0 if read_only else 1)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(self, state: TrainState) -> None:
        step = int(state.step)
        if step not in self._manager.all_steps():
            self._manager.save(step, force=True, args=ocp.args.Composite(
                params=ocp.args.StandardSave(state.params),
                optimizer=ocp.args.StandardSave({"opt_state": state.opt_state, "step": state.step})))

    def _check(self, step):
        if step not in self._manager.all_steps():
            raise errors.MissingPath(f"no checkpoint of step {step} in {self.directory}; saved steps: {self.steps()}")

    def restore(self, step: int, like: TrainState) -> TrainState:
        """The state saved at `step`, with the structure, dtypes and shardings of `like` (arrays or abstract)."""
        self._check(step)
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        restored = self._manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract.params),
            optimizer=ocp.args.StandardRestore({"opt_state": abstract.opt_state, "step": abstract.step})))
        return TrainState(restored.params, restored.optimizer["opt_state"], restored.optimizer["step"])

    def restore_params(self, step: int, like):
        """The parameters saved at `step` alone (the optimizer state is not read), laid out like `like`."""
        self._check(step)
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        return self._manager.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract))).params

    def close(self) -> None:
        self._manager.close()


def saved_steps(workdir: str) -> list[int]:
    """The steps saved in a work directory, oldest first; an error if there are none."""
    checkpoints = Checkpoints(os.path.join(workdir, "checkpoints"), read_only=True)
    saved = checkpoints.steps()
    checkpoints.close()
    if not saved:
        raise errors.MissingPath(f"{workdir} has no checkpoints yet")
    return saved
