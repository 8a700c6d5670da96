"""Hugging Face PEFT adapters against peft itself: llmjax LoRA / AdaLoRA / prompts load in
PeftModel with equal logits, PEFT-made adapters import with equal logits, `llmjax export` to
PEFT and merged models, `init_from=peft:`, and a named error for each bad input."""

import dataclasses
import importlib.util
import json
import os
import warnings
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from safetensors.numpy import load_file

pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
# peft itself is imported by the tests that call it: its import (2.5 s) is paid by the pytest
# worker that runs this file, not by every worker that collects it.
if importlib.util.find_spec("peft") is None:
  pytest.skip("peft is not installed", allow_module_level=True)

import _hf_helpers as H  # noqa: E402
from _task_helpers import lora_experiment  # noqa: E402
from llmjax import hf  # noqa: E402
from llmjax.cli import export  # noqa: E402
from llmjax.config import ModelConfig  # noqa: E402
from llmjax.errors import UserError  # noqa: E402
from llmjax.finetune import partition  # noqa: E402
from llmjax.hf import peft as hfpeft  # noqa: E402
from llmjax.models import heads, presets  # noqa: E402
from llmjax.models.peft import Peft  # noqa: E402
from llmjax.models.transformer import Transformer  # noqa: E402

TOL = 1e-4
QV = r"(.*/)?attn/(q|v)"
QKV_MLP = r"(.*/)?(attn/(q|k|v)|mlp/(wi|wo))"
ALL = r"(.*/)?(attn/(q|k|v|o)|mlp/(wi|wg|wo))"
HF_CLASS = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM",
            "bert": "BertForSequenceClassification"}


def _model(kind: str, peft_: Peft, scan: bool = False, vocab: int = H.VOCAB):
  shape = dict(vocab_size=vocab, d_model=32, n_layers=2, n_heads=4, d_ff=64,
               max_len=H.MAX_LEN, scan_layers=scan)
  if kind == "llama":
    shape.update(n_kv_heads=2, tie_embeddings=False)
  cfg = ModelConfig(**{**presets.get(kind), **shape})
  if kind == "bert":
    return heads.SequenceClassifier(cfg, num_labels=3, peft=peft_)
  return Transformer(cfg, peft_)


