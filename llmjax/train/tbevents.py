"""A TensorBoard scalar (and per-index histogram) writer in plain Python: no TensorFlow, no torch, no protobuf runtime.

An event file is a sequence of TFRecords (length, masked CRC32C of the length, payload, masked
CRC32C of the payload); each payload is an `Event` protobuf, which for scalars needs only four
fields, encoded here by hand: Event{wall_time=1 double, step=2 int64, file_version=3 string,
summary=5 Summary{value=1 Value{tag=1 string, simple_value=2 float}}}.
"""

from __future__ import annotations

import os
import socket
import struct
import time


def _crc32c_table() -> list[int]:
  table = []
  for byte in range(256):
    crc = byte
    for _ in range(8):
      crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
    table.append(crc)
  return table


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
  crc = 0xFFFFFFFF
  for byte in data:
    crc = _TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(value: int) -> bytes:
  out = bytearray()
  while True:
    bits, value = value & 0x7F, value >> 7
    out.append(bits | (0x80 if value else 0))
    if not value:
      return bytes(out)


def _field_bytes(number: int, payload: bytes) -> bytes:
  return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _event(wall_time: float, step: int, body: bytes) -> bytes:
  return (_varint(1 << 3 | 1) + struct.pack("<d", wall_time) + _varint(2 << 3 | 0) +
          _varint(step & 0xFFFFFFFFFFFFFFFF) + body)


def scalar_event(tag: str, value: float, step: int, wall_time: float) -> bytes:
  value_msg = _field_bytes(1, tag.encode()) + _varint(2 << 3 | 5) + struct.pack("<f", value)
  return _event(wall_time, step, _field_bytes(5, _field_bytes(1, value_msg)))


def _doubles(number: int, values) -> bytes:
  return _field_bytes(number, struct.pack(f"<{len(values)}d", *values))


def histogram_event(tag: str, counts: list[float], step: int, wall_time: float) -> bytes:
  """`counts[i]` as the weight of value i (bucket i ends at i + 0.5): a per-index histogram such
  as the tokens each expert took. HistogramProto{min=1, max=2, num=3, sum=4, sum_squares=5
  doubles; bucket_limit=6, bucket=7 packed doubles} is Summary.Value's field 5."""
  index = range(len(counts))
  stats = (0.0, float(len(counts) - 1), float(sum(counts)),
           float(sum(i * c for i, c in zip(index, counts))),
           float(sum(i * i * c for i, c in zip(index, counts))))
  histo = b"".join(_varint(n << 3 | 1) + struct.pack("<d", v) for n, v in enumerate(stats, 1))
  histo += _doubles(6, [i + 0.5 for i in index]) + _doubles(7, [float(c) for c in counts])
  value_msg = _field_bytes(1, tag.encode()) + _field_bytes(5, histo)
  return _event(wall_time, step, _field_bytes(5, _field_bytes(1, value_msg)))


def record(payload: bytes) -> bytes:
  length = struct.pack("<Q", len(payload))
  return (length + struct.pack("<I", _masked_crc(length)) + payload +
          struct.pack("<I", _masked_crc(payload)))


class EventWriter:
  """Appends scalar events to `logdir/events.out.tfevents.TIME.HOST`."""

  def __init__(self, logdir: str):
    os.makedirs(logdir, exist_ok=True)
    now = time.time()
    name = f"events.out.tfevents.{int(now)}.{socket.gethostname()}"
    self.path = os.path.join(logdir, name)
    self._file = open(self.path, "ab")
    self._file.write(record(_event(now, 0, _field_bytes(3, b"brain.Event:2"))))

  def add_scalar(self, tag: str, value: float, step: int) -> None:
    self._file.write(record(scalar_event(tag, float(value), int(step), time.time())))

  def add_histogram(self, tag: str, counts: list[float], step: int) -> None:
    self._file.write(record(histogram_event(tag, list(counts), int(step), time.time())))

  def flush(self) -> None:
    self._file.flush()

  def close(self) -> None:
    self._file.close()
