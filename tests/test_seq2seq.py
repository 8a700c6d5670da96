"""The encoder-decoder, its decoding and the seq2seq task: cached == recomputed, causality and no
leakage across packed pairs by gradients, packed == unpacked loss, greedy and beam search
token-identical to transformers' generate, BLEU/chrF equal to sacrebleu's, the task through the
loop and the CLI, and bad input."""

import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

import llmjax.train
import _xla
from _task_helpers import ROOT, experiment
from llmjax import config as config_lib
from llmjax import generate
from llmjax.config import ModelConfig
from llmjax.data import seq2seq_rows
from llmjax.errors import ConfigError, DataError, UserError
from llmjax.eval import bleu
from llmjax.models import presets
from llmjax.models.encoder_decoder import EncoderDecoder, init_cache
from llmjax.tasks.seq2seq import Seq2Seq

V = 64


def _cfg(preset="marian", **overrides) -> ModelConfig:
  fields = dict(presets.get(preset), vocab_size=V, d_model=32, n_layers=2, n_decoder_layers=3,
                n_heads=4, d_ff=64, max_len=32)
  return ModelConfig(**{**fields, **overrides})


def _host_params(model, *inputs):
  """Parameters of `model`'s shapes drawn by numpy: the tests below compare two computations
  over the same parameters, whatever they are, and init's program (a random draw per parameter)
  costs more to compile than the computations it would serve."""
  abstract = nn.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0), *inputs)["params"])
  rng = np.random.default_rng(0)

  def draw(path, a):
    centre = 1.0 if jax.tree_util.keystr(path).endswith("['scale']") else 0.0  # norms' gains
    return jnp.asarray(centre + 0.02 * rng.standard_normal(a.shape), a.dtype)
  return jax.tree_util.tree_map_with_path(draw, abstract)


def _init(cfg, source_BS, target_BT):
  model = EncoderDecoder(cfg)
  params = _host_params(model, source_BS, target_BT)
  # Marian's logits bias starts at zero; make it matter.
  if cfg.final_logits_bias:
    params["final_logits_bias"] = jax.random.normal(jax.random.PRNGKey(1), (cfg.vocab_size,))
  return model, params


@pytest.mark.parametrize("preset,scan", [("marian", False), ("wmt", True)])
def test_cached_decoding_equals_full_recomputation(preset, scan):
  rng = np.random.default_rng(0)
  source_BS = jnp.asarray(rng.integers(1, V, (2, 7)))
  target_BT = jnp.asarray(rng.integers(1, V, (2, 6)))
  mask_BS = jnp.asarray([[1] * 7, [1] * 4 + [0] * 3])
  model, params = _init(_cfg(preset, scan_layers=scan), source_BS, target_BT)
  full_BTV = jax.jit(lambda p: model.apply({"params": p}, source_BS, target_BT,
                                           source_mask_BS=mask_BS))(params)
  memory_BSD = jax.jit(lambda p: model.apply({"params": p}, source_BS,
                                             source_segment_ids_BS=mask_BS,
                                             method=model.encode))(params)

  @jax.jit
  def decode(cache, token_B1, memory_BSD):
    return model.apply({"params": params, "cache": cache}, token_B1, memory_BSD, mask_BS,
                       decode=True, method=model.decode, mutable=["cache"])

  cache, steps = init_cache(model, 2, 7, 6), []
  for t in range(6):
    logits_B1V, variables = decode(cache, target_BT[:, t:t + 1], memory_BSD if t == 0 else None)
    cache = variables["cache"]
    steps.append(logits_B1V)
  np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full_BTV, atol=1e-5)


@functools.cache
def _hidden_grad_fn():
  """(params, the jitted gradient below): one program for every probe of the tests below (the
  tokens, segments and position are its arguments)."""
  source_BS, target_BT = jnp.arange(1, 7)[None], jnp.arange(10, 16)[None]
  model, params = _init(_cfg(), source_BS, target_BT)
  probe_D = jax.random.normal(jax.random.PRNGKey(2), (32,))

  def hidden_at(embedding_VD, source_BS, target_BT, source_ids_BS, target_ids_BT, position):
    p = {**params, "embed": {"embedding": embedding_VD}}
    hidden_BTD = model.apply({"params": p}, source_BS, target_BT,
                             source_segment_ids_BS=source_ids_BS,
                             target_segment_ids_BT=target_ids_BT, return_hidden=True)
    return jnp.sum(hidden_BTD[0, position] * probe_D)
  return params, jax.jit(jax.grad(hidden_at))


