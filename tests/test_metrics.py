"""MetricsLog: metrics.jsonl and the TensorBoard events hold the same records, also across a resume."""
import glob
import os
import struct

import numpy as np
from tensorboardX.proto import event_pb2

from factrecall_jax import metrics


def record(step, loss):
    return {"step": step, "phase": "mixed", "loss": loss, "grad_norm": 2.0 * loss, "learning_rate": 1e-3,
            "eval": {"qa_test_accuracy": loss / 4, "per_attribute": {"qa_test": {"birth_date": loss / 8}}}}


def read_events(workdir):
    """The events of a directory's event files, oldest file first, from their TFRecord framing (u64 length, u32
    crc, data, u32 crc): tensorboardX ships no reader, and TensorBoard's needs TensorFlow or is not installed."""
    events = []
    for path in sorted(glob.glob(os.path.join(workdir, "events.out.tfevents.*"))):
        with open(path, "rb") as f:
            data = f.read()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset:offset + 8])
            events.append(event_pb2.Event.FromString(data[offset + 12:offset + 12 + length]))
            offset += 12 + length + 4
    return events


def shown_scalars(events):
    """{tag: [(step, value)]} as TensorBoard shows them: a SessionLog START at step s hides the steps >= s before it."""
    shown = {}
    for event in events:
        if event.session_log.status == event_pb2.SessionLog.START:
            shown = {tag: [(s, v) for s, v in points if s < event.step] for tag, points in shown.items()}
        for value in event.summary.value:
            shown.setdefault(value.tag, []).append((event.step, value.simple_value))
    return shown


def expected_scalars(records):
    tags = {"train/loss": "loss", "train/grad_norm": "grad_norm", "train/learning_rate": "learning_rate"}
    expected = {tag: [(r["step"], np.float32(r[field])) for r in records] for tag, field in tags.items()}
    expected["eval/qa_test_accuracy"] = [(r["step"], np.float32(r["eval"]["qa_test_accuracy"])) for r in records]
    expected["eval_per_attribute/qa_test/birth_date"] = [
        (r["step"], np.float32(r["eval"]["per_attribute"]["qa_test"]["birth_date"])) for r in records]
    return expected


def test_events_hold_the_records(tmp_path):
    records = [{"step": 0, "eval": {"qa_test_accuracy": 0.0, "per_attribute": {"qa_test": {"birth_date": 0.0}}}},
               record(10, 1.5), record(20, 0.75)]
    log = metrics.MetricsLog(str(tmp_path / "metrics.jsonl"), 0)
    for r in records:
        log.write(r)
    log.close()
    assert metrics.read_metrics(tmp_path / "metrics.jsonl") == records
    expected = expected_scalars(records[1:])
    for tag in ["eval/qa_test_accuracy", "eval_per_attribute/qa_test/birth_date"]:
        expected[tag].insert(0, (0, 0.0))
    assert shown_scalars(read_events(tmp_path)) == expected


def test_resume_drops_and_purges_the_steps_after_it(tmp_path):
    path = str(tmp_path / "metrics.jsonl")
    log = metrics.MetricsLog(path, 0)
    for step in range(21):
        log.write(record(step, float(step)))
    log.close()
    log = metrics.MetricsLog(path, 10)
    log.write(record(20, 0.5))
    log.close()
    kept = [record(step, float(step)) for step in range(11)] + [record(20, 0.5)]
    assert metrics.read_metrics(path) == kept
    events = read_events(tmp_path)
    assert [e.step for e in events if e.session_log.status == event_pb2.SessionLog.START] == [1, 11]
    assert shown_scalars(events) == expected_scalars(kept)


def test_tensorboard_off_and_other_processes_write_no_events(tmp_path, monkeypatch):
    log = metrics.MetricsLog(str(tmp_path / "metrics.jsonl"), 0, tensorboard=False)
    log.write(record(1, 1.0))
    log.close()
    assert os.listdir(tmp_path) == ["metrics.jsonl"]
    monkeypatch.setattr(metrics.sharding, "is_writer", lambda: False)
    log = metrics.MetricsLog(str(tmp_path / "other" / "metrics.jsonl"), 0)
    log.write(record(1, 1.0))
    log.close()
    assert os.listdir(tmp_path) == ["metrics.jsonl"]
