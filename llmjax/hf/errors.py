"""What can be wrong with a Hugging Face directory; each message names the file or tensor."""

from llmjax.errors import UserError


class HFError(UserError):
  """A Hugging Face model directory llmjax cannot read or write as asked."""


class UnsupportedModelError(HFError):
  """A model_type, architecture or setting with no llmjax equivalent (or the reverse on export)."""


class PickleWeightsError(HFError):
  """Only pickled `*.bin` weights: refused, since unpickling can run arbitrary code."""


class WeightsMismatchError(HFError):
  """Tensors missing, unexpected or of the wrong shape for the model the config describes."""
