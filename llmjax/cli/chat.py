"""llmjax chat --checkpoint=SOURCE [--message=TEXT] [--system=TEXT] [--chat_template=...]: talk to
a model through its chat template.

SOURCE: a training run (workdir:PATH[@STEP], or its directory), an llmjax export, a Hugging Face
directory (hf:PATH) or a PEFT adapter over one (peft:DIR), read by the one weights source
(llmjax/weights). The template is --chat_template (a built-in name or a jinja file), else the
run's own (WORKDIR/chat_template.jinja, written by an sft run), else the model directory's
(tokenizer_config.json / chat_template.jinja). Without --message it reads one user turn per
line from stdin, streams each reply as its tokens are chosen and keeps the whole conversation in
the prompt; Ctrl-D ends. With --message it prints one reply and exits.
"""

from __future__ import annotations

import sys

from absl import flags

from llmjax.cli import common
from llmjax.errors import UserError

# This verb's flags alone (not absl's global FLAGS): verbs share flag names (--workdir,
# --step, --out, ...) and run side by side in one process (tests, notebooks).
FLAGS = flags.FlagValues()
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "workdir:PATH[@STEP], export:DIR, hf:PATH, "
                                  "peft:DIR, or a bare run or export directory.", flag_values=FLAGS)
_MESSAGE = flags.DEFINE_string("message", None, "One user message: print the reply and exit.",
                               flag_values=FLAGS)
_SYSTEM = flags.DEFINE_string("system", None, "A system message that opens the conversation.",
                              flag_values=FLAGS)
_TEMPLATE = flags.DEFINE_string("chat_template", None, "A built-in (byte, chatml) or a jinja "
                                "file; default: the run's or the model directory's own.",
                                flag_values=FLAGS)
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 256, "Token budget of one reply (it stops "
                                "earlier at the end-of-turn token).", flag_values=FLAGS)
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0 is greedy.", flag_values=FLAGS)
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Sample from the smallest set with this mass (1: all).",
                            flag_values=FLAGS)
_SEED = flags.DEFINE_integer("seed", 0, "RNG seed for sampling.", flag_values=FLAGS)


def find_template(source, override: str | None):
  """--chat_template, else the run's chat_template.jinja, else the model directory's template."""
  from llmjax.data import chat  # heavy imports only after the flags are known to be good
  if override:
    return chat.load_template(override, "")
  for directory in (source.path.partition("@")[0], source.tokenizer_dir()):
    template = chat.model_template(directory) if directory else None
    if template is not None:
      return template
  raise UserError(f"--checkpoint={source.spec}: no chat template in the run or its model "
                         "directory; pass --chat_template=FILE or a built-in (byte, chatml)")


class _Rendered:
  """A tokenizer that encodes rendered chat text without adding special tokens (the template
  writes its own), for generate.stream."""

  def __init__(self, tokenizer):
    self.tokenizer = tokenizer

  def encode(self, text: str):
    from llmjax.data import chat  # heavy: imported once the flags are good
    return chat.token_offsets(self.tokenizer, text)[0]

  def decode(self, ids) -> str:
    return self.tokenizer.decode(ids)


def converse(loaded, tokenizer, template, lines, write, *, system=None, max_new_tokens=256,
             temperature=0.0, top_p=1.0, seed=0) -> list[dict]:
  """Each line a user turn; each reply streamed through `write`; returns the conversation."""
  import jax  # heavy: imported once the flags are good

  from llmjax import generate
  from llmjax.data import chat
  messages = [{"role": "system", "content": system}] if system else []
  stops = chat.end_of_turn_ids(template, tokenizer) + list(loaded.eos_token_ids or [])
  rendered = _Rendered(tokenizer)
  for turn, line in enumerate(lines):
    messages.append({"role": "user", "content": line})
    prompt = template.render(messages, add_generation_prompt=True)
    reply = generate.stream(loaded.model, loaded.params, rendered, prompt,
                            jax.random.fold_in(jax.random.PRNGKey(seed), turn), write=write,
                            echo=False, max_new_tokens=max_new_tokens, temperature=temperature,
                            top_p=top_p, eos_ids=stops, pad_id=loaded.pad_token_id or 0)
    write("\n")
    messages.append({"role": "assistant", "content": reply})
  return messages


def _stdin_lines():
  while True:
    sys.stdout.write("> ")
    sys.stdout.flush()
    line = sys.stdin.readline()
    if not line:  # Ctrl-D
      sys.stdout.write("\n")
      return
    if line.strip():
      yield line.rstrip("\n")


def main(argv: list[str] | None = None) -> None:
  common.parse_flags(sys.argv if argv is None else argv)
  if not _CHECKPOINT.value:
    common.fail("--checkpoint=SOURCE (workdir:PATH[@STEP], export:DIR, hf:PATH, peft:DIR) is "
                "required")
  with common.user_errors():
    from llmjax import weights  # heavy imports only after the flags are known to be good
    from llmjax.train import rundir
    source, loaded = rundir.open_weights(_CHECKPOINT.value, "--checkpoint")
    template = find_template(source, _TEMPLATE.value)
    lines = [_MESSAGE.value] if _MESSAGE.value is not None else _stdin_lines()
    converse(loaded, weights.tokenizer(source), template, lines, _write, system=_SYSTEM.value,
             max_new_tokens=_MAX_NEW.value, temperature=_TEMPERATURE.value, top_p=_TOP_P.value,
             seed=_SEED.value)


def _write(text: str) -> None:
  sys.stdout.write(text)
  sys.stdout.flush()


if __name__ == "__main__":
  main()
