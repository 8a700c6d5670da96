"""Weight quantization (llmjax/models/quant.py, quant_tree.py): formats, the quantized model,
`llmjax quantize` and QLoRA (docs/compression.md)."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from llmjax.config import ModelConfig
from llmjax.errors import ConfigError
from llmjax.hf import api
from llmjax.models import presets
from llmjax.models import quant as quantlib
from llmjax.models import quant_tree
from llmjax.models.transformer import Transformer

FORMATS = ("int8", "int8:asym", "int8:g16", "int4:g32", "int4:g16:asym", "nf4:g32")


def _tiny(**overrides) -> ModelConfig:
  known = {f.name for f in dataclasses.fields(ModelConfig)}
  fields = {**presets.get("llama"), **dict(vocab_size=64, d_model=32, n_layers=1, n_heads=2,
                                            d_ff=64, max_len=16, use_bias=True), **overrides}
  return ModelConfig(**{k: v for k, v in fields.items() if k in known})


def _np_values(stored: dict, spec) -> np.ndarray:
  """The stored integers read back with numpy alone (nibbles, sign, zero point)."""
  q = np.asarray(stored["kernel"])
  if spec.bits == 4:
    lo, hi = (q & 15).astype(np.int32), (q >> 4).astype(np.int32)
    q = np.stack([lo, hi], axis=1).reshape((q.shape[0] * 2,) + q.shape[1:])
    if spec.kind != "nf4":
      q = np.where(q >= 8, q - 16, q)
  q = q.astype(np.int32)
  scale = np.asarray(stored["kernel_scale"])
  reps = [a // b for a, b in zip(q.shape, scale.shape)]
  if "kernel_zero" in stored:
    q = q - _tile(np.asarray(stored["kernel_zero"]).astype(np.int32), reps)
  base = quantlib.NF4[q] if spec.kind == "nf4" else q.astype(np.float32)
  return base * _tile(scale, reps)


def _tile(s: np.ndarray, reps) -> np.ndarray:
  for axis, r in enumerate(reps):
    s = np.repeat(s, r, axis=axis)
  return s


def test_formats_roundtrip_within_bounds_and_numpy_reads_them():
  """quantize -> dequantize within each format's bound; numpy reads the same values; 4-bit
  stores two values a byte; NF4 is QLoRA's table; groups span heads of a [N, H, D] kernel."""
  rng = np.random.default_rng(0)
  for text in FORMATS:
    for shape, n_in in (((64, 24), 1), ((4, 16, 24), 2))[:2 if "4" in text else 1]:
      spec = quantlib.parse(text)
      w = jnp.asarray(rng.normal(size=shape).astype(np.float32))

      def roundtrip(w):
        stored = quantlib.quantize(w, n_in, spec)
        return stored, quantlib.dequantize(stored, spec), quantlib.error_bound(stored, spec)
      stored, deq, bound = jax.jit(roundtrip)(w)
      assert bool(jnp.all(jnp.abs(deq - w) <= bound * (1 + 1e-5) + 1e-7)), (text, shape)
      np.testing.assert_allclose(np.asarray(deq), _np_values(stored, spec), rtol=1e-6, atol=1e-7)
      assert stored["kernel"].nbytes * (2 if spec.bits == 4 else 1) == w.size, text
      rel = float(jnp.linalg.norm(deq - w) / jnp.linalg.norm(w))
      assert rel < (0.01 if spec.bits == 8 else 0.15), (text, rel)
  assert quantlib.scale_shape((4, 64, 32), 2, 128, "o") == (2, 1, 32)
  assert quantlib.scale_shape((4, 64, 32), 2, 32, "o") == (4, 2, 32)
  np.testing.assert_allclose(quantlib.NF4[[0, 1, 7, 8, 14, 15]],
                             [-1.0, -0.6961928, 0.0, 0.0795803, 0.7229568, 1.0], atol=1e-6)
  with pytest.raises(ConfigError, match=r"layer_0/mlp/wo: group size 48 does not divide .* 64"):
    quantlib.scale_shape((64, 32), 1, 48, "layer_0/mlp/wo")
  for bad in ("int3", "int4:g", "nf4:asym", "int8:x"):
    with pytest.raises(ConfigError, match="config.model.quant"):
      quantlib.parse(bad)


