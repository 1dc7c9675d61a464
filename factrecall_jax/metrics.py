"""A run's metrics: metrics.jsonl for scripts, and TensorBoard events next to it for watching a long run live.

Apart from experiment.py because the log has two sinks that must agree after a resume, and because readers of a
finished run (study, tests) need `read_metrics` without the training loop.
"""
import json
import os

from factrecall_jax import cli, sharding

# SummaryWriter.flush() does not wait for the events still queued to its writer thread; that thread's own flush, at
# most this many seconds after an event, is what a live TensorBoard sees (as often as the console's progress line).
FLUSH_SECS = 10


class MetricsLog:
    """metrics.jsonl, and TensorBoard events in the same directory, one record per logged step. Reopening drops the
    records a restored checkpoint has not seen from both. Only process 0 writes (`sharding.is_writer`)."""

    def __init__(self, path: str, resume_step: int, *, tensorboard: bool = True):
        self.path = path if sharding.is_writer() else None
        self._events = None
        if self.path is None:
            return
        records = read_metrics(path) if os.path.exists(path) else []
        kept = [r for r in records if r["step"] <= resume_step]
        cli.atomic_write(path, "".join(json.dumps(r) + "\n" for r in kept))
        if tensorboard:
            from tensorboardX import SummaryWriter  # here: it imports torch where installed, and only a writer needs it

            # In the work directory itself: `tensorboard --logdir runs/` then names each run by its work directory.
            # purge_step hides the events of steps > resume_step that an earlier attempt wrote; the suffix keeps a
            # writer from truncating one opened in the same second (file names hold seconds and the host only).
            self._events = SummaryWriter(os.path.dirname(os.path.abspath(path)), purge_step=resume_step + 1,
                                         flush_secs=FLUSH_SECS, filename_suffix=f".{resume_step}")

    def write(self, record: dict) -> None:
        if self.path is None:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self._events is not None:
            for tag, value in _scalars(record).items():
                self._events.add_scalar(tag, value, record["step"])

    def close(self) -> None:
        """Writes out the queued events: without it the last FLUSH_SECS of them may never reach the file."""
        if self._events is not None:
            self._events.close()


def _scalars(record: dict) -> dict[str, float]:
    """A record's TensorBoard tags: train/<field> for its numbers, eval/<name> and eval_per_attribute/<split>/<attr>."""
    evaluation = record.get("eval", {})
    tags = {f"train/{k}": v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
    tags |= {f"eval/{k}": v for k, v in evaluation.items() if isinstance(v, (int, float))}
    for split, accuracies in evaluation.get("per_attribute", {}).items():
        tags |= {f"eval_per_attribute/{split}/{attribute}": v for attribute, v in accuracies.items()}
    return tags


def read_metrics(path: str) -> list[dict]:
    """The records of a metrics.jsonl, in the order written."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
