"""The `sft` task: a tiny run from experiments/instruct/stdlib_sft.py (metrics, completions,
task_info, exact resume, `llmjax chat --message`), packed == unpacked, no attention or loss across
packed conversations, 8 devices == 1, and each bad input."""

import json
import os
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import linen as nn

import llmjax.train
from llmjax import config as config_lib
from llmjax.data import chat, chat_rows, text, tokenizers
from llmjax.errors import DataError
from llmjax.parallel import sharding
from llmjax.tasks.base import DecodedReport, SharesBatch, supports
from llmjax.tasks.sft import SFT
from llmjax.train import init, loop, reporting, rundir
from llmjax.train import setup as setuplib

import _xla
from _chat_helpers import GEMMA
from _task_helpers import ROOT, with_mesh

EXPERIMENT = str(ROOT / "experiments" / "instruct" / "stdlib_sft.py")
SYSTEM = {"role": "system", "content": "Answer with the sum."}


def _conversation(i: int) -> list[dict]:
  a, b = i % 7, i % 5
  turns = [{"role": "user", "content": f"{a}+{b}?"}, {"role": "assistant", "content": str(a + b)}]
  if i % 3 == 0:  # a system turn and a second exchange
    turns = [SYSTEM] + turns + [{"role": "user", "content": "ü+1?"},
                                {"role": "assistant", "content": f"{a + b + 1}ü"}]
  return turns


def _write(tmp_path, rows, name="train.jsonl"):
  path = tmp_path / name
  path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
  return str(path)


def _experiment(tmp_path, **sections):
  import pyarrow as pa  # the held-out split as Parquet, prompt/completion as HF datasets writes
  import pyarrow.parquet as pq
  train = _write(tmp_path, [{"messages": _conversation(i)} for i in range(24)])
  pq.write_table(pa.Table.from_pylist([{"prompt": f"{i}+1?", "completion": str(i + 1)}
                                       for i in range(6)]), tmp_path / "val.parquet")
  c = config_lib.experiment_module(EXPERIMENT, __file__).get_config("smoke")
  c.unlock()
  c.model.update(dict(d_model=32, n_layers=1, d_ff=64, max_len=64))
  c.data.update(dict(files=train, val_files=str(tmp_path / "val.parquet"), seq_len=64))
  c.task.update(dict(completions=2, max_new_tokens=6))
  c.train.update(dict(steps=2, batch_size=8, log_every=1, eval_every=2, eval_batches=2,
                      checkpoint_every=1, async_checkpoint=False, progress=False))
  for section, values in sections.items():
    c[section].update(values)
  return config_lib.resolve(c)