def _hidden_grads(source_BS, target_BT, source_ids_BS, target_ids_BT, position: int):
  """d(decoder hidden state at target `position`) / d(embedding row of every token): nonzero
  exactly for the tokens that position depends on (all tokens distinct; hidden states, so the
  tied output projection plays no part)."""
  params, grad_fn = _hidden_grad_fn()
  grad_VD = grad_fn(params["embed"]["embedding"], source_BS, target_BT, source_ids_BS,
                    target_ids_BT, jnp.asarray(position))
  return np.abs(np.asarray(grad_VD)).sum(-1)


def test_the_decoder_is_causal_and_sees_the_whole_source_by_gradients():
  source_BS = jnp.arange(1, 7)[None]  # tokens 1..6
  target_BT = jnp.arange(10, 16)[None]  # tokens 10..15
  ones_S, ones_T = jnp.ones_like(source_BS), jnp.ones_like(target_BT)
  influence_V = _hidden_grads(source_BS, target_BT, ones_S, ones_T, position=2)
  assert (influence_V[1:7] > 0).all()  # every source token
  assert (influence_V[10:13] > 0).all()  # target positions 0..2
  assert (influence_V[13:16] == 0).all()  # never the future


def test_no_attention_crosses_packed_pairs_by_gradients():
  # Row: pair 1 = source 1..3 / target 10..12, pair 2 = source 4..6 / target 13..15.
  source_BS, target_BT = jnp.arange(1, 7)[None], jnp.arange(10, 16)[None]
  segments = jnp.asarray([[1, 1, 1, 2, 2, 2]])
  influence_V = _hidden_grads(source_BS, target_BT, segments, segments, position=4)
  assert (influence_V[4:7] > 0).all() and (influence_V[13:15] > 0).all()  # its own pair
  assert (influence_V[1:4] == 0).all() and (influence_V[10:13] == 0).all()  # not pair 1's
  influence_V = _hidden_grads(source_BS, target_BT, segments, segments, position=1)
  assert (influence_V[4:7] == 0).all() and (influence_V[13:16] == 0).all()


@pytest.fixture(scope="module")
def task_and_params(tmp_path_factory):
  exp = experiment("seq2seq", tmp_path_factory.mktemp("s2s"))
  task = Seq2Seq(exp)
  data = task.data(None)
  task = task.with_info(data.info)
  model = task.model()
  params = _host_params(model, jnp.zeros((1, 32), jnp.int32), jnp.zeros((1, 32), jnp.int32))
  return task, data, model, params


def test_packed_pairs_give_the_loss_of_the_same_pairs_unpacked(task_and_params):
  task, data, model, params = task_and_params
  special = task.special_ids()
  pairs = data.texts["train"][:12]
  sources = seq2seq_rows.encode_source(data.tokenizer, [s for s, _ in pairs], special.eos)
  targets = seq2seq_rows.encode_target(data.tokenizer, [t for _, t in pairs], special.eos)
  packed, _ = seq2seq_rows.to_rows(sources, targets, 32, special, pack=True)
  single, _ = seq2seq_rows.to_rows(sources, targets, 32, special, pack=False)
  assert len(packed["source"]) < len(single["source"]) == 12
  loss = jax.jit(lambda rows: task.loss(model, {"params": params}, rows, rng=None, train=False))
  sums = [loss(jax.tree.map(jnp.asarray, rows)) for rows in (packed, single)]
  assert float(sums[0].weight) == float(sums[1].weight) == sum(len(t) + 1 for t in targets)
  np.testing.assert_allclose(float(sums[0].loss_sum), float(sums[1].loss_sum), rtol=1e-5)
  np.testing.assert_allclose(float(sums[0].sums["nll_sum"]), float(sums[1].sums["nll_sum"]),
                             rtol=1e-5)


def test_label_smoothing_matches_its_definition():
  from llmjax.objectives import seq2seq as objective
  logits_BTV = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 5))
  targets_BT = jnp.asarray([[1, 2, 3], [4, 0, 1]])
  mask_BT = jnp.asarray([[1, 1, 0], [1, 1, 1]])
  sums = objective.smoothed_cross_entropy_sums(logits_BTV, targets_BT, mask_BT, 0.1)
  log_p = np.asarray(jax.nn.log_softmax(logits_BTV))
  expected = 0.0
  for b, t in zip(*np.nonzero(np.asarray(mask_BT))):
    expected += -(0.9 * log_p[b, t, targets_BT[b, t]] + 0.1 * log_p[b, t].mean())
  np.testing.assert_allclose(float(sums["loss_sum"]), expected, rtol=1e-5)
  assert float(sums["weight"]) == 5


