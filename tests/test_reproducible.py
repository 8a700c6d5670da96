"""Runs are reproducible: a trained vocabulary is the same in another process, and every task,
trained twice from scratch (the second time in another process, with another hash seed), logs
the same metrics."""

import hashlib
import json
import os
import subprocess
import sys

import pytest

import llmjax.train
from llmjax import config as config_lib
from llmjax.data import sources, tokenizers, vocab_training
from llmjax.train import reporting, rundir

from _task_helpers import ROOT, experiment

# Enough stdlib source for counts to tie and the vocabularies to fill: the trainers of the
# `tokenizers` library gave a different vocabulary in each process on such text.
CORPUS_FILES = 30
SPECS = ("wordpiece:600", "bpe:600")

_TOKENIZER_HASHES = """
import hashlib, json, sys
from llmjax.data import sources, tokenizers
files = sources.stdlib_files()[:int(sys.argv[1])]
texts = [p.read_bytes().decode("utf-8", "replace") for p in files]
print(json.dumps({spec: hashlib.sha256(tokenizers.train_tokenizer(spec, texts).to_json()
                                       .encode()).hexdigest() for spec in sys.argv[2:]}))
"""


def _python(code: str, *args: str) -> str:
  """`code` run by another interpreter with another hash seed; its stdout."""
  env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
         "PYTHONHASHSEED": "12345"}
  done = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  return done.stdout


def test_a_trained_vocabulary_is_the_same_in_another_process():
  texts = [p.read_bytes().decode("utf-8", "replace") for p in sources.stdlib_files()[:CORPUS_FILES]]
  here = {}
  for spec in SPECS:
    tokenizer = tokenizers.train_tokenizer(spec, texts)
    assert tokenizer.vocab_size == int(spec.split(":")[1])  # merges ran up to the size
    assert [tokenizer.special_id(r) for r in ("pad", "unk", "cls", "sep", "mask")] == list(range(5))
    here[spec] = hashlib.sha256(tokenizer.to_json().encode()).hexdigest()
  there = json.loads(_python(_TOKENIZER_HASHES, str(CORPUS_FILES), *SPECS))
  assert there == here


def test_merges_take_the_most_frequent_pair_and_break_ties_by_the_smallest_ids():
  counts = {"abab": 2, "ba": 3, "cd": 4}
  initial = vocab_training.initial_vocab(counts, ("[PAD]",), prefix="##")
  assert initial == ["[PAD]", "a", "b", "c", "d", "##a", "##b", "##d"]
  vocab, merges = vocab_training.train(counts, initial, 12, prefix="##")
  # cd (count 4), ba (3); then (a, ##b), (##b, ##a) and (##a, ##b) all count 2 in "abab":
  # the smallest ids first, and "ab" "##a" "##b" leaves (##a, ##b) to merge next.
  assert vocab[8:] == ["cd", "ba", "ab", "##ab"]
  assert merges == [(3, 7), (2, 5), (1, 6), (5, 6)]
  tokenizer = tokenizers.train_tokenizer("wordpiece:64", ["abab abab ba ba ba cd cd cd cd"])
  assert tokenizer.vocab_size == 17  # 5 specials, 7 characters, 5 merges: no pair is left
  assert tokenizer.encode("abab cd ab", add_special_tokens=False).tolist() == [16, 12, 14]


def _records(workdir) -> list[dict]:
  """metrics.jsonl without what measures the machine rather than the run."""
  return [{k: v for k, v in r.items() if k not in ("tokens_per_s", "mfu")}
          for r in reporting.read_metrics(os.path.join(workdir, "metrics.jsonl"))]


def _image_experiment():
  """experiments/vision/mnist_cnn.py:smoke for 4 steps (augmented images: seeded per example)."""
  c = config_lib.experiment_module("mnist_cnn.py", os.path.join(ROOT, "experiments", "vision",
                                                                "x")).get_config("smoke")
  c.unlock()
  c.train.update(dict(steps=4, log_every=2, eval_every=4, eval_batches=1, checkpoint_every=4,
                      progress=False))
  return config_lib.resolve(c)


@pytest.fixture(scope="module")
def first_runs(lm_run, tmp_path_factory) -> dict[str, str]:
  """Each task's tiny run, trained once here (lm: the session's), with _task_helpers' configs
  (the programs other tests compile: the session's compilation cache holds them once); trained
  vocabularies for the text tasks."""
  tmp = tmp_path_factory.mktemp("first")
  for task in ("mlm", "classify", "seq2seq"):
    (tmp / task).mkdir()
  experiments = {
      "mlm": experiment("mlm", tmp / "mlm"),
      "classify": experiment("classify", tmp / "classify", data=dict(tokenizer="wordpiece:128")),
      "seq2seq": experiment("seq2seq", tmp / "seq2seq"),
      "image_classify": _image_experiment()}
  runs = {"lm": str(lm_run)}
  for task, exp in experiments.items():
    runs[task] = str(tmp / f"{task}_run")
    llmjax.train.run(exp, runs[task])
  return runs


_TRAIN_AGAIN = """
import json, sys
import jax
import llmjax.train
from llmjax.train import rundir
jax.config.update("jax_numpy_rank_promotion", "raise")
for first, second in json.loads(sys.argv[1]).items():
  llmjax.train.run(rundir.experiment(first), second)
"""


def test_every_task_trained_twice_from_scratch_logs_the_same_metrics(first_runs, tmp_path):
  again = {task: str(tmp_path / task) for task in first_runs}
  # The process inherits the session's compilation cache (conftest): it trains, the programs
  # compiled here are handed back.
  _python(_TRAIN_AGAIN, json.dumps({first_runs[t]: again[t] for t in first_runs}))
  for task, first in first_runs.items():
    assert rundir.experiment(again[task]) == rundir.experiment(first), task
    records = _records(first)
    assert {r["split"] for r in records} >= {"train", "val"}, task
    assert _records(again[task]) == records, task
    for name in (tokenizers.TOKENIZER_FILE, rundir.TASK_INFO_FILE, "samples.txt",
                 "translations.txt"):  # what the run wrote besides metrics, where it has them
      if os.path.exists(os.path.join(first, name)):
        with open(os.path.join(first, name)) as a, open(os.path.join(again[task], name)) as b:
          assert a.read() == b.read(), (task, name)