def _random_params(model, seed: int = 0):
  """Random values for every parameter, LoRA's B included (a zero B would hide its mapping)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda a: np.asarray(rng.normal(0.0, 0.2, a.shape), a.dtype),
                      nn.unbox(hf.abstract_params(model)))


def _base_of(params) -> dict:
  return partition.nest({p: x for p, x in partition.items(params)
                         if "/lora/" not in p and p.split("/")[-1] != "prompt"})


def _batch():
  tokens, _ = H.padded_batch(seed=1)
  mask = np.ones_like(tokens)
  mask[1, 9:], mask[3, 4:] = 0, 0  # right padding: positions count from 0 in both
  return tokens, mask


def _ours(model, params, tokens, mask):
  if isinstance(model, heads.SequenceClassifier):
    out = jax.jit(model.apply)({"params": params}, jnp.asarray(tokens),
                               attention_mask_BL=jnp.asarray(mask))
  else:
    out = jax.jit(model.apply)({"params": params}, jnp.asarray(tokens),
                               segment_ids_BL=jnp.asarray(mask))
  return np.asarray(out)


def _diff(ours, theirs, mask):
  if ours.ndim == 2:  # classifier logits [B, C]
    return float(np.abs(ours - theirs).max())
  return float(np.abs(ours - theirs)[mask.astype(bool)].max())


def _peft_model(base_dir: str, adapter_dir: str, kind: str):
  """PeftModel.from_pretrained over the base, checked to have found every adapter key."""
  import peft
  base = getattr(transformers, HF_CLASS[kind]).from_pretrained(base_dir).eval()
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    model = peft.PeftModel.from_pretrained(base, adapter_dir).eval()
  assert not [w for w in caught if "adapter keys" in str(w.message)], caught
  if model.active_peft_config.peft_type == "LORA":
    result = model.load_adapter(adapter_dir, adapter_name="check")  # the same load, its result
    assert not result.missing_keys and not result.unexpected_keys, result
    model.set_adapter("default")
  return model


def _export(kind, targets, tmp_path, *, scan=False, rslora=False, adalora=False, zeros=None,
            vocab=H.VOCAB):
  """A random llmjax LoRA model saved as a HF base + PEFT adapter: (model, params, base dir,
  adapter dir, adapter_config.json)."""
  peft_ = Peft(lora_targets=targets, lora_rank=4, lora_alpha=8.0, rslora=rslora, adalora=adalora)
  model = _model(kind, peft_, scan, vocab)
  params = _random_params(model)
  if zeros:
    flat = dict(partition.items(params))
    for path in flat:
      if path.endswith("/lora/e"):
        flat[path] = flat[path] * zeros(path, flat[path].shape)
    params = partition.nest(flat)
  base_dir, adapter_dir = str(tmp_path / "base"), str(tmp_path / "adapter")
  hf.save(model.clone(peft=Peft()), _base_of(params), base_dir)
  hf.save_adapter(model, params, peft_, adapter_dir, base_model_path=base_dir,
                  modules_to_save=["classifier/kernel"] if kind == "bert" else ())
  with open(os.path.join(adapter_dir, "adapter_config.json")) as f:
    return model, params, base_dir, adapter_dir, json.load(f)


@pytest.mark.parametrize("kind,targets,scan", [("gpt2", QV, False), ("gpt2", QKV_MLP, True),
                                               ("llama", ALL, False), ("bert", QV, False)])
def test_llmjax_lora_loads_in_peft_with_equal_logits(kind, targets, scan, tmp_path):
  model, params, base_dir, adapter_dir, config = _export(kind, targets, tmp_path, scan=scan)
  tokens, mask = _batch()
  theirs = H.torch_out(_peft_model(base_dir, adapter_dir, kind), tokens, mask).logits.numpy()
  ours = _ours(model, params, tokens, mask)
  assert np.abs(theirs).max() > 0.3
  assert _diff(ours, theirs, mask) <= TOL
  expected = {("gpt2", QV): (["c_attn"], {"c_attn": 8}), ("gpt2", QKV_MLP):
              (["c_attn", "c_fc", "mlp.c_proj"], {"c_attn": 12}),
              ("llama", ALL): (["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj",
                                "up_proj", "v_proj"], {}),
              ("bert", QV): (["query", "value"], {})}[kind, targets]
  assert (config["target_modules"], config["rank_pattern"]) == expected
  assert config["fan_in_fan_out"] == (kind == "gpt2") and config["r"] == 4
  assert config["task_type"] == ("SEQ_CLS" if kind == "bert" else "CAUSAL_LM")
  assert config["modules_to_save"] == (["classifier"] if kind == "bert" else None)
  again_model, again = hf.load_peft(adapter_dir)  # and back, exactly
  assert _diff(_ours(again_model, again, tokens, mask), ours, mask) <= 1e-5


def test_rslora_and_a_fused_c_attn_keep_peft_scale_exact(tmp_path):
  model, params, base_dir, adapter_dir, config = _export("gpt2", QV, tmp_path, rslora=True)
  assert config["use_rslora"] and config["rank_pattern"] == {"c_attn": 8}
  assert config["alpha_pattern"]["c_attn"] == pytest.approx(8.0 / 2 * np.sqrt(8))
  tokens, mask = _batch()
  theirs = H.torch_out(_peft_model(base_dir, adapter_dir, "gpt2"), tokens, mask).logits.numpy()
  assert _diff(_ours(model, params, tokens, mask), theirs, mask) <= TOL


def test_adalora_exports_as_lora_with_per_module_ranks(tmp_path):
  from peft.utils.other import get_pattern_key

  def zeros(path, shape):  # some triplets pruned; all of layer 0's o projection
    keep = (np.random.default_rng(zlib.crc32(path.encode())).random(shape) < 0.6).astype(np.float32)
    return keep * (0.0 if path.startswith("layer_0/attn/o") else 1.0)
  model, params, base_dir, adapter_dir, config = _export("llama", ALL, tmp_path, adalora=True,
                                                         zeros=zeros)
  flat = dict(partition.items(params))
  kept = {p[:-len("/lora/e")]: int((flat[p] != 0).sum()) for p in flat if p.endswith("/lora/e")}
  assert kept["layer_0/attn/o"] == 0 and len(set(kept.values())) > 2
  assert not config["use_rslora"] and config["r"] == 4
  saved = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
  names = {"attn/q": "self_attn.q_proj", "attn/o": "self_attn.o_proj", "mlp/wi": "mlp.up_proj"}
  for i in (0, 1):
    for ours, theirs in names.items():
      module = f"model.layers.{i}.{theirs}"
      rank = config["rank_pattern"].get(get_pattern_key(config["rank_pattern"], module), 4)
      # PEFT's rank for the module is the one saved: the kept triplets (rank 1 if none are)
      assert saved[f"base_model.model.{module}.lora_A.weight"].shape[0] == rank
      assert rank == max(kept[f"layer_{i}/{ours}"], 1)
  assert not saved["base_model.model.model.layers.0.self_attn.o_proj.lora_B.weight"].any()
  tokens, mask = _batch()
  theirs = H.torch_out(_peft_model(base_dir, adapter_dir, "llama"), tokens, mask).logits.numpy()
  assert _diff(_ours(model, params, tokens, mask), theirs, mask) <= TOL


@pytest.mark.parametrize("name,lora", [
    ("gpt2", dict(target_modules=["c_attn", "c_fc"], rank_pattern={"h.1.attn.c_attn": 2},
                  alpha_pattern={"c_fc": 5.0})),
    ("llama_gqa_untied", dict(target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                              "down_proj"], use_rslora=True,
                              rank_pattern={"k_proj": 3})),
    ("bert_cls", dict(target_modules=["query", "key", "output.dense"], task_type="SEQ_CLS"))])
def test_a_peft_made_adapter_imports_with_equal_logits(name, lora, tmp_path):
  import peft
  import torch
  reference = H.make(name, tmp_path / "base")
  torch.manual_seed(0)
  config = peft.LoraConfig(**{"r": 4, "lora_alpha": 6, "init_lora_weights": False,
                              "task_type": "CAUSAL_LM", **lora})
  made = peft.get_peft_model(reference, config).eval()
  made.save_pretrained(str(tmp_path / "adapter"))
  tokens, mask = _batch()
  theirs = H.torch_out(made, tokens, mask).logits.detach().numpy()
  model, params = hf.load_peft(str(tmp_path / "adapter"), base=str(tmp_path / "base"))
  assert _diff(_ours(model, params, tokens, mask), theirs, mask) <= TOL
  if name == "gpt2":  # c_attn of rank r: q, k and v LoRAs of rank r sharing A
    lora_ = params["layer_1"]["attn"]
    np.testing.assert_array_equal(lora_["q"]["lora"]["a"][:, 2:], 0)
    np.testing.assert_array_equal(lora_["q"]["lora"]["a"], lora_["v"]["lora"]["a"])


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_prompt_tuning_exports_as_peft_prompt_embeddings_with_equal_logits(kind, tmp_path):
  model = _model(kind, Peft(prompt_length=3))
  params = _random_params(model)
  hf.save(model.clone(peft=Peft()), _base_of(params), str(tmp_path / "base"))
  hf.save_prompt(model, params, str(tmp_path / "prompt"), base_model_path=str(tmp_path / "base"))
  reference = _peft_model(str(tmp_path / "base"), str(tmp_path / "prompt"), kind)
  np.testing.assert_array_equal(
      reference.prompt_encoder["default"].embedding.weight.detach().numpy(), params["prompt"])
  tokens = _batch()[0]
  mask = np.ones_like(tokens)
  theirs = H.torch_out(reference, tokens, mask).logits.numpy()[:, 3:]  # less the virtual tokens
  assert _diff(_ours(model, params, tokens, mask), theirs, mask) <= TOL
  encoder = _model("bert", Peft(prompt_length=3))
  with pytest.raises(hf.AdapterError, match="encoder's tuned prompt computes differently"):
    hf.save_prompt(encoder, _random_params(encoder), str(tmp_path / "no"))
  assert not os.path.exists(tmp_path / "no")


# --- runs: llmjax export and init_from=peft: --------------------------------------------------


def _experiment(tmp, **sections):
  """The shared tiny Llama-shaped LoRA LM run's experiment (biases, GQA), edited by `sections`."""
  return lora_experiment(tmp, **sections)


