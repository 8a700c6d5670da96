"""Pod-sized decoders for `llmjax compile` (random init, the model-family presets): GPT-2 1.3B and
Llama-3-8B- and Gemma-2-9B-shaped models, bf16 compute over fp32 parameters, scanned layers with
full remat, FSDP over every chip of the slice.

  llmjax compile --config=experiments/tpu/pod_models.py:llama3_8b --topology=v5e-16 \
      --config.train.batch_size=16 --steps=train
  llmjax compile --config=experiments/tpu/pod_models.py:gemma2_9b,lora --topology=v6e-8 \
      --config.data.seq_len=8192 --config.train.batch_size=8 --config.model.attention_impl=splash

The argument names the model (llama3_8b when none) and optionally `lora` (rank 16 on every
linear layer, the base frozen) and `smoke`. The data is the stdlib byte corpus: compiling needs the shapes only (a run would pass
--config.data.* for its own corpus and tokenizer). docs/tpu.md holds the tables.
"""

from llmjax import config as config_lib

SHAPES = {
    # GPT-3 XL's shape (Brown et al., 2020, table 2.1) in GPT-2's layout: 1.3B parameters.
    "gpt2_1p3b": ("gpt2", dict(vocab_size=50257, d_model=2048, n_layers=24, n_heads=16,
                               d_ff=8192)),
    # Meta-Llama-3-8B's config.json: 8.0B parameters.
    "llama3_8b": ("llama", dict(vocab_size=128256, d_model=4096, n_layers=32, n_heads=32,
                                n_kv_heads=8, d_ff=14336, rope_theta=500000.0)),
    # google/gemma-2-9b's config.json: 9.2B parameters.
    "gemma2_9b": ("gemma2", dict(vocab_size=256000, d_model=3584, n_layers=42, n_heads=16,
                                 n_kv_heads=8, head_dim=256, d_ff=14336)),
}


def get_config(arg=None):
  args = [a for a in (arg or "").split(",") if a]
  names = [a for a in args if a in SHAPES] or ["llama3_8b"]
  preset, shape = SHAPES[names[0]]
  c = config_lib.base_config()
  c.name = f"pod_{names[0]}"
  c.model = config_lib.model_section(preset, max_len=8192, dtype="bfloat16",
                                     param_dtype="float32", scan_layers=True, remat="full",
                                     **shape)
  c.data.source = "stdlib"
  c.data.seq_len = 2048
  c.data.max_bytes = 3_000_000
  c.mesh.update(data=1, fsdp=-1, rules="fsdp")
  c.train.batch_size = 16
  c.train.eval_batches = 1
  if "lora" in args:
    c.finetune.update(method="lora", lora_rank=16, lora_alpha=32.0, lora_targets="all_linear")
  if "smoke" in args:  # the family's layout at a CPU-sized vocabulary too
    c.model.vocab_size = 256
  rest = [a for a in args if a not in SHAPES and a != "lora"]
  return config_lib.finalize(c, ",".join(rest) or None)
