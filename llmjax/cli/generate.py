"""llmjax generate --checkpoint=SOURCE --prompt="..." [--max_new_tokens --temperature ...].

SOURCE: a training run (workdir:PATH[@STEP], or its directory), an llmjax export (export:DIR or
DIR), a Hugging Face directory (hf:PATH) or a PEFT adapter over one (peft:DIR). The tokenizer is
the one the weights record (a run's vocabulary, an export's tokenizer/ or its tokenizer's name);
--tokenizer overrides it.
"""

from __future__ import annotations

import sys

from absl import flags

from llmjax.cli import common

# This verb's flags alone (not absl's global FLAGS): verbs share flag names (--workdir,
# --step, --out, ...) and run side by side in one process (tests, notebooks).
FLAGS = flags.FlagValues()
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "workdir:PATH[@STEP], export:DIR, hf:PATH, "
                                  "peft:DIR, or a bare run or export directory.", flag_values=FLAGS)
_PROMPT = flags.DEFINE_string("prompt", None, "Text to continue.", flag_values=FLAGS)
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 64, "Token budget (stops earlier at EOS).",
                                flag_values=FLAGS)
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0 is greedy.", flag_values=FLAGS)
_TOP_K = flags.DEFINE_integer("top_k", 0, "Sample from the k most likely tokens (0: all).",
                              flag_values=FLAGS)
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Sample from the smallest set with this mass (1: all).",
                            flag_values=FLAGS)
_SEED = flags.DEFINE_integer("seed", 0, "RNG seed for sampling.", flag_values=FLAGS)
_TOKENIZER = flags.DEFINE_string("tokenizer", None,
                                 "byte or hf:PATH; default: the checkpoint's own tokenizer.",
                                 flag_values=FLAGS)
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Parameter dtype.",
                           flag_values=FLAGS)


def main(argv: list[str] | None = None) -> None:
  common.parse_flags(sys.argv if argv is None else argv)
  if not _CHECKPOINT.value or _PROMPT.value is None:
    common.fail("--checkpoint=SOURCE (workdir:PATH[@STEP], export:DIR, hf:PATH, peft:DIR) and "
                "--prompt=TEXT are required")
  with common.user_errors():
    import jax  # heavy imports only after the flags are known to be good

    from llmjax import generate, weights
    from llmjax.train import rundir
    source, loaded = rundir.open_weights(_CHECKPOINT.value, "--checkpoint", _DTYPE.value)
    tokenizer = weights.tokenizer(source, _TOKENIZER.value)
    generate.stream(loaded.model, loaded.params, tokenizer, _PROMPT.value,
                    jax.random.PRNGKey(_SEED.value), write=_write,
                    max_new_tokens=_MAX_NEW.value, temperature=_TEMPERATURE.value,
                    top_k=_TOP_K.value, top_p=_TOP_P.value, eos_ids=loaded.eos_token_ids,
                    pad_id=loaded.pad_token_id or 0)
  print()


def _write(text: str) -> None:
  sys.stdout.write(text)
  sys.stdout.flush()


if __name__ == "__main__":
  main()
