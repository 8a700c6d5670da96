"""Hugging Face interop: `model, params = load(path)`, `save(model, params, path)`, tokenizers,
and PEFT adapters (`save_adapter`, `load_adapter`, `load_peft`, `save_prompt`).

Reads local directories only (config.json + safetensors; never pickles, never remote code).
Supported: GPT-2, Llama (rope scaling), Gemma 1/2/3 (text), Qwen2, Qwen3, Mistral, the mixtures of
experts Mixtral, Qwen2-MoE and Qwen3-MoE, BERT (base, masked-LM,
sequence classification), the encoder-decoders
Marian (`MarianMTModel`) and BART (`BartForConditionalGeneration`), ResNet (base and image
classification; BatchNorm statistics through `load(..., with_model_state=True)` and
`save(..., model_state=...)`).
"""

from llmjax.hf.api import (ARCHITECTURES, abstract_params, abstract_variables, build,
                           decided_model_fields, load, load_model_state, load_params,
                           model_config, save)
from llmjax.hf.errors import (HFError, PickleWeightsError, UnsupportedModelError,
                              WeightsMismatchError)
from llmjax.hf.peft import AdapterError, load_adapter, save_adapter, save_prompt
from llmjax.hf.peft import load as load_peft
from llmjax.hf.tokens import TextTokenizer, generation_defaults, load_tokenizer

__all__ = ["ARCHITECTURES", "AdapterError", "HFError", "PickleWeightsError", "TextTokenizer",
           "UnsupportedModelError", "WeightsMismatchError", "abstract_params", "abstract_variables",
           "build", "decided_model_fields", "generation_defaults", "load", "load_adapter", "load_model_state",
           "load_params", "load_peft",
           "load_tokenizer", "model_config", "save", "save_adapter", "save_prompt"]
