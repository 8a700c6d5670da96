"""llmjax segment --image=FILE --out=FILE.png [--bandwidth=B] [--spatial_weight=W]

Mean-shift segmentation (llmjax.cluster.segment_image, docs/clustering.md): every pixel is a point
of its colour (0..1 per channel) and its position (the longer side spanning W); pixels that climb
to the same mode form a region painted in the mode's colour. Writes the segmented image as a PNG
and prints the number of regions. Without --bandwidth it is estimated on 2,000 pixels.
"""

from __future__ import annotations

import math
import os
import sys

from absl import flags

from llmjax.cli import common

# This verb's flags alone (not absl's global FLAGS): verbs share flag names (--workdir,
# --step, --out, ...) and run side by side in one process (tests, notebooks).
FLAGS = flags.FlagValues()
_IMAGE = flags.DEFINE_string("image", None, "The image to segment (any format Pillow reads).",
                             flag_values=FLAGS)
# `llmjax export` defines --out too, and a test process imports both verbs: this one yields to
# an earlier or later definition (both are strings, read by name at parse time).
_OUT = flags.DEFINE_string("out", None, "Where to write the segmented image (.png).",
                           flag_values=FLAGS)
_BANDWIDTH = flags.DEFINE_float("bandwidth", None, "Mean-shift bandwidth in feature units (a "
                                "colour channel spans 1); default: estimated.", flag_values=FLAGS)
_SPATIAL = flags.DEFINE_float("spatial_weight", 0.5, "How far apart the image's longer side puts "
                              "its two ends, in colour units (0: colour alone).", flag_values=FLAGS)
_KERNEL = flags.DEFINE_enum("kernel", "flat", ["flat", "gaussian"], "Mean-shift kernel.",
                            flag_values=FLAGS)
_BIN_SEEDING = flags.DEFINE_boolean("bin_seeding", True, "Seed from a grid of cells of side "
                                    "bandwidth (fast) instead of from every pixel.",
                                    flag_values=FLAGS)


def main(argv: list[str] | None = None) -> None:
  common.parse_flags(sys.argv if argv is None else argv)
  if not _IMAGE.value or not _OUT.value:
    common.fail("--image=FILE and --out=FILE.png are required")
  if not _OUT.value.lower().endswith(".png"):
    common.fail(f"--out={_OUT.value} must name a .png file")
  if os.path.isdir(_OUT.value):
    common.fail(f"--out={_OUT.value} is a directory; name a .png file")
  bandwidth = _BANDWIDTH.value
  if bandwidth is not None and not (math.isfinite(bandwidth) and bandwidth > 0):
    common.fail(f"--bandwidth must be a finite number > 0, got {bandwidth}")
  if not (math.isfinite(_SPATIAL.value) and _SPATIAL.value >= 0):
    common.fail(f"--spatial_weight must be a finite number >= 0, got {_SPATIAL.value}")
  with common.user_errors():
    from llmjax import cluster  # heavy imports only after the flags are known to be good
    pixels = _read(_IMAGE.value)
    result = cluster.segment_image(pixels, bandwidth, spatial_weight=_SPATIAL.value,
                                   bin_seeding=_BIN_SEEDING.value, kernel=_KERNEL.value)
    _write(result.image, _OUT.value)
  print(f"{result.regions} regions (bandwidth {result.bandwidth:.4g}) -> {_OUT.value}")


def _read(path: str):
  """uint8 [H, W] (grey) or [H, W, 3] (colour; alpha and palettes dropped); UserError if not."""
  import numpy as np
  from PIL import Image, UnidentifiedImageError  # deferred with the library, as above
  from llmjax.errors import UserError
  try:
    with Image.open(path) as image:
      grey = image.mode in ("1", "L", "LA", "I", "I;16", "F")
      return np.asarray(image.convert("L" if grey else "RGB"))
  except (OSError, UnidentifiedImageError) as e:
    raise UserError(f"--image={path}: cannot read it as an image ({e.__class__.__name__}: "
                    f"{' '.join(str(e).split())[:200]})") from None


def _write(pixels, path: str) -> None:
  """The PNG, written whole (a temporary file renamed) so no half image is left behind."""
  from PIL import Image  # deferred with the library, as above
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  Image.fromarray(pixels[:, :, 0] if pixels.shape[2] == 1 else pixels).save(path + ".tmp",
                                                                             format="PNG")
  os.replace(path + ".tmp", path)


if __name__ == "__main__":
  main()