def test_bleu_and_chrf_are_sacrebleus():
  import sacrebleu
  hyps = ["der Hund lief auf der Matte", "die Katze sass", "ein roter Hut"]
  refs = ["der Hund lief auf einer Matte", "die Katze sass dort", "ein roter Hut"]
  scores = bleu.corpus_scores(hyps, refs)
  assert scores["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score)
  assert scores["chrf"] == pytest.approx(sacrebleu.corpus_chrf(hyps, [refs]).score)
  assert 0 < scores["bleu"] < 100 and 0 < scores["chrf"] < 100
  assert bleu.corpus_scores(refs, refs) == pytest.approx({"bleu": 100.0, "chrf": 100.0})


# --- decoding against transformers ------------------------------------------------------------


@pytest.fixture(scope="module")
def marian(tmp_path_factory):
  """A random transformers MarianMTModel (EOS made likely so rows end at different steps) and
  the same model loaded by llmjax."""
  torch = pytest.importorskip("torch")
  import transformers

  from llmjax import hf
  config = transformers.MarianConfig(
      vocab_size=40, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
      decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
      max_position_embeddings=64, activation_function="swish", scale_embedding=True,
      pad_token_id=39, decoder_start_token_id=39, eos_token_id=0, forced_eos_token_id=None)
  torch.manual_seed(3)
  theirs = transformers.MarianMTModel(config).eval()
  with torch.no_grad():
    theirs.final_logits_bias.normal_()
    theirs.final_logits_bias[0, 0] += 2.5
  path = tmp_path_factory.mktemp("marian")
  theirs.save_pretrained(path)
  rng = np.random.default_rng(0)
  source_BS = rng.integers(1, 39, (3, 9))
  mask_BS = np.ones_like(source_BS)
  for row, length in ((1, 6), (2, 3)):  # right padding, as Marian's tokenizer pads
    mask_BS[row, length:], source_BS[row, length:] = 0, 39
  return theirs, hf.load(str(path)), source_BS, mask_BS


@pytest.mark.parametrize("num_beams,length_penalty,early_stopping",
                         [(1, 1.0, False), (4, 1.0, False), (4, 0.6, True), (3, 2.0, "never")])
def test_greedy_and_beam_search_equal_transformers_generate(marian, num_beams, length_penalty,
                                                            early_stopping):
  import torch
  theirs, (model, params), source_BS, mask_BS = marian
  budget = 12
  with torch.no_grad():
    ref_BN = theirs.generate(input_ids=torch.tensor(source_BS),
                             attention_mask=torch.tensor(mask_BS), num_beams=num_beams,
                             max_new_tokens=budget, length_penalty=length_penalty,
                             early_stopping=early_stopping, do_sample=False).numpy()[:, 1:]
  ours_BN = np.asarray(generate.translate(
      model, params, source_BS, source_mask_BS=mask_BS, max_new_tokens=budget,
      num_beams=num_beams, length_penalty=length_penalty, early_stopping=early_stopping,
      eos_ids=[0], decoder_start_id=39, pad_id=39))
  padded_BN = np.full_like(ours_BN, 39)
  padded_BN[:, :ref_BN.shape[1]] = ref_BN
  np.testing.assert_array_equal(ours_BN, padded_BN)
  assert (ours_BN == 0).any(), "no row ended: the EOS handling went untested"


def test_translate_refuses_bad_requests(marian):
  _, (model, params), source_BS, mask_BS = marian
  kwargs = dict(source_mask_BS=mask_BS, max_new_tokens=4, eos_ids=[0], decoder_start_id=39)
  with pytest.raises(UserError, match="num_beams must be >= 1"):
    generate.translate(model, params, source_BS, num_beams=0, **kwargs)
  long_BS = np.ones((1, 65), np.int32)
  with pytest.raises(UserError, match="source length 65 exceeds the model's 64 positions"):
    generate.translate(model, params, long_BS, **{**kwargs, "source_mask_BS": None})
  with pytest.raises(UserError, match="decoder_start_id=40 is outside the vocabulary"):
    generate.translate(model, params, source_BS, **{**kwargs, "decoder_start_id": 40})


# --- the task through the loop and the CLI ----------------------------------------------------


def _cli(*args):
  """The CLI in a bare environment but for jax's settings (the session's compilation cache)."""
  jax_env = {k: v for k, v in os.environ.items() if k.startswith("JAX_")}
  return subprocess.run([sys.executable, "-m", "llmjax.cli.main", *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=600,
                        env={**jax_env, "XLA_FLAGS": _xla.xla_flags(),
                             "JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"})


def test_a_seq2seq_run_reports_bleu_writes_translations_and_translates_from_the_cli(tmp_path):
  exp = experiment("seq2seq", tmp_path, train=dict(steps=4, eval_every=2))
  workdir = tmp_path / "run"
  result = llmjax.train.run(exp, str(workdir))
  assert {"bleu", "chrf", "loss", "perplexity", "token_accuracy"} <= set(result)
  val = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()
         if '"val"' in line]
  assert [r["step"] for r in val] == [2, 4] and all(r["translated"] == 8 for r in val)
  scores = json.loads((workdir / "translation_scores.json").read_text())
  assert scores["split"] == "val" and scores["pairs"] == 12
  assert {"model", "copy_source", "nearest_neighbour"} == set(scores) - {"split", "pairs"}
  blocks = (workdir / "translations.txt").read_text().strip().split("\n\n")
  assert len(blocks) == 12 and blocks[0].startswith("source ")
  corpus = json.loads((workdir / "corpus.json").read_text())
  assert corpus["counts"] == {"train": 48, "val": 12, "test": 0} and len(corpus["sha256"]) == 64
  info = json.loads((workdir / "task_info.json").read_text())
  assert {"pad_id", "eos_id", "start_id"} <= set(info)

  inputs = tmp_path / "in.txt"
  inputs.write_text("the cat sat\na red hat\n")
  proc = _cli("translate", f"--checkpoint={workdir}", f"--input={inputs}",
              f"--output={tmp_path / 'out.txt'}", "--num_beams=2")
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert len((tmp_path / "out.txt").read_text().split("\n")) == 3  # two lines and the end
  # Exported for transformers: the run's special ids travel; llmjax translates it alike.
  from llmjax import hf
  from llmjax.cli import export
  from llmjax.train import rundir
  assert export.export(str(workdir), f"hf:{tmp_path / 'hf'}") == 4
  config = json.loads((tmp_path / "hf" / "config.json").read_text())
  assert config["architectures"] == ["MarianMTModel"]
  assert (config["pad_token_id"], config["eos_token_id"], config["decoder_start_token_id"]) == (
      info["pad_id"], info["eos_id"], info["start_id"])
  run = rundir.restore(str(workdir))
  model, params = hf.load(str(tmp_path / "hf"))
  task = run.task
  texts = ["the cat sat", "a red hat"]
  # the run's parameters on the host, as the export's are: one decoding program for both
  assert task.translate(model, params, task_tokenizer(workdir), texts) == task.translate(
      run.model, jax.device_get(run.params), task_tokenizer(workdir), texts)
  proc = _cli("eval", f"--workdir={workdir}")  # the whole validation split is translated
  assert proc.returncode == 0, proc.stderr[-2000:]
  report = json.loads((workdir / "eval" / "step_4.json").read_text())
  assert report["translated"] == 12 and 0 <= report["bleu"] <= 100 and "chrf" in report
  proc = _cli("translate", f"--checkpoint={workdir}", "--text=the cat", "--num_beams=0")
  assert proc.returncode == 2 and "num_beams must be >= 1" in proc.stderr
  assert "Traceback" not in proc.stderr


def task_tokenizer(workdir):
  from llmjax.data.tokenizers import HFTokenizer
  return HFTokenizer(str(workdir))


def test_bad_seq2seq_configs_and_data_fail_clearly(tmp_path):
  fields = json.loads(experiment("seq2seq", tmp_path).to_json())
  for change, message in (({"name": "lm"}, "seq2seq task and the encoder_decoder architecture"),
                          ({"num_beams": 0}, "num_beams must be >= 1")):
    with pytest.raises(ConfigError, match=message):
      config_lib.resolve({**fields, "task": {**fields["task"], **change}})
  exp = experiment("seq2seq", tmp_path, finetune=dict(method="prefix", prefix_length=4),
                   data=dict(seq_len=16))
  with pytest.raises(ConfigError, match="not supported for seq2seq"):
    Seq2Seq(exp).model()
  exp = experiment("seq2seq", tmp_path, data=dict(tokenizer="byte"))
  with pytest.raises(DataError, match="no pad and end-of-sequence tokens"):
    Seq2Seq(exp).data(None)
  bad = tmp_path / "bad.tsv"
  bad.write_text("the cat\tder katze\njust one field\n")
  exp = experiment("seq2seq", tmp_path, data=dict(files=str(bad)))
  with pytest.raises(DataError, match=r"bad\.tsv:2"):
    Seq2Seq(exp).data(None)
  exp = experiment("seq2seq", tmp_path, data=dict(source="gettext", locale_dir=str(tmp_path),
                                                 target_lang="xx"))
  with pytest.raises(DataError, match="xx"):
    Seq2Seq(exp).data(None)