@pytest.fixture(scope="module")
def lora_run(lora_lm_run):
  """_experiment(tmp) trained for 8 steps: conftest's, shared with test_finetune."""
  return lora_lm_run[1]


@pytest.fixture(scope="module")
def lora_adapter(lora_lm_run, tmp_path_factory):
  """The LoRA run exported with `llmjax export --out=hf:DIR` (its last step)."""
  exp, run = lora_lm_run
  adapter = tmp_path_factory.mktemp("exported") / "adapter"
  assert export.export(str(run), f"hf:{adapter}") == exp.train.steps == 8
  return adapter


def _restored(workdir):
  from llmjax.train import rundir
  run = rundir.restore(str(workdir))
  return run.model, jax.device_get(run.params)


def test_a_lora_run_exports_to_peft_merged_and_llmjax_with_equal_logits(lora_run, lora_adapter,
                                                                       tmp_path):
  model, params = _restored(lora_run)
  assert np.abs(params["layer_0"]["attn"]["q"]["lora"]["b"]).max() > 0  # it trained
  adapter = lora_adapter
  with open(adapter / "adapter_config.json") as f:  # no HF base: the frozen one comes along
    assert json.load(f)["base_model_name_or_path"] == str(adapter / "base")
  tokens, mask = _batch()
  reference = _peft_model(str(adapter / "base"), str(adapter), "llama")
  theirs = H.torch_out(reference, tokens, mask).logits.numpy()
  ours = _ours(model, params, tokens, mask)
  assert _diff(ours, theirs, mask) <= TOL
  export.export(str(lora_run), f"hf:{tmp_path / 'merged'}", merge=True)
  merged = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()
  assert _diff(H.torch_out(merged, tokens, mask).logits.numpy(), theirs, mask) <= 1e-5
  export.export(str(lora_run), str(tmp_path / "llmjax"))  # an llmjax export: merged as well
  from llmjax.hf import convert
  loaded = convert.load_export(str(tmp_path / "llmjax"))
  assert not any("/lora/" in p for p, _ in partition.items(loaded.params))
  assert _diff(_ours(loaded.model, loaded.params, tokens, mask), ours, mask) <= 1e-5


