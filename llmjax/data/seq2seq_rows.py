"""(source, target) pairs -> fixed-width rows for teacher-forced training, packed or one per row.

A pair becomes source tokens + EOS, decoder inputs [start] + target tokens, and labels target
tokens + EOS. Packing puts several pairs side by side in one row of width L; segment ids
(1, 2, ... per pair; 0 padding) keep them apart in every attention, and the decoder's positions
restart at each pair. A pair longer than a row (source + EOS or target + 1 over L) cannot be
trained on whole and is left out, counted.

Row arrays (all [rows, L] int32): "source", "source_segment_ids", "target_in", "target_out",
"target_segment_ids".
"""

from __future__ import annotations

import dataclasses

import numpy as np

from llmjax.errors import DataError

ROW_KEYS = ("source", "source_segment_ids", "target_in", "target_out", "target_segment_ids")


@dataclasses.dataclass(frozen=True)
class SpecialIds:
  """The token ids a seq2seq model needs from its vocabulary."""
  pad: int
  eos: int
  start: int  # the decoder's first input (Marian: its pad; trained vocabularies: [CLS])

  @classmethod
  def of(cls, tokenizer) -> "SpecialIds":
    """pad, eos ([SEP] or </s>) and start ([CLS] or <s>, else pad, as Marian does)."""
    pad, eos = tokenizer.special_id("pad"), tokenizer.special_id("sep")
    if pad is None or eos is None:
      raise DataError(f"tokenizer {tokenizer.name!r} has no pad and end-of-sequence tokens "
                      "([PAD]/<pad>, [SEP]/</s>); seq2seq needs a trained (bpe:N, wordpiece:N) "
                      "or hf:PATH vocabulary that has them")
    start = tokenizer.special_id("cls")
    return cls(pad=pad, eos=eos, start=pad if start is None else start)


def encode_source(tokenizer, texts: list[str], eos: int) -> list[np.ndarray]:
  """Source token ids ending in EOS (added unless the tokenizer's own processing did)."""
  out = []
  for ids in tokenizer.encode_batch(list(texts)):
    ids = np.asarray(ids, np.int32)
    out.append(ids if ids.size and ids[-1] == eos else np.append(ids, np.int32(eos)))
  return out


def encode_target(tokenizer, texts: list[str], eos: int) -> list[np.ndarray]:
  """Target token ids without EOS (rows add it to the labels)."""
  out = []
  for ids in tokenizer.encode_batch(list(texts)):
    ids = np.asarray(ids, np.int32)
    out.append(ids[:-1] if ids.size and ids[-1] == eos else ids)
  return out


def fits(source_ids: np.ndarray, target_ids: np.ndarray, width: int) -> bool:
  return len(source_ids) <= width and len(target_ids) + 1 <= width


def to_rows(sources: list[np.ndarray], targets: list[np.ndarray], width: int,
            special: SpecialIds, *, pack: bool) -> tuple[dict[str, np.ndarray], int]:
  """(row arrays, pairs left out for being longer than a row). Packing is first-fit in the
  given order: a pair goes into the current row if both its sides fit, else starts a new one."""
  rows: list[list[tuple[np.ndarray, np.ndarray]]] = []
  used_source = used_target = 0
  dropped = 0
  for src, tgt in zip(sources, targets):
    if not fits(src, tgt, width):
      dropped += 1
      continue
    need_target = len(tgt) + 1
    if (rows and pack and used_source + len(src) <= width
        and used_target + need_target <= width):
      rows[-1].append((src, tgt))
      used_source, used_target = used_source + len(src), used_target + need_target
    else:
      rows.append([(src, tgt)])
      used_source, used_target = len(src), need_target
  out = {k: np.zeros((len(rows), width), np.int32) for k in ROW_KEYS}
  out["source"][:] = special.pad
  out["target_in"][:] = special.pad
  out["target_out"][:] = special.pad
  for r, pairs in enumerate(rows):
    s = t = 0
    for segment, (src, tgt) in enumerate(pairs, start=1):
      out["source"][r, s:s + len(src)] = src
      out["source_segment_ids"][r, s:s + len(src)] = segment
      n = len(tgt) + 1
      out["target_in"][r, t:t + n] = np.concatenate([[special.start], tgt])
      out["target_out"][r, t:t + n] = np.concatenate([tgt, [special.eos]])
      out["target_segment_ids"][r, t:t + n] = segment
      s, t = s + len(src), t + n
  return out, dropped


def source_batch(sources: list[np.ndarray], width: int, pad: int) -> tuple[np.ndarray, np.ndarray]:
  """Sources right-padded to `width` (longer ones cut to it, EOS kept last) for decoding:
  (tokens [B, width], mask [B, width])."""
  tokens_BS = np.full((len(sources), width), pad, np.int32)
  mask_BS = np.zeros((len(sources), width), np.int32)
  for row, ids in enumerate(sources):
    ids = ids if len(ids) <= width else np.append(ids[:width - 1], ids[-1])
    tokens_BS[row, :len(ids)] = ids
    mask_BS[row, :len(ids)] = 1
  return tokens_BS, mask_BS
