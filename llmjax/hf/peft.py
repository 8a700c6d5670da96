"""Hugging Face PEFT adapters <-> llmjax: LoRA / AdaLoRA factors, and tuned prompts.

  save_adapter(model, params, peft, dir)   LoRA / AdaLoRA -> adapter_config.json + safetensors
  save_prompt(model, params, dir)          a decoder's tuned prompt -> PROMPT_TUNING
  load_adapter(dir, model, base_params)    a PEFT LoRA adapter -> the model's full params
  load(dir) -> (model, params)             the adapter over its base_model_name_or_path

Export lives in peft_export, import in peft_import, the layout tracing both use in peft_layout;
this module is their API.

A LoRA pair factorises its projection's kernel, so its PEFT names and orientation come from the
architecture's own tensor table (llmjax/hf/<arch>.py), never from a second map: the table's
`to_hf`, run on an array of kernel indices, shows which HF weight axis is the input, where each
input and output entry lands, and (GPT-2's fused c_attn) which part of the HF module each output
row belongs to. PEFT's `lora_A.weight` is then [R, in] and `lora_B.weight` [out, R] with
delta = scale * B A (transposed into a Conv1D's [in, out] by PEFT itself: fan_in_fan_out).

- Fused c_attn: the targeted parts' LoRAs become one of rank (parts x r), A stacked, B block
  structured (zero rows for untargeted parts); read back, a rank-r c_attn LoRA becomes q, k, v
  LoRAs sharing A. Exact both ways.
- A module whose rank differs from config r (fused, AdaLoRA) gets rank_pattern / alpha_pattern
  entries chosen so that PEFT's alpha/r (or alpha/sqrt(r)) equals llmjax's scale; on import,
  PEFT's per-module scale over llmjax's is folded into b.
- AdaLoRA exports as plain LoRA: e folded into A, only the nonzero-e triplets kept; a module with
  none left keeps rank 1 with zero factors (so target_modules stays the run's).
- Mixtures of experts: LoRA on experts and routers is exported through PEFT's
  `target_parameters` (hf/peft_experts.py); such adapters are not read back (a fused gate_up
  LoRA has no exact split into llmjax's separate wg and wi factors).
- modules_to_save (trained heads: BERT's classifier, a fresh pooler) are saved whole, under PEFT's
  names `base_model.model.<HF key>`.
"""

from llmjax.hf.peft_export import TASK_TYPES, save_adapter, save_prompt
from llmjax.hf.peft_import import (adapter_leaves, base_path, load, load_adapter, lora_settings,
                                   model_like, peft_for_adapter, read_config)
from llmjax.hf.peft_layout import CONFIG, PREFIX, WEIGHTS, AdapterError
from llmjax.models.peft import Peft

__all__ = ["CONFIG", "PREFIX", "TASK_TYPES", "WEIGHTS", "AdapterError", "Peft", "adapter_leaves",
           "base_path", "load", "load_adapter", "lora_settings", "model_like", "peft_for_adapter",
           "read_config", "save_adapter", "save_prompt"]