def test_quantized_model_logits_equal_numpy_dequantized_reference():
  """The quantized model (scanned and not, every format) computes the float model's logits on
  the numpy-dequantized kernels; int8 x int8 -> int32 compute stays close to them."""
  x = jnp.arange(16).reshape(2, 8) % 64
  for scan, formats in ((False, ("int4:g16:asym", "nf4:g32")), (True, ("int8",))):
    cfg = _tiny(scan_layers=scan)
    # one jit each (eager init dispatches dozens of small programs; one float apply serves all)
    params = nn.unbox(jax.jit(Transformer(cfg).init)(jax.random.PRNGKey(0), x)["params"])
    float_apply = jax.jit(Transformer(cfg).apply)
    for text in formats:
      qmodel = Transformer(dataclasses.replace(cfg, quant=text))
      found = quant_tree.layouts(lambda: api.abstract_variables(qmodel))
      assert len(found) == 7 * (1 if scan else cfg.n_layers)
      qparams = quant_tree.quantize_tree(params, found)
      spec = quantlib.parse(text)
      ref = jax.tree.map(lambda a: a, params)
      for layout in found.values():
        node = ref
        for name in layout.path.split("/"):
          node = node[name]
        qnode = qparams
        for name in layout.path.split("/"):
          qnode = qnode[name]
        stored = {k: qnode[k] for k in quant_tree.PARTS if k in qnode}
        node["kernel"] = (np.stack([_np_values(jax.tree.map(lambda a: a[i], stored), spec)
                                    for i in range(stored["kernel"].shape[0])])
                          if scan else _np_values(stored, spec))
      got = jax.jit(qmodel.apply)({"params": qparams}, x)
      want = float_apply({"params": ref}, x)
      np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    if scan:
      continue
    int8 = Transformer(dataclasses.replace(cfg, quant="int8", quant_compute="int8"))
    found = quant_tree.layouts(lambda: api.abstract_variables(int8))
    got = jax.jit(int8.apply)({"params": quant_tree.quantize_tree(params, found)}, x)
    want = float_apply({"params": params}, x)
    assert float(jnp.max(jnp.abs(got - want))) < 0.02 * float(jnp.max(jnp.abs(want)))
  with pytest.raises(ConfigError, match="quant_compute='int8' needs"):
    api.abstract_variables(Transformer(_tiny(quant="int4:g16", quant_compute="int8")))


def _kernel_bytes(flat: dict, parts: tuple[str, ...]) -> int:
  """Bytes of the quantized kernels' `parts` (a float lm_head/kernel is no quantized kernel)."""
  return sum(x.nbytes for p, x in flat.items() if p.rsplit("/", 1)[-1] in parts
             and f"{p.rsplit('/', 1)[0]}/kernel_scale" in flat)


