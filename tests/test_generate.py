"""llmjax.generate: greedy tokens identical to transformers' generate (batched, left-padded), the
KV cache equal to full recomputation, reproducible sampling, and the convert/generate CLIs."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

import _hf_helpers as H  # noqa: E402
import _xla  # noqa: E402
from llmjax import generate as G  # noqa: E402
from llmjax import hf  # noqa: E402
from llmjax.config import ModelConfig  # noqa: E402
from llmjax.errors import UserError  # noqa: E402
from llmjax.models import heads, presets  # noqa: E402
from llmjax.models.transformer import init_cache  # noqa: E402

PROMPTS = [[5, 17, 3, 99, 42], [8, 1, 64, 23, 7, 7, 30, 2, 11], [60, 4, 9]]
N_NEW = 32


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  out = {}
  for name in ("gpt2", "llama_gqa_untied"):
    directory = tmp_path_factory.mktemp(name)
    out[name] = (str(directory), H.make(name, directory))
  return out


def _torch_greedy(ref_model, tokens, mask, **kwargs):
  import torch
  with torch.no_grad():
    out = ref_model.generate(input_ids=torch.tensor(tokens, dtype=torch.long),
                             attention_mask=torch.tensor(mask, dtype=torch.long),
                             do_sample=False, max_new_tokens=N_NEW, pad_token_id=0, **kwargs)
  return out[:, tokens.shape[1]:].numpy()


@pytest.mark.parametrize("name", ["gpt2", "llama_gqa_untied"])
def test_greedy_is_token_identical_to_transformers_with_left_padding(saved, name):
  directory, ref_model = saved[name]
  tokens, mask = G.left_pad(PROMPTS)
  ref = _torch_greedy(ref_model, tokens, mask)
  model, params = hf.load(directory, scan_layers=name.startswith("llama"))
  ours = np.asarray(G.generate(model, params, tokens, prompt_mask_BP=mask, max_new_tokens=N_NEW))
  assert ref.shape == ours.shape == (3, N_NEW)
  np.testing.assert_array_equal(ours, ref)
  # Stop at EOS like transformers: padding after it, the loop ends once every row is done.
  eos = int(ref[1, 4])
  ref_eos = _torch_greedy(ref_model, tokens, mask, eos_token_id=eos)
  ours_eos = np.asarray(G.generate(model, params, tokens, prompt_mask_BP=mask,
                                   max_new_tokens=N_NEW, eos_ids=[eos]))
  np.testing.assert_array_equal(ours_eos[:, :ref_eos.shape[1]], ref_eos)
  assert (ours_eos[:, ref_eos.shape[1]:] == 0).all()


def test_kv_cache_decoding_equals_full_recomputation(saved):
  # Scanned layers: the cache gets a leading layer axis like the params.
  model, params = hf.load(saved["llama_gqa_untied"][0], scan_layers=True)
  tokens = jnp.asarray(H.padded_batch(seed=4)[0], jnp.int32)
  full = jax.jit(model.apply)({"params": params}, tokens)
  step = jax.jit(lambda c, t: model.apply({"params": params, "cache": c}, t, decode=True,
                                          mutable=["cache"]))
  logits, variables = step(init_cache(model, tokens.shape[0], 16), tokens[:, :7])
  pieces = [logits]
  for i in range(7, tokens.shape[1]):
    logits, variables = step(variables["cache"], tokens[:, i:i + 1])
    pieces.append(logits)
  assert variables["cache"]["layers"]["attn"]["cached_k"].shape == (2, 4, 16, 2, 8)
  np.testing.assert_allclose(jnp.concatenate(pieces, axis=1), full, atol=1e-5)


def test_cached_greedy_equals_a_loop_that_recomputes_everything(saved):
  model, params = hf.load(saved["gpt2"][0])
  tokens, mask = G.left_pad(PROMPTS)
  width = tokens.shape[1]
  buffer = jnp.concatenate([jnp.asarray(tokens), jnp.zeros((3, N_NEW), jnp.int32)], axis=1)
  segments = jnp.concatenate([jnp.asarray(mask), jnp.ones((3, N_NEW), jnp.int32)], axis=1)
  positions = jnp.asarray(H.hf_positions(np.asarray(segments)))
  forward = jax.jit(lambda b: model.apply({"params": params}, b, segment_ids_BL=segments,
                                          positions_BL=positions))
  for i in range(N_NEW):  # causal: later (still empty) slots cannot change earlier logits
    buffer = buffer.at[:, width + i].set(jnp.argmax(forward(buffer)[:, width + i - 1], axis=-1))
  cached = G.generate(model, params, tokens, prompt_mask_BP=mask, max_new_tokens=N_NEW)
  np.testing.assert_array_equal(cached, buffer[:, width:])


def test_sampling_is_reproducible_and_filters_behave(saved):
  model, params = hf.load(saved["gpt2"][0])
  tokens, mask = G.left_pad(PROMPTS)
  run = lambda key, **kw: np.asarray(G.generate(model, params, tokens, key, prompt_mask_BP=mask,
                                                max_new_tokens=N_NEW, temperature=1.0, **kw))
  first, again = run(jax.random.PRNGKey(7), top_p=0.9), run(jax.random.PRNGKey(7), top_p=0.9)
  np.testing.assert_array_equal(first, again)
  assert not np.array_equal(first, run(jax.random.PRNGKey(8), top_p=0.9))
  greedy = np.asarray(G.generate(model, params, tokens, prompt_mask_BP=mask, max_new_tokens=N_NEW))
  np.testing.assert_array_equal(run(jax.random.PRNGKey(7), top_k=1), greedy)
  logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
  kept = lambda s: np.isfinite(np.asarray(G.filter_logits(logits, s)))[0].tolist()
  assert kept(G.Sampling(1.0, top_k=2)) == [True, True, False, False]
  assert kept(G.Sampling(1.0, top_p=0.7)) == [True, True, False, False]
  assert kept(G.Sampling(1.0, top_p=0.4)) == [True, False, False, False]


def test_training_loop_sample_api_and_bad_requests(saved):
  model, params = hf.load(saved["gpt2"][0])
  prompt = jnp.asarray([PROMPTS[0], PROMPTS[0]], jnp.int32)
  out = G.sample(model, params, prompt, jax.random.PRNGKey(0), n_new=6, temperature=0.8)
  assert out.shape == (2, 6) and out.dtype == jnp.int32
  with pytest.raises(UserError, match="exceeds the model's 64 learned positions"):
    G.generate(model, params, prompt, max_new_tokens=64)
  with pytest.raises(UserError, match="explicit rng"):
    G.generate(model, params, prompt, max_new_tokens=4, temperature=0.5)
  bert = heads.MaskedLM(ModelConfig(**presets.get("bert")))
  with pytest.raises(UserError, match="causal decoder.*MaskedLM"):
    G.generate(bert, {}, prompt, max_new_tokens=4)
  with pytest.raises(UserError, match="top_p"):
    G.generate(model, params, prompt, jax.random.PRNGKey(0), max_new_tokens=4, temperature=1.0,
               top_p=0.0)


def _cli(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=_xla.xla_flags())
  return subprocess.run([sys.executable, "-m", "llmjax.cli.main", *args], capture_output=True,
                        text=True, env=env, timeout=300)


def test_convert_and_generate_cli_end_to_end(tmp_path):
  source = tmp_path / "hf"
  ref_model = H.make("gpt2_chars", source)
  H.save_char_tokenizer(source)
  converted = _cli("convert", f"--from=hf:{source}", f"--to={tmp_path / 'export'}")
  assert converted.returncode == 0, converted.stderr
  assert os.path.isdir(tmp_path / "export" / "params")
  # Back to HF in-process (the library behind `convert --from=DIR`); transformers loads it.
  from llmjax.hf import convert
  convert.export_to_hf(str(tmp_path / "export"), str(tmp_path / "back"))
  again = type(ref_model).from_pretrained(str(tmp_path / "back"))
  for (k, a), (_, b) in zip(sorted(again.state_dict().items()),
                            sorted(ref_model.state_dict().items())):
    np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=k)
  generated = _cli("generate", f"--checkpoint={tmp_path / 'export'}", "--prompt=hello wor",
                   "--max_new_tokens=8")
  assert generated.returncode == 0, generated.stderr
  tokenizer = hf.TextTokenizer(hf.load_tokenizer(str(source)))
  model, params = hf.load(str(source))
  eos = hf.generation_defaults(str(source))["eos_token_ids"]
  assert eos == [1]
  ids = np.asarray(G.generate(model, params, [tokenizer.encode("hello wor")], max_new_tokens=8,
                              eos_ids=eos))[0]
  expected = "hello wor" + tokenizer.decode(list(ids[:list(ids).index(1)] if 1 in ids else ids))
  assert generated.stdout.strip() == expected.strip()
  with pytest.raises(UserError, match="already exists"):  # nothing is overwritten
    convert.hf_to_export(str(source), str(tmp_path / "export"))
