"""Event files are valid TensorBoard records; metrics.jsonl keeps one history across resumes."""

import struct

from tensorboardX.proto import event_pb2  # an independent decoder of the Event protobuf

from llmjax.train import reporting, tbevents


def _read_records(path):
  data, i, payloads = open(path, "rb").read(), 0, []
  while i < len(data):
    header = data[i:i + 8]
    (length,) = struct.unpack("<Q", header)
    assert struct.unpack("<I", data[i + 8:i + 12])[0] == tbevents._masked_crc(header)
    payload = data[i + 12:i + 12 + length]
    assert struct.unpack("<I", data[i + 12 + length:i + 16 + length])[0] == (
        tbevents._masked_crc(payload))
    payloads.append(payload)
    i += 16 + length
  return payloads


def test_crc32c_known_vector():
  assert tbevents.crc32c(b"123456789") == 0xE3069283


def test_event_file_decodes_as_tensorboard_events(tmp_path):
  writer = tbevents.EventWriter(str(tmp_path))
  writer.add_scalar("train/loss", 2.5, 7)
  writer.add_scalar("val/loss", -1.25, 2**40)
  writer.close()
  events = []
  for payload in _read_records(writer.path):
    event = event_pb2.Event()
    event.ParseFromString(payload)
    events.append(event)
  assert events[0].file_version == "brain.Event:2"
  scalars = [(e.step, e.summary.value[0].tag, e.summary.value[0].simple_value) for e in events[1:]]
  assert scalars == [(7, "train/loss", 2.5), (2**40, "val/loss", -1.25)]


def test_metrics_jsonl_truncates_to_the_resumed_step(tmp_path):
  writer = reporting.MetricWriter(str(tmp_path))
  for step in (5, 10, 15):
    writer.write(step, "train", {"loss": 1.0 / step, "nan": float("nan")})
  writer.close()
  reporting.truncate_after(writer.path, 10)
  records = reporting.read_metrics(writer.path)
  assert [r["step"] for r in records] == [5, 10]
  assert records[0]["nan"] == "nan"  # JSON has no NaN: kept as text, never as a number


def test_the_lm_headline_names_the_unit_of_its_tokenizer():
  """Byte-level runs report nats per byte (the README's unit); other vocabularies per token."""
  from llmjax import config as config_lib
  from llmjax.tasks.lm import LM
  exp = config_lib.resolve(config_lib.base_config())
  byte = LM(exp, {"tokenizer": "byte"})
  line = byte.headline(byte.report({"loss_sum": 2.0, "weight": 2.0}))
  assert line.startswith("final validation loss 1.0000 nats/byte (1.443 bits/byte)"), line
  trained = LM(exp, {"tokenizer": "bpe:512"})
  line = trained.headline(trained.report({"loss_sum": 2.0, "weight": 2.0}))
  assert line == "final validation loss 1.0000 nats/token", line


def test_a_step_and_split_the_history_holds_is_not_written_again(tmp_path):
  writer = reporting.MetricWriter(str(tmp_path))
  writer.write(10, "train", {"loss": 1.0})
  writer.write(10, "val", {"loss": 2.0})
  writer.close()
  again = reporting.MetricWriter(str(tmp_path))  # the same run, run again at its last step
  again.write(10, "val", {"loss": 2.0})
  again.write(10, "val/lm", {"loss": 2.0})
  again.write(11, "train", {"loss": 0.5})
  again.write(11, "train", {"loss": 0.5})
  again.close()
  assert [(r["step"], r["split"]) for r in reporting.read_metrics(again.path)] == [
      (10, "train"), (10, "val"), (10, "val/lm"), (11, "train")]
