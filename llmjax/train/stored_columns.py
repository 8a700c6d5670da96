"""What a store of precomputed per-row columns (the offline teacher's top-k, the dpo reference's
log-probabilities) is keyed on, and the check that a stored one still matches."""

from __future__ import annotations

import hashlib
import json
import os
import sys

import numpy as np

MANIFEST = "manifest.json"


def rows_fingerprint(splits: dict) -> dict:
  """{"rows": rows per split, "rows_sha256": one digest of every column of every split}."""
  digest = hashlib.sha256()
  for name in sorted(splits):
    for key in sorted(splits[name]):
      digest.update(f"{name}/{key}".encode())
      digest.update(np.ascontiguousarray(splits[name][key]).tobytes())
  return {"rows": {name: len(next(iter(rows.values()))) for name, rows in splits.items()},
          "rows_sha256": digest.hexdigest()}


def matches(directory: str, manifest: dict, computed_for: str) -> bool:
  """Whether DIRECTORY holds a store whose manifest is `manifest`; a different one is reported
  (it was computed for `computed_for`) and will be computed again."""
  path = os.path.join(directory, MANIFEST)
  if not os.path.isfile(path):
    return False
  with open(path) as f:
    if json.load(f) != manifest:
      print(f"{directory} was computed for {computed_for}: computing it again", file=sys.stderr)
      return False
  return True
