"""Hugging Face interop: `model, params = load(path)`, `save(model, params, path)`, tokenizers.

Reads local directories only (config.json + safetensors; never pickles, never remote code).
Supported: GPT-2, Llama, BERT (base, masked-LM, sequence classification).
"""

from llmjax.hf.api import (ARCHITECTURES, abstract_params, build, load, load_params,
                           model_config, save)
from llmjax.hf.errors import (HFError, PickleWeightsError, UnsupportedModelError,
                              WeightsMismatchError)
from llmjax.hf.tokens import TextTokenizer, generation_defaults, load_tokenizer

__all__ = ["ARCHITECTURES", "HFError", "PickleWeightsError", "TextTokenizer",
           "UnsupportedModelError", "WeightsMismatchError", "abstract_params", "build",
           "generation_defaults", "load", "load_params", "load_tokenizer", "model_config", "save"]
