"""A LoRA fine-tune from an HF-format directory of each decoder family, exported as a PEFT
adapter that `peft` loads, with the largest logits difference between llmjax and peft.

No hub here: each family's directory is a small random model transformers builds from a config
with the family's own settings (rope scaling, windows, q/k norms, soft-capping, experts). The
mixtures of experts train LoRA on the experts, shared experts and routers too (exported through
PEFT's target_parameters); llmjax's side of their comparison is the run's merged export. The run is the
real path a user takes: `llmjax train` with `init_from=hf:DIR` and LoRA on every linear layer,
then `llmjax export --out=hf:ADAPTER`, then `peft.PeftModel.from_pretrained`.

  python benchmarks/family_lora_peft.py --out=/tmp/family_lora [--families=qwen2,gemma2]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
COMMON = dict(vocab_size=256, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=2, head_dim=12,
              max_position_embeddings=64, bos_token_id=None, eos_token_id=None, pad_token_id=None)
ROPE = dict(rope_theta=10000.0, original_max_position_embeddings=16)


def family_configs(T) -> dict:
  """family -> (transformers config, model class name)."""
  local2 = ["sliding_attention", "sliding_attention", "full_attention"]
  return {
      "llama3": (T.LlamaConfig(**COMMON, rope_parameters=dict(
          ROPE, rope_type="llama3", factor=4.0, low_freq_factor=1.0, high_freq_factor=4.0)),
                 "LlamaForCausalLM"),
      "qwen2": (T.Qwen2Config(**COMMON, use_sliding_window=True, sliding_window=8,
                              max_window_layers=1), "Qwen2ForCausalLM"),
      "qwen3": (T.Qwen3Config(**COMMON, use_sliding_window=True, sliding_window=8,
                              layer_types=local2), "Qwen3ForCausalLM"),
      "mistral": (T.MistralConfig(**COMMON, sliding_window=8), "MistralForCausalLM"),
      "gemma": (T.GemmaConfig(**COMMON), "GemmaForCausalLM"),
      "gemma2": (T.Gemma2Config(**COMMON, sliding_window=8), "Gemma2ForCausalLM"),
      "gemma3": (T.Gemma3TextConfig(**COMMON, sliding_window=8, layer_types=local2),
                 "Gemma3ForCausalLM"),
      # Mixtures of experts (docs/moe.md): LoRA on experts, shared experts and routers too.
      "mixtral": (T.MixtralConfig(**COMMON, num_local_experts=4, num_experts_per_tok=2,
                                  sliding_window=8), "MixtralForCausalLM"),
      "qwen2_moe": (T.Qwen2MoeConfig(**COMMON, num_experts=4, num_experts_per_tok=2,
                                     moe_intermediate_size=16, shared_expert_intermediate_size=24,
                                     mlp_only_layers=[1]), "Qwen2MoeForCausalLM"),
      "qwen3_moe": (T.Qwen3MoeConfig(**COMMON, num_experts=4, num_experts_per_tok=2,
                                     moe_intermediate_size=16, decoder_sparse_step=1),
                    "Qwen3MoeForCausalLM"),
  }


MOE = ("mixtral", "qwen2_moe", "qwen3_moe")
# Every linear layer of a mixture of experts, the routers included.
MOE_TARGETS = r"(.*/)?(attn/(q|k|v|o)|mlp/(router|((shared|experts)/)?(wi|wg|wo)))"


# The experiment: the HF directory's own model (its config, read by llmjax.hf), LoRA on every
# linear layer, three steps on a tiny byte-level corpus. `--config=FILE:HF_DIR`.
EXPERIMENT = '''
import dataclasses
import pathlib

from llmjax import config as config_lib, hf


def get_config(hf_dir):
  c = config_lib.base_config()
  model = dataclasses.asdict(hf.model_config(hf_dir))
  c.model = config_lib.model_section("llama", **model)
  corpus = pathlib.Path(__file__).parent / "corpus"
  c.data.update(dict(source="files", files=str(corpus / "*.txt"), tokenizer="byte", seq_len=32))
  c.train.update(dict(steps=3, batch_size=8, log_every=1, eval_every=3, eval_batches=1,
                      checkpoint_every=3, progress=False, sample_prompts=0,
                      init_from=f"hf:{hf_dir}"))
  c.optim.update(dict(lr=0.05, warmup_steps=1))
  c.finetune.update(dict(method="lora", lora_rank=4, lora_alpha=8.0, lora_targets="all_linear"))
  return c
'''


def _cli(*args: str) -> None:
  subprocess.run([sys.executable, "-m", "llmjax.cli.main", *args], cwd=REPO, check=True)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", required=True, help="a new directory for models, runs, adapters")
  parser.add_argument("--families", default="", help="comma-separated subset (default: all)")
  args = parser.parse_args()
  import peft
  import torch
  import transformers as T

  from llmjax import hf
  root = pathlib.Path(args.out)
  corpus = root / "corpus"
  corpus.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(0)
  for name in "ab":
    (corpus / f"{name}.txt").write_text(" ".join(rng.choice("the cat sat on a mat".split(), 300)))
  (root / "experiment.py").write_text(EXPERIMENT)
  configs = family_configs(T)
  chosen = args.families.split(",") if args.families else list(configs)
  tokens_BL = np.random.default_rng(1).integers(0, 256, (2, 20))  # longer than every window
  for family in chosen:
    config, cls = configs[family]
    torch.manual_seed(0)
    base, run, adapter = (root / family / part for part in ("hf", "run", "adapter"))
    getattr(T, cls)(config).save_pretrained(str(base))
    moe = family in MOE
    _cli("train", f"--config={root / 'experiment.py'}:{base}", f"--workdir={run}",
         *([f"--config.finetune.lora_targets={MOE_TARGETS}"] if moe else []))
    _cli("export", f"--workdir={run}", f"--out=hf:{adapter}")
    written = json.loads((adapter / "adapter_config.json").read_text())
    targets = written["target_modules"] + written.get("target_parameters", [])
    reference = peft.PeftModel.from_pretrained(getattr(T, cls).from_pretrained(str(base)).eval(),
                                               str(adapter)).eval()
    with torch.no_grad():
      theirs = reference(input_ids=torch.tensor(tokens_BL)).logits.numpy()
    if moe:  # llmjax reads no target_parameters adapter back: its own merged export instead
      _cli("export", f"--workdir={run}", f"--out=hf:{root / family / 'merged'}", "--merge")
      model, params = hf.load(str(root / family / "merged"))
    else:
      model, params = hf.load_peft(str(adapter))
    ours = np.asarray(model.apply({"params": params}, tokens_BL))
    print(f"{family}: {cls}, PEFT targets {sorted(targets)}, "
          f"max |llmjax - peft| logits {np.abs(ours - theirs).max():.1e}", flush=True)


if __name__ == "__main__":
  main()