def test_init_from_peft_starts_from_the_adapter(lora_run, lora_adapter, tmp_path):
  """Into a scanned model: the adapter's per-layer factors stack on the layer axis."""
  from llmjax.train import loop
  from llmjax.train import setup as setuplib
  exp = _experiment(tmp_path, train=dict(init_from=f"peft:{lora_adapter}", seed=7),
                    model=dict(scan_layers=True))
  s = setuplib.prepare(exp, str(tmp_path / "run"))
  with jax.set_mesh(s.mesh):
    state = loop.fresh_state(s)
  _, trained = _restored(lora_run)
  want = dict(partition.items(trained))
  def unscanned(path, value):
    return {path.replace("layers/", f"layer_{i}/", 1): value[i] for i in range(2)}
  got, base = {}, {}
  for tree, out in ((state.params, got), (state.frozen, base)):
    for path, value in partition.items(tree):
      out.update(unscanned(path, np.asarray(value)) if path.startswith("layers/") else
                 {path: np.asarray(value)})
  assert set(got) == {p for p in want if "/lora/" in p} and set(got) | set(base) == set(want)
  for path, value in got.items():
    np.testing.assert_allclose(value, want[path], atol=1e-6, err_msg=path)
  for path, value in base.items():
    np.testing.assert_array_equal(value, want[path], err_msg=path)


def test_a_trained_vocabulary_from_an_adapter_gives_way_to_its_bases_tokenizer(tmp_path):
  """wordpiece:N with init_from=peft: reads the base's tokenizer.json (base_model_name_or_path
  relative to the adapter), as with hf:; the run's texts are never tokenized into a new vocab."""
  from llmjax.tasks import encoding
  base, adapter = tmp_path / "base", tmp_path / "adapter"
  base.mkdir()
  adapter.mkdir()
  (base / "config.json").write_text("{}")
  H.save_char_tokenizer(base)
  (adapter / hfpeft.CONFIG).write_text(json.dumps({"base_model_name_or_path": "../base"}))
  exp = _experiment(tmp_path, data=dict(tokenizer="wordpiece:64"),
                    train=dict(init_from=f"peft:{adapter}"))
  tokenizer, artifacts = encoding.run_tokenizer(exp, None, lambda: pytest.fail("trained a vocab"))
  assert tokenizer.vocab_size == H.CHAR_VOCAB and set(artifacts) == {"tokenizer.json"}
  (adapter / hfpeft.CONFIG).write_text(json.dumps({"base_model_name_or_path": "../nowhere"}))
  with pytest.raises(UserError, match=r"init_from='peft:.*base_model_name_or_path='\.\./nowhere'"):
    encoding.run_tokenizer(exp, None, lambda: pytest.fail("trained a vocab"))


# --- bad input --------------------------------------------------------------------------------