def test_a_tiny_run_reports_completes_resumes_exactly_and_chats(tmp_path):
  exp = _experiment(tmp_path, train=dict(eval_every=1))
  workdir = str(tmp_path / "run")
  llmjax.train.run(exp, workdir)
  records = reporting.read_metrics(os.path.join(workdir, "metrics.jsonl"))
  val = [r for r in records if r["split"] == "val"][-1]
  assert {"loss", "token_accuracy", "exact_match", "chrf", "completed"} <= set(val)
  assert val["completed"] == 2 and 0 <= val["token_accuracy"] <= 1
  with open(os.path.join(workdir, "task_info.json")) as f:
    info = json.load(f)
  assert info["end_of_turn_ids"] == [4] and info["conversations"]["train"]["conversations"] > 0
  assert info["conversations"]["val"]["conversations"] == 6
  with open(os.path.join(workdir, "completions.txt")) as f:
    completions = f.read()  # every evaluation's, under its step
  assert re.findall(r"^##### step (\d+)$", completions, re.M) == ["1", "2"]
  assert completions.count("=== reference\n") == 4
  straight = jax.device_get(rundir.restore(workdir).params)
  shutil.rmtree(os.path.join(workdir, "checkpoints", "2"))  # as if stopped after step 1
  llmjax.train.run(exp, workdir)
  untimed = lambda rs: [{k: v for k, v in r.items() if k not in ("tokens_per_s", "mfu")}
                        for r in rs]
  assert untimed(reporting.read_metrics(os.path.join(workdir, "metrics.jsonl"))) == untimed(
      records)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(rundir.restore(workdir).params),
               straight)
  with open(os.path.join(workdir, "completions.txt")) as f:
    assert f.read() == completions  # step 2's evaluation ran again and replaced its section
  env = dict(os.environ, XLA_FLAGS=_xla.xla_flags(1), JAX_PLATFORMS="cpu",
             PYTHONPATH=str(ROOT))
  out = subprocess.run([sys.executable, "-m", "llmjax.cli.main", "chat", f"--checkpoint={workdir}",
                        "--message=3+4?", "--max_new_tokens=6"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-2000:]
  # the reply is what the library's greedy completion of the rendered prompt gives
  task = SFT(exp, info)
  prompt = chat.load_template("byte", "byte").render([{"role": "user", "content": "3+4?"}],
                                                     add_generation_prompt=True)
  loaded = rundir.open_weights(workdir, "--checkpoint", "float32")[1]
  expected = task.complete(loaded.model, loaded.params, tokenizers.ByteTokenizer(), [prompt])[0]
  assert out.stdout == expected + "\n" and len(expected) == 6


def test_packed_equals_unpacked_and_nothing_crosses_conversations(tmp_path):
  exp = _experiment(tmp_path)
  task = SFT(exp, {})
  assert supports(task, DecodedReport) and not supports(task, SharesBatch)
  model = task.model()
  template, tok = chat.load_template("byte", "byte"), tokenizers.ByteTokenizer()
  examples = [chat.render_masked(template, tok, _conversation(i)) for i in (1, 2)]
  packed, _ = chat_rows.pack(examples, 96)
  assert packed["segment_ids"].max() == 2 and len(packed["tokens"]) == 1
  alone = {k: np.concatenate([chat_rows.pack([e], 96)[0][k] for e in examples])
           for k in packed}
  # jitted: one compile instead of one per operation
  variables = jax.jit(lambda key, b: task.init(model, {"params": key}, b))(
      jax.random.PRNGKey(0), jax.tree.map(lambda a: a[:1], alone))

  def loss(params, batch):
    terms = task.loss(model, {"params": params}, batch, rng=jax.random.PRNGKey(1), train=False)
    return terms.loss_sum, (terms.weight, terms.sums["correct"])

  # jitted: one compile per shape instead of op by op
  value_and_grad = jax.jit(jax.value_and_grad(loss, has_aux=True))
  (l_p, aux_p), g_p = value_and_grad(variables["params"], packed)
  (l_a, aux_a), g_a = value_and_grad(variables["params"], alone)
  np.testing.assert_allclose(l_p, l_a, rtol=1e-5)
  assert aux_p == aux_a and aux_p[0] > 0
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), g_p, g_a)
  # the second conversation's logits do not see the first one's tokens
  changed = dict(packed, tokens=np.where(packed["segment_ids"] == 1, 7, packed["tokens"]))
  logits = jax.jit(lambda b: model.apply(variables, b["tokens"], segment_ids_BL=b["segment_ids"]))
  second = packed["segment_ids"][0] == 2
  np.testing.assert_allclose(logits(packed)[0, second], logits(changed)[0, second], rtol=1e-5,
                             atol=1e-6)


def test_eight_devices_match_one(tmp_path):
  exp = _experiment(tmp_path)
  one = setuplib.prepare(with_mesh(exp, 1, 1, "dp"), None, jax.devices()[:1])
  state = init.init_state(0, one.init_variables, one.tx, one.mesh, one.rules, one.state_shardings)
  host_state = jax.device_get(state)
  batch = next(loop._data_iterator(one, None))
  val = loop._process_slices(one.mesh, text.eval_batches(one.data.val, 8, 1))
  results = {}
  for name, (data, fsdp, rules) in {"one": (1, 1, "dp"), "dp": (8, 1, "dp"),
                                    "fsdp": (1, 8, "fsdp")}.items():
    s = one if name == "one" else setuplib.prepare(with_mesh(exp, data, fsdp, rules))
    train_fn, eval_fn = setuplib.compile_steps(s)
    with jax.set_mesh(s.mesh), nn.logical_axis_rules(s.rules):
      placed = jax.device_put(host_state, s.state_shardings)
      report, _ = loop.evaluate(s, eval_fn, placed, val)
      _, metrics = train_fn(placed, sharding.global_batch(batch, s.mesh))
    results[name] = (float(metrics["loss"]), report["loss"], report["token_accuracy"])
  for name in ("dp", "fsdp"):
    np.testing.assert_allclose(results[name], results["one"], rtol=2e-5, err_msg=name)


