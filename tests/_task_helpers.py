"""Tiny experiments of every task on files a test writes (shared by the task and fine-tuning
tests)."""

import csv
import pathlib

import numpy as np

from llmjax import config as config_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
WORDS = {"fruit": "apple pear plum fig lime", "metal": "iron gold zinc lead tin",
         "bird": "crow wren lark owl kite"}


def write_labelled(path: pathlib.Path, n_per_class: int = 6, seed: int = 0) -> pathlib.Path:
  """A CSV of short texts whose words give their label away: a tiny model can fit it exactly."""
  rng = np.random.default_rng(seed)
  with open(path, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["text", "label"])
    for label, words in WORDS.items():
      for _ in range(n_per_class):
        writer.writerow([" ".join(rng.choice(words.split(), 4)), label])
  return path


def write_corpus(root: pathlib.Path, n: int = 8) -> str:
  root.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(1)
  for i in range(n):
    words = rng.choice("the cat sat on a mat and ran to its red hat".split(), 200)
    (root / f"doc{i}.txt").write_text(" ".join(words))
  return str(root / "*.txt")


LEXICON = {"the": "der", "cat": "katze", "sat": "sass", "on": "auf", "a": "einer", "mat": "matte",
           "red": "rote", "hat": "hut", "dog": "hund", "ran": "lief"}


def write_parallel(path: pathlib.Path, n: int = 48, seed: int = 0) -> pathlib.Path:
  """A TSV of short English word strings and their word-by-word 'German': learnable exactly."""
  rng = np.random.default_rng(seed)
  with open(path, "w") as f:
    for _ in range(n):
      words = rng.choice(sorted(LEXICON), int(rng.integers(2, 6)))
      f.write(" ".join(words) + "\t" + " ".join(LEXICON[w] for w in words) + "\n")
  return path


def experiment(task: str, tmp: pathlib.Path, decoder: bool = False,
               **sections) -> config_lib.Experiment:
  """A tiny experiment of `task` on files the test writes (encoders for mlm and classify
  unless `decoder`), one layer deep: a test whose point needs a stack of layers (scanned equals
  unrolled, per-layer choices) asks for `model=dict(n_layers=2)`."""
  c = config_lib.base_config()
  if task == "lm" or decoder:
    c.model = config_lib.model_section("llama", vocab_size=256, d_model=32, n_layers=1,
                                       n_heads=4, d_ff=64, max_len=32)
    c.data.files, c.data.tokenizer = write_corpus(tmp / "corpus"), "byte"
  if task != "lm" and not decoder:
    c.model = config_lib.model_section("bert", vocab_size=256, d_model=32, n_layers=1,
                                       n_heads=4, d_ff=64, max_len=32)
    if task == "mlm":
      c.data.files, c.data.tokenizer = write_corpus(tmp / "corpus"), "wordpiece:256"
  if task == "classify":
    c.data.files = str(write_labelled(tmp / "train.csv"))
    c.data.val_files = str(write_labelled(tmp / "val.csv", 3, seed=1))
    c.data.tokenizer = "byte"
  if task == "seq2seq":
    c.model = config_lib.model_section("marian", vocab_size=256, d_model=32, n_layers=1,
                                       n_heads=4, d_ff=64, max_len=32)
    c.data.files = str(write_parallel(tmp / "train.tsv"))
    c.data.val_files = str(write_parallel(tmp / "val.tsv", 12, seed=1))
    c.data.tokenizer = "wordpiece:128"
    c.task.update(dict(num_beams=2, max_new_tokens=12, bleu_examples=8))
  c.task.name = task
  c.data.source, c.data.seq_len = "files", 32
  # No samples at the end of a run unless a test asks (sample_prompts=1): compiling the sampler
  # is a fifth of a tiny LM run's compiles, and few tests read samples.txt.
  c.train.update(dict(steps=4, batch_size=8, log_every=2, eval_every=4, eval_batches=2,
                      checkpoint_every=4, progress=False, sample_prompts=0, sample_tokens=4))
  c.optim.warmup_steps = 1
  for section, values in sections.items():
    c[section].update(values)
  return config_lib.resolve(c)


def lora_experiment(tmp: pathlib.Path, **sections) -> config_lib.Experiment:
  """A tiny Llama-shaped LoRA LM run (biases, GQA, untied head; LoRA on every linear) of 8
  steps with checkpoints at 4 and 8, on a corpus it writes: the one run the fine-tuning and PEFT
  tests share (conftest's `lora_lm_run`), and the base of the PEFT tests' variants."""
  corpus = tmp / "corpus"
  corpus.mkdir(exist_ok=True)
  rng = np.random.default_rng(0)
  for name in "abcd":
    (corpus / f"{name}.txt").write_text(" ".join(rng.choice("the cat sat on a mat".split(), 200)))
  c = config_lib.base_config()
  c.model = config_lib.model_section("llama", vocab_size=256, d_model=32, n_layers=2, n_heads=4,
                                     n_kv_heads=2, d_ff=64, max_len=32, use_bias=True,
                                     tie_embeddings=False)
  c.data.update(dict(source="files", files=str(corpus / "*.txt"), tokenizer="byte", seq_len=32))
  c.train.update(dict(steps=8, batch_size=8, log_every=1, eval_every=4, eval_batches=1,
                      checkpoint_every=4, keep_checkpoints=3, async_checkpoint=False,
                      progress=False, sample_prompts=1, sample_tokens=4))
  c.optim.update(dict(lr=0.05, warmup_steps=1))
  c.finetune.update(dict(method="lora", lora_rank=4, lora_alpha=8.0, lora_targets="all_linear"))
  for section, values in sections.items():
    c[section].update(values)
  return config_lib.resolve(c)


def with_mesh(exp: config_lib.Experiment, data: int, fsdp: int, rules: str) -> config_lib.Experiment:
  """`exp` on a mesh of data x fsdp devices under the named sharding rules."""
  import dataclasses
  return dataclasses.replace(exp, mesh=dataclasses.replace(exp.mesh, data=data, fsdp=fsdp,
                                                           rules=rules))