def _fake_run(workdir, tmp, **finetune):
  """A run directory whose config.json names a method (export refuses before reading more)."""
  workdir.mkdir()
  (workdir / "config.json").write_text(_experiment(tmp, finetune=finetune).to_json())
  return str(workdir)


@pytest.mark.parametrize("method,out,merge,match", [
    ("adapter", "hf:", False, r"method='adapter' has no Hugging Face form; --out=hf: exports lora"),
    ("prefix", "hf:", False, r"method='prefix' has no Hugging Face form"),
    ("prompt", "", False, r"method='prompt': an llmjax export .* PEFT prompt"),
    ("prompt", "hf:", True, r"--merge applies to --out=hf:PATH of a lora or adalora run"),
    ("full", "hf:", True, r"--merge applies")])
def test_exports_a_method_cannot_have_are_refused_with_exit_2(method, out, merge, match,
                                                              tmp_path, capsys):
  workdir = _fake_run(tmp_path / "run", tmp_path, method=method)
  dest = tmp_path / "out"
  with pytest.raises(UserError, match=match):
    export.export(workdir, f"{out}{dest}", merge=merge)
  with pytest.raises(SystemExit) as e:
    export.main(["llmjax export", f"--workdir={workdir}", f"--out={out}{dest}",
                 "--merge" if merge else "--nomerge"])
  assert e.value.code == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
  assert not os.path.exists(dest) and not os.path.exists(f"{dest}.tmp-export")


_DEFAULT_MODEL = dataclasses.asdict(ModelConfig())


def _adapter_for_run_tests(tmp_path, kind="llama", targets=ALL, **config):
  """A random adapter over a tiny HF base, edited by `config`."""
  model, _, base_dir, adapter_dir, written = _export(kind, targets, tmp_path, vocab=256)
  written.update(config)
  with open(os.path.join(adapter_dir, "adapter_config.json"), "w") as f:
    json.dump(written, f)
  return adapter_dir


@pytest.mark.parametrize("edit,finetune,model,match", [
    (dict(r=8), {}, {}, r"the adapter has r=8 but config.finetune.lora_rank=4"),
    (dict(lora_alpha=32), {}, {}, r"lora_alpha=32.0 but config.finetune.lora_alpha=8.0"),
    ({}, dict(method="full"), {}, r"needs config.finetune.method='lora', not 'full'"),
    (dict(base_model_name_or_path="missing"), {}, {},
     r"base_model_name_or_path='missing' is not a local Hugging Face model directory"),
    ({}, {}, dict(d_model=48), r"config.model.d_model=48 but the checkpoint has 32"),
    ({}, dict(lora_targets="qv"), {}, r"unexpected base_model.model.model.layers.0.mlp"
                                      r".down_proj.lora_A.weight \(LoRA on a module"),
    (dict(peft_type="IA3"), {}, {}, r"peft_type 'IA3' is not LoRA")])
def test_init_from_a_peft_adapter_that_does_not_fit_is_named(edit, finetune, model, match,
                                                              tmp_path):
  from llmjax.train import setup as setuplib
  adapter = _adapter_for_run_tests(tmp_path, **edit)
  exp = _experiment(tmp_path, train=dict(init_from=f"peft:{adapter}"),
                    model={**_DEFAULT_MODEL, **model},  # the shape comes from the base
                    finetune={"lora_targets": "all_linear", **finetune})
  with pytest.raises(UserError, match=match) as e:
    setuplib.prepare(exp, str(tmp_path / "run"))
  assert "\n" not in str(e.value)
  assert not os.path.exists(tmp_path / "run")


def test_an_adapter_for_another_architecture_is_named(tmp_path):
  from llmjax.train import setup as setuplib
  gpt2_adapter = _adapter_for_run_tests(tmp_path / "g", "gpt2", QV)
  llama_base = _adapter_for_run_tests(tmp_path / "l")  # only its base/ is used
  with open(os.path.join(gpt2_adapter, "adapter_config.json")) as f:
    config = json.load(f)
  config["base_model_name_or_path"] = os.path.join(os.path.dirname(llama_base), "base")
  with open(os.path.join(gpt2_adapter, "adapter_config.json"), "w") as f:
    json.dump(config, f)
  exp = _experiment(tmp_path, train=dict(init_from=f"peft:{gpt2_adapter}"),
                    model=_DEFAULT_MODEL)
  with pytest.raises(UserError, match=r"no base_model.model.model.layers.0.self_attn.q_proj"
                                      r".lora_A.weight"):
    setuplib.prepare(exp, str(tmp_path / "run"))