@pytest.mark.parametrize("case", ["roles", "missing", "no_template", "no_loss"])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, case):
  data, files = {}, None
  if case == "roles":
    (tmp_path / "gemma.jinja").write_text(GEMMA)
    data = dict(chat_template=str(tmp_path / "gemma.jinja"))
    needle = "cannot render it .*System role not supported"
  elif case == "missing":
    files = _write(tmp_path, [{"messages": [{"role": "user", "content": "x"},
                                            {"role": "assistant"}]}], "bad.jsonl")
    needle = r"bad.jsonl:1: messages\[1\] needs `role` and `content`"
  elif case == "no_template":
    data = dict(chat_template="")
    needle = "config.data.tokenizer='byte' has no chat template"
  else:
    files = _write(tmp_path, [{"messages": [{"role": "user", "content": "x"}]}] * 4, "u.jsonl")
    needle = "leave no token to train on"
  exp = _experiment(tmp_path, data=dict(data, **({"files": files} if files else {})))
  workdir = tmp_path / "run"
  with pytest.raises(DataError, match=needle) as e:
    llmjax.train.run(exp, str(workdir))
  assert "\n" not in str(e.value) and not workdir.exists()


def test_conversations_from_tfds_by_mapped_fields(tmp_path, monkeypatch):
  """source=tfds (tfds.testing.mock_data's records): databricks_dolly's fields mapped by
  config.data.chat_fields, a Sequence of {role, content} as messages, the JSONL field names by
  default; the split by hash or tfds_val_split; bad mappings are one line naming the key."""
  import dataclasses
  import tensorflow_datasets as tfds  # slow import; only this test needs it
  from llmjax.errors import ConfigError
  monkeypatch.setattr(tfds.core.DatasetBuilder, "is_prepared", lambda self: True)
  dolly = [{"instruction": f"Add {i} and 1.".encode(), "context": b"" if i % 2 else b"Be exact.",
            "response": str(i + 1).encode(), "category": b"open_qa"} for i in range(12)]
  chats = [{"conversation": {"role": np.array([b"system", b"user", b"assistant"]),
                             "content": np.array([b"Sum.", f"{i}+2?".encode(),
                                                  str(i + 2).encode()])}} for i in range(12)]
  plain = [{"prompt": f"{i}+3?".encode(), "completion": str(i + 3).encode()} for i in range(12)]
  records = {"train": dolly, "validation": dolly[:2], "chats": chats, "plain": plain}
  base = _experiment(tmp_path)

  def load(**data):
    exp = dataclasses.replace(base, data=dataclasses.replace(
        base.data, source="tfds", tfds_name="databricks_dolly", files="", val_files="", **data))
    with tfds.testing.mock_data(num_examples=12, policy=tfds.testing.MockPolicy.USE_CODE,
                                as_data_source_fn=lambda self, split, **kw: records[split]):
      return SFT(exp).data(None)
  fields = "prompt=instruction+context,completion=response"
  d = load(chat_fields=fields, tfds_val_split="validation")
  template = chat.load_template("byte", "byte")
  prompt = chat.prompt_and_reference(template, [{"role": "user", "content": "Add 0 and 1.\n\n"
                                                 "Be exact."}, {"role": "assistant",
                                                                "content": "1"}], "x")
  assert d.texts["val"] == [prompt, (prompt[0].replace("Add 0", "Add 1").replace(
      "\n\nBe exact.", ""), "2")]
  assert d.info["conversations"]["train"]["conversations"] == 12
  hashed = load(chat_fields=fields, val_fraction=0.3)
  counts = hashed.info["conversations"]
  assert counts["train"]["conversations"] + counts["val"]["conversations"] == 12
  assert counts["val"]["conversations"] > 0
  chats_d = load(chat_fields="messages=conversation", tfds_split="chats",
                 tfds_val_split="chats")
  assert chats_d.texts["val"][0][1] == "2" and "Sum." in chats_d.texts["val"][0][0]
  assert load(tfds_split="plain", tfds_val_split="plain").texts["val"][0][1] == "3"
  with pytest.raises(DataError, match="tfds dataset 'databricks_dolly' has no field 'answer' "
                                      r"\(config.data.chat_fields completion=...\); available: "
                                      "category, context, instruction, response"):
    load(chat_fields="prompt=instruction,completion=answer")
  for bad in ("prompt=instruction", "question=instruction,completion=response",
              "messages=conversation,prompt=instruction"):
    with pytest.raises(ConfigError, match=f"config.data.chat_fields={bad!r}") as e:
      load(chat_fields=bad)
    assert "\n" not in str(e.value)
  with pytest.raises(ConfigError, match="config.data.chat_fields='prompt=x' maps a tfds"):
    _experiment(tmp_path, data=dict(chat_fields="prompt=x"))  # source=files