def test_quantize_verb_export_reads_back_and_refuses_bad_input(lm_run, tmp_path):
  """`llmjax quantize` of a trained tiny run: int8 keeps the validation loss within 1%, the
  quantized kernels take about bits/32 of the float ones' bytes, `generate` and the export:
  weights source read the export; bad flags and an already quantized export are refused with
  one line, exit 2, nothing written."""
  import json
  import subprocess
  import sys

  from _cli import run
  from llmjax import checkpoint, treepaths
  from llmjax.hf import convert
  q8, q4 = tmp_path / "q8", tmp_path / "q4"
  result = run("quantize", f"--workdir={lm_run}", "--bits=8", f"--out={q8}", "--eval_batches=2")
  assert result.returncode == 0, result.stderr
  report = json.loads((q8 / "quantization.json").read_text())
  before, after = report["eval"]["float"]["loss"], report["eval"]["int8"]["loss"]
  assert abs(after - before) <= 0.01 * before, (before, after)
  assert len(report["relative_error"]) == 7  # q, k, v, o, wi, wg, wo of lm_run's one layer
  assert max(report["relative_error"].values()) < 0.01
  result = run("quantize", f"--checkpoint=export:{q8}", "--bits=4", f"--out={tmp_path / 'x'}")
  assert result.returncode == 2 and "already quantized" in result.stderr
  result = run("quantize", f"--workdir={lm_run}", "--bits=4", "--group_size=16", f"--out={q4}")
  assert result.returncode == 0, result.stderr
  for out, bits in ((q8, 8), (q4, 4)):
    loaded = convert.load_export(str(out))
    assert loaded.model.cfg.quant == ("int8" if bits == 8 else "int4:g16")
    flat = dict(treepaths.items(loaded.params))
    stored = _kernel_bytes(flat, ("kernel",))
    values = sum(int(np.prod(x.shape)) for p, x in flat.items()
                 if p.endswith("/kernel") and x.dtype != np.float32) * (8 // bits)
    assert stored * 8 == values * bits  # the integers alone: exactly bits per weight
    with_scales = _kernel_bytes(flat, ("kernel", "kernel_scale", "kernel_zero"))
    assert bits / 32 <= with_scales / (values * 4) <= bits / 32 * 1.55
  result = run("generate", f"--checkpoint=export:{q4}", "--prompt=def ", "--max_new_tokens=3")
  assert result.returncode == 0 and result.stdout.startswith("def "), result.stderr
  result = run("chat", f"--checkpoint=export:{q4}", "--message=def ", "--max_new_tokens=3",
               "--chat_template=byte")
  assert result.returncode == 0 and result.stdout.strip(), result.stderr
  _init_from_quantized_export(q4, tmp_path)
  assert checkpoint.exported_shapes(str(q4))["layer_0/mlp/wo/kernel_scale"] == (4, 32)
  bad = [(["--bits=3"], "--bits=3: allowed 8 or 4"),
         (["--bits=4", "--group_size=24"],
          "layer_0/attn/q: group size 24 does not divide the input dimension 32"),
         (["--bits=8", "--format=nf4"], "--format=nf4 is 4-bit")]
  for flags, message in bad:
    out = tmp_path / "bad"
    result = run("quantize", f"--workdir={lm_run}", *flags, f"--out={out}")
    assert result.returncode == 2 and message in result.stderr, (flags, result.stderr)
    assert result.stderr.count("\n") == 1 and not out.exists()
  proc = subprocess.run([sys.executable, "-m", "llmjax.cli.main", "quantize",
                         f"--checkpoint={q8}", "--bits=8", f"--out={q8}"],
                        capture_output=True, text=True)
  assert proc.returncode == 2 and proc.stderr.strip().endswith("already exists; choose a new "
                                                               "directory"), proc.stderr


def _init_from_quantized_export(q4, tmp_path) -> None:
  """init_from=export: of a quantized export: LoRA over its stored kernels with
  config.model.quant set to the export's (the frozen base is its integers as stored); a float
  model, another quant, base_quant or full fine-tuning over it are refused with one line."""
  from _task_helpers import experiment
  from llmjax import treepaths, weights
  from llmjax.hf import convert
  from llmjax.train import loop
  from llmjax.train import setup as setuplib
  lora = dict(method="lora", lora_rank=2, lora_targets="all_linear")
  exp = experiment("lm", tmp_path, finetune=lora, model=dict(quant="int4:g16"),
                   train=dict(init_from=f"export:{q4}"))
  frozen = dict(treepaths.items(jax.device_get(loop.fresh_state(setuplib.prepare(exp)).frozen)))
  source = weights.parse(f"export:{q4}", "--checkpoint")
  stored = dict(treepaths.items(source.load(nn.unbox(api.abstract_params(
      convert.load_export(str(q4)).model)), None)))
  assert frozen["layer_0/mlp/wi/kernel"].dtype == np.uint8
  assert set(frozen) == set(stored)
  for p, x in stored.items():
    assert np.array_equal(np.asarray(x), frozen[p]), p
  bad = [(dict(finetune=lora), "stores its kernels quantized ('int4:g16'), config.model.quant=''"),
         (dict(finetune=lora, model=dict(quant="int8")), "set config.model.quant='int4:g16'"),
         (dict(finetune={**lora, "base_quant": "int4:g16"}), "is quantized already"),
         (dict(model=dict(quant="int4:g16")), "stores layer_0/attn/k/kernel as uint8, which "
                                               "cannot train")]
  for sections, message in bad:
    exp = experiment("lm", tmp_path, train=dict(init_from=f"export:{q4}"), **sections)
    with pytest.raises(ConfigError, match=re.escape(message)):
      setuplib.prepare(exp)


def test_sharded_quantized_load_equals_unsharded(tmp_path):
  """A quantized export read straight into its shards (dp and fsdp over 8 devices) holds the
  arrays an unsharded read does, and the sharded model computes the same logits."""
  from llmjax import checkpoint, weights
  from llmjax.config import MeshConfig
  from llmjax.parallel import mesh as meshlib
  from llmjax.parallel import sharding
  cfg = _tiny()
  x = jnp.arange(16).reshape(8, 2) % 64
  params = nn.unbox(jax.jit(Transformer(cfg).init)(jax.random.PRNGKey(0), x)["params"])
  qmodel = Transformer(dataclasses.replace(cfg, quant="int4:g16"))
  found = quant_tree.layouts(lambda: api.abstract_variables(qmodel))
  qparams = jax.device_get(quant_tree.quantize_tree(params, found))
  checkpoint.export_params(qparams, dataclasses.asdict(qmodel.cfg), str(tmp_path / "q"))
  source = weights.parse(f"export:{tmp_path / 'q'}", "--checkpoint")
  boxed = api.abstract_variables(qmodel)["params"]
  plain = source.load(nn.unbox(boxed), None)
  want = jax.jit(qmodel.apply)({"params": plain}, x)
  for rules, mesh_cfg in (("dp", MeshConfig(data=8)), ("fsdp", MeshConfig(data=1, fsdp=8))):
    mesh = meshlib.make_mesh(mesh_cfg)
    shardings = sharding.logical_shardings(boxed, mesh, sharding.rules_for(rules))
    loaded = source.load(nn.unbox(boxed), shardings)
    for (path, a), (_, b) in zip(jax.tree_util.tree_leaves_with_path(loaded),
                                 jax.tree_util.tree_leaves_with_path(plain)):
      assert a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b)), path
    kernel = loaded["layer_0"]["attn"]["q"]["kernel"]
    assert kernel.dtype == jnp.uint8
    if rules == "fsdp":
      assert "fsdp" in str(kernel.sharding.spec), kernel.sharding
    with jax.set_mesh(mesh):
      got = jax.jit(qmodel.apply)({"params": loaded}, x)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_qlora_base_quantized_in_state_adapters_train_resume_exact(lm_run, tmp_path):
  """config.finetune.base_quant: the frozen base is stored int4 in the train state (dtype and
  bytes), equal to quantizing init_from's weights; only LoRA factors are trainable and move;
  the checkpoint's base identity is the quantized base's; a resume from step 2 reproduces the
  run's losses exactly; `llmjax export` writes the dequantized base with LoRA merged (the run's
  logits) and, to hf:, the adapter with the dequantized base in base/; base_quant with full
  fine-tuning or without init_from is refused."""
  import json
  import shutil

  import llmjax.train
  from _cli import run as cli
  from _task_helpers import experiment
  from llmjax import hf, treepaths
  from llmjax.hf import convert
  from llmjax.train import pretrained, rundir
  ft = dict(method="lora", lora_rank=2, lora_targets="all_linear", base_quant="int4:g16")
  exp = experiment("lm", tmp_path, finetune=ft,
                   train=dict(init_from=f"workdir:{lm_run}", steps=4, checkpoint_every=2,
                              eval_every=100, async_checkpoint=False, sample_prompts=0))
  assert exp.model.quant == "int4:g16"
  workdir = tmp_path / "qlora"
  llmjax.train.run(exp, str(workdir))
  run = rundir.restore(str(workdir))
  frozen = dict(treepaths.items(jax.device_get(run.state.frozen)))
  trained = dict(treepaths.items(jax.device_get(run.state.params)))
  assert trained and all("/lora/" in p and x.dtype == np.float32 for p, x in trained.items())
  assert all(np.any(x != 0) for p, x in trained.items() if p.endswith("/lora/b"))
  q = frozen["layer_0/mlp/wi/kernel"]
  assert q.dtype == np.uint8 and q.shape == (16, 64) and q.nbytes == 32 * 64 // 2
  base = rundir.restore(str(lm_run))
  qmodel = base.model.clone(cfg=dataclasses.replace(base.model.cfg, quant="int4:g16"))
  found = quant_tree.layouts(lambda: api.abstract_variables(qmodel))
  want = dict(treepaths.items(jax.device_get(
      quant_tree.quantize_tree(jax.device_get(base.params), found))))
  assert set(want) == set(frozen)
  for p, x in want.items():
    assert x.dtype == frozen[p].dtype and np.array_equal(x, frozen[p]), p
  identity = pretrained.base_identity(run.exp, run.state.frozen)
  assert identity["sha256"] != pretrained.base_identity(run.exp, base.params)["sha256"]
  losses = lambda: [json.loads(line) for line in (workdir / "metrics.jsonl").read_text()
                    .splitlines() if '"train"' in line]
  first = {r["step"]: r["loss"] for r in losses()}
  shutil.rmtree(workdir / "checkpoints" / "4")
  llmjax.train.run(exp, str(workdir))  # resumes at 2, checks the quantized base's identity
  assert sorted(first) == [2, 4]
  assert {r["step"]: r["loss"] for r in losses()} == first
  assert (workdir / "checkpoints" / "4").exists()
  out, adapter = tmp_path / "export", tmp_path / "adapter"
  for flags in ([f"--out={out}"], [f"--out=hf:{adapter}"]):
    result = cli("export", f"--workdir={workdir}", *flags)
    assert result.returncode == 0, result.stderr
  exported = convert.load_export(str(out))
  assert exported.model.cfg.quant == ""
  x = jnp.arange(16).reshape(2, 8) % 64
  want = jax.jit(run.model.apply)({"params": run.params}, x)
  got = jax.jit(exported.model.apply)({"params": exported.params}, x)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
  assert (adapter / "adapter_model.safetensors").exists()
  deq = dict(treepaths.items(quant_tree.dequantize_tree(run.state.frozen, found)))
  _, hf_base = hf.load(str(adapter / "base"))
  compared = [p for p, _ in treepaths.items(hf_base) if p[:-len("/kernel")] in found]
  assert len(compared) == len(found)
  for p in compared:
    assert np.array_equal(np.asarray(dict(treepaths.items(hf_base))[p]), np.asarray(deq[p])), p
  with pytest.raises(ConfigError, match="base_quant='int8' keeps the base's kernels"):
    experiment("lm", tmp_path, finetune=dict(method="full", base_quant="int8"),
               train=dict(init_from=f"workdir:{lm_run}"))
  with pytest.raises(ConfigError, match="needs config.train.init_from"):
    experiment("lm", tmp_path, finetune=dict(method="lora", base_quant="int8"))
