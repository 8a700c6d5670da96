"""Bad input fails early and clearly: through the real CLI (exit code 2, one line naming the key
or file, no traceback, no workdir), and at the library boundary (`resolve` raises ConfigError)."""

import concurrent.futures
import contextlib
import dataclasses
import importlib
import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import linen as nn

import llmjax.tasks  # noqa: F401  registers the tasks' config sections, as the CLI does
from llmjax import config as config_lib
from llmjax.errors import ConfigError
from llmjax.parallel import sharding
from llmjax.train import loop, setup, teacher_run

import _cli
import _suiteA_helpers
import _xla

ROOT = pathlib.Path(__file__).resolve().parents[1]
SMOKE = "--config=experiments/lm/stdlib_gpt.py:smoke"
GAN_SMOKE = "--config=experiments/gan/mnist_dcgan.py:smoke"

# name -> (flags, devices, strings the error line must contain)
BAD_INPUTS = {
    "unknown_key": ([SMOKE, "--config.train.stepz=5"], 1,
                    ["unknown config key config.train.stepz", "did you mean config.train.steps?"]),
    "misspelt_section": ([SMOKE, "--config.trian.steps=5"], 1,
                         ["unknown config key config.trian ", "did you mean config.train?"]),
    "wrong_type": ([SMOKE, "--config.train.steps=abc"], 1,
                   ["config.train.steps must be an int, got 'abc'"]),
    "not_a_float": ([SMOKE, "--config.optim.lr=fast"], 1,
                    ["config.optim.lr must be a float, got 'fast'"]),
    "not_a_bool": ([SMOKE, "--config.train.progress=maybe"], 1,
                   ["config.train.progress must be true or false, got 'maybe'"]),
    "a_section_given_a_value": ([SMOKE, "--config.train=5"], 1,
                                ["config.train is a section", "--config.train.KEY=VALUE"]),
    "verb_flag_not_an_int": ([SMOKE, "--num_processes=two"], 1,
                             ["--num_processes must be an int, got 'two'"]),
    "missing_experiment_file": (["--config=experiments/lm/nope.py:smoke"], 1,
                                ["experiment file experiments/lm/nope.py: No such file"]),
    "missing_file_with_an_override": (["--config=experiments/lm/typo.py",
                                       "--config.train.steps=5"], 1,
                                      ["experiment file experiments/lm/typo.py: No such file",
                                       "--config=FILE[:ARG]"]),
    "experiment_is_a_directory": (["--config=experiments/lm"], 1,
                                  ["experiment file experiments/lm: Is a directory"]),
    "heads_do_not_divide_d_model": ([SMOKE, "--config.model.n_heads=3"], 1,
                                    ["config.model.n_heads", "config.model.d_model"]),
    "kv_heads_do_not_divide_heads": ([SMOKE, "--config.model.n_kv_heads=3"], 1,
                                     ["config.model.n_kv_heads"]),
    "mesh_is_not_the_device_count": ([SMOKE, "--config.mesh.data=3"], 1, ["config.mesh"]),
    "batch_not_divisible_by_data_parallel": ([SMOKE, "--config.train.batch_size=12"], 8,
                                             ["config.train.batch_size"]),
    "sequence_longer_than_positions": ([SMOKE, "--config.data.seq_len=512"], 1,
                                       ["config.data.seq_len", "config.model.max_len"]),
    "missing_corpus_files": ([SMOKE, "--config.data.source=files",
                              "--config.data.files=/nonexistent/*.txt"], 1,
                             ["/nonexistent/*.txt"]),
    "unknown_config_argument": (["--config=experiments/lm/stdlib_gpt.py:bogus"], 1, ["bogus"]),
    "unknown_task": ([SMOKE, "--config.task.name=regress"], 1,
                     ["config.task.name='regress'", "lm, mlm, classify"]),
    "init_from_is_not_a_run": ([SMOKE, "--config.train.init_from=workdir:/nonexistent/run"], 1,
                               ["config.train.init_from", "/nonexistent/run"]),
    "mlm_tokenizer_without_mask": ([SMOKE, "--config.task.name=mlm"], 1,
                                   ["config.data.tokenizer='byte'", "mask"]),
    "pooling_does_not_fit_the_model": ([SMOKE, "--config.task.name=classify",
                                        "--config.task.pooling=cls"], 1,
                                       ["config.task.pooling='cls'", "causal decoder"]),
    "unknown_finetune_method": ([SMOKE, "--config.finetune.method=distill"], 1,
                                ["config.finetune.method='distill'", "lora"]),
    "trainable_regex_matches_nothing": ([SMOKE, "--config.finetune.method=freeze",
                                         "--config.finetune.trainable=nothing/.*"], 1,
                                        ["config.finetune.trainable", "matches no parameter"]),
    "lora_rank_above_the_projection": ([SMOKE, "--config.finetune.method=lora",
                                        "--config.finetune.lora_rank=100"], 1,
                                       ["config.finetune.lora_rank=100", "[1, 64]"]),
    "gan_image_size_the_generator_cannot_make": ([GAN_SMOKE, "--config.data.image_size=30"], 1,
                                                 ["config.data.image_size", "multiple of 4"]),
    "moe_more_experts_per_token_than_experts": ([SMOKE, "--config.model.n_experts=4",
                                                 "--config.model.experts_per_token=5"], 1,
                                                ["config.model.experts_per_token=5",
                                                 "n_experts=4"]),
    "moe_expert_axis_does_not_divide_experts": ([SMOKE, "--config.model.n_experts=6",
                                                 "--config.mesh.expert=4", "--config.mesh.data=2",
                                                 "--config.mesh.rules=fsdp_ep"], 8,
                                                ["config.mesh.expert=4", "n_experts=6"]),
    "gan_on_a_text_source": ([GAN_SMOKE, "--config.data.source=stdlib"], 1,
                             ["config.data.source='stdlib'", "mnist_digits"]),
}


# A few bad commands run as their own process, the rest inside this one (tests/_cli.py): the
# one-line error and exit code 2 are the CLI's, and the process boundary adds nothing but imports.
IN_A_SUBPROCESS = ("wrong_type", "missing_experiment_file", "batch_not_divisible_by_data_parallel")


def run_train(workdir, flags, devices):
  env = dict(os.environ, XLA_FLAGS=_xla.xla_flags(devices),
             JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "llmjax.cli.main", "train", *flags,
                         f"--workdir={workdir}"],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def cli_results(tmp_path_factory):
  """Every bad command: IN_A_SUBPROCESS as processes (two at a time, beside the others), the
  rest in this process (on its 8 devices; each fails before it uses one)."""
  base = tmp_path_factory.mktemp("bad")
  with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
    futures = {name: pool.submit(run_train, base / name, *BAD_INPUTS[name][:2])
               for name in IN_A_SUBPROCESS}
    results = {name: _cli.run("train", *flags, f"--workdir={base / name}")
               for name, (flags, _, _) in BAD_INPUTS.items() if name not in IN_A_SUBPROCESS}
    results.update({name: f.result() for name, f in futures.items()})
  return {name: (base / name, results[name]) for name in BAD_INPUTS}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(cli_results, name):
  workdir, proc = cli_results[name]
  _, _, must_name = BAD_INPUTS[name]
  report = f"exit {proc.returncode}; stderr:\n{proc.stderr[-2000:]}"
  assert proc.returncode == 2, report
  assert "Traceback" not in proc.stderr, report
  lines = [line for line in proc.stderr.splitlines() if line.strip()]
  assert len(lines) == 1, report
  assert "\\n" not in lines[0] and "\\'" not in lines[0], report  # no escapes shown as text
  for needle in must_name:
    assert needle in lines[0], report
  assert not workdir.exists() or not any(workdir.iterdir()), sorted(os.listdir(workdir))


def test_error_lines_differ_per_cause(cli_results):
  """Guards against one generic message that would happen to contain every key."""
  lines = {proc.stderr.strip() for _, proc in cli_results.values()}
  assert len(lines) == len(BAD_INPUTS)


# --- the library boundary ---------------------------------------------------------------------


def base_dict():
  return config_lib.base_config().to_dict()


def test_base_config_resolves_and_round_trips_through_json():
  exp = config_lib.resolve(config_lib.base_config())
  assert config_lib.from_json(exp.to_json()) == exp


@pytest.mark.parametrize("mutate,names", [
    (lambda d: d.update(modle={}), ["config.modle"]),
    (lambda d: d["model"].update(norm="batchnorm"), ["config.model.norm", "batchnorm",
                                                     "layernorm", "rmsnorm"]),
    (lambda d: d["mesh"].update(rules="zero3"), ["config.mesh.rules", "zero3"]),
    (lambda d: d["train"].update(stepz=5), ["config.train.stepz", "steps"]),
    (lambda d: d["train"].update(steps="abc"), ["config.train.steps", "int"]),
    (lambda d: d["train"].update(steps=True), ["config.train.steps"]),
    (lambda d: d["optim"].update(lr="fast"), ["config.optim.lr", "float"]),
    (lambda d: d["train"].update(steps=0), ["config.train.steps", "positive"]),
    (lambda d: d["model"].update(n_heads=3), ["config.model.n_heads"]),
    (lambda d: d["model"].update(n_kv_heads=3), ["config.model.n_kv_heads"]),
    (lambda d: d["data"].update(seq_len=10_000), ["config.data.seq_len"]),
    (lambda d: d["optim"].update(accum_steps=5), ["config.optim.accum_steps"]),
    (lambda d: d["mesh"].update(data=-1, fsdp=-1), ["config.mesh"]),
    (lambda d: d["model"].update(norm="layernorm", norm_offset=1.0),
     ["config.model.norm_offset", "rmsnorm"]),
    (lambda d: d["model"].update(attn_softcap=50.0, attention_impl="cudnn"),
     ["config.model.attention_impl='cudnn'", "attn_softcap"]),
    (lambda d: d["model"].update(final_softcap=-1.0), ["config.model.final_softcap"]),
    (lambda d: d["model"].update(n_decoder_heads=3), ["config.model.n_decoder_heads"]),
])
def test_resolve_rejects_naming_the_key(mutate, names):
  d = base_dict()
  mutate(d)
  with pytest.raises(ConfigError) as err:
    config_lib.resolve(d)
  message = str(err.value)
  assert "\n" not in message
  for name in names:
    assert name in message


def test_ints_are_accepted_for_floats_but_stay_floats():
  d = base_dict()
  d["optim"]["lr"] = 1
  exp = config_lib.resolve(d)
  assert exp.optim.lr == 1.0 and isinstance(exp.optim.lr, float)


def test_model_section_and_presets_reject_unknown_names():
  with pytest.raises(ConfigError, match="n_layerz"):
    config_lib.model_section("gpt2", n_layerz=2)
  with pytest.raises(ConfigError, match="t5"):
    config_lib.model_section("t5")


def test_experiment_configs_are_locked():
  """Experiments override keys, never add them: a typo in an experiment file fails loudly."""
  c = config_lib.finalize(config_lib.base_config(), None)
  with pytest.raises(AttributeError):
    c.train.stepz = 5


EXPERIMENTS = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "experiments").glob("*/*.py")
                     if "def get_config" in p.read_text())  # methods.py is settings, not one

# What a smoke run is shortened to here: a step of the experiment's own smoke shapes.
SHORT = dict(steps=1, log_every=1, eval_every=100, checkpoint_every=100, eval_batches=1,
             sample_prompts=0, progress=False)


@pytest.mark.parametrize("path", EXPERIMENTS)
def test_every_experiment_file_resolves_as_is_and_as_smoke(path):
  module = config_lib.experiment_module(path, str(ROOT / "setup"))
  for variant in (None, "smoke"):
    exp = config_lib.resolve(module.get_config(variant))
    assert exp.name and exp.train.steps > 0


def _offline_data(c, tmp_path, monkeypatch):
  """The few experiments whose data a fresh machine lacks read what the data tests write:
  Fashion-MNIST-shaped IDX files, a folder of images, tfds's mock CIFAR-10; or what the command
  their docstring names first writes (the instruction and preference JSONL), built here from the
  gettext catalogs' shorter messages (60 characters: 6,500 training pairs, enough for a step, and
  the preference pairs' retrieval takes 2.4 CPU-s instead of 5.8 at 120)."""
  builders = {"runs/instruct_data/": "llmjax.data.instruct",
              "runs/preference_gettext/": "llmjax.data.preference_pairs"}
  built = [m for prefix, m in builders.items() if c.data.files.startswith(prefix)]
  if built:
    out = tmp_path / "built"
    importlib.import_module(built[0]).main([f"--out={out}", "--source=gettext",
                                            "--max_chars=60"])
    c.data.files, c.data.val_files = str(out / "train.jsonl"), str(out / "val.jsonl")
  elif c.data.source == "idx":
    from test_vision_data import _write_idx
    rng = np.random.default_rng(0)
    (tmp_path / "idx").mkdir()
    for prefix, n in (("train", 40), ("t10k", 10)):
      _write_idx(tmp_path / "idx" / f"{prefix}-images-idx3-ubyte",
                 rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), False)
      _write_idx(tmp_path / "idx" / f"{prefix}-labels-idx1-ubyte",
                 (np.arange(n) % 10).astype(np.uint8), False)
    c.data.idx_dir = str(tmp_path / "idx")
  elif c.data.source == "image_folder":
    from test_image_task import write_folder
    c.data.image_folder = write_folder(tmp_path / "images", per_class=8)
  elif c.data.source == "tfds":
    import tensorflow_datasets as tfds
    # mock_data leaves is_prepared alone, which the tfds source checks before reading.
    monkeypatch.setattr(tfds.core.DatasetBuilder, "is_prepared", lambda self: True)
    return tfds.testing.mock_data(num_examples=24, policy=tfds.testing.MockPolicy.USE_CODE)
  return contextlib.nullcontext()


@pytest.fixture
def quick_compiles():
  """XLA's cheapest compiles: these programs run once (the persistent cache keys them apart)."""
  before = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", before)


@pytest.mark.parametrize("path", EXPERIMENTS)
def test_every_smoke_trains_on_a_fresh_clone(path, tmp_path, monkeypatch, quick_compiles):
  """`FILE:smoke` needs no earlier run and no download: its data loads, its model initialises
  and a train step runs (in-process, one device). A distilled student's smoke first trains its
  teacher's smoke (shortened alike) in WORKDIR/teacher through the real loop, on the same one
  device: the teacher's init and step are then the programs its own file's smoke compiles (one
  compile for both), and a one-device program compiles in a fraction of an 8-device one's time."""
  c = config_lib.experiment_module(path, str(ROOT / "setup")).get_config("smoke")
  c.unlock()
  c.train.update(SHORT)
  original = teacher_run.teacher_experiment

  def shortened_teacher(e):
    t = original(e)
    return t and dataclasses.replace(t, train=dataclasses.replace(t.train, **SHORT))
  monkeypatch.setattr(teacher_run, "teacher_experiment", shortened_teacher)
  _suiteA_helpers.on_one_device(monkeypatch)
  with _offline_data(c, tmp_path, monkeypatch):
    exp, stopped = teacher_run.train_first(config_lib.resolve(c), str(tmp_path), loop.run)
    assert stopped is None
    s = setup.prepare(exp, None, jax.devices()[:1])
    state = loop.fresh_state(s)
    batch = next(loop._data_iterator(s, None))
  train_fn, _ = setup.compile_steps(s)
  with jax.set_mesh(s.mesh), nn.logical_axis_rules(s.rules):
    state, metrics = train_fn(state, sharding.global_batch(batch, s.mesh))
  assert int(state.step) == 1 and np.isfinite(float(metrics["loss"])), metrics
  if c.distill.teacher:
    assert exp.distill.teacher == f"workdir:{tmp_path / 'teacher'}"
    assert (tmp_path / "teacher" / "checkpoints").is_dir()
    # Run again (a resumed student): the finished teacher is read, not trained again.
    again, _ = teacher_run.train_first(config_lib.resolve(c), str(tmp_path),
                                       lambda *_: pytest.fail("the teacher was trained again"))
    assert again == exp


def test_an_experiment_teacher_that_is_no_file_is_named(tmp_path):
  c = config_lib.experiment_module("experiments/lm/stdlib_gpt.py", str(ROOT / "x")).get_config(
      "smoke")
  c.unlock()
  c.distill.teacher = "experiment:experiments/lm/nope.py:smoke"
  with pytest.raises(ConfigError, match="config.distill.teacher=.*no experiment file "
                                        "experiments/lm/nope.py"):
    teacher_run.train_first(config_lib.resolve(c), str(tmp_path), loop.run)
  assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("inside", [False, True])
def test_a_workdir_that_is_a_file_is_refused_before_anything_is_written(inside, tmp_path):
  file = tmp_path / "taken"
  file.write_text("mine\n")
  workdir = file / "run" if inside else file
  proc = run_train(workdir, [SMOKE], 1)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert proc.stderr.count("\n") == 1 and f"--workdir={workdir}" in proc.stderr, proc.stderr
  assert "is a file" in proc.stderr and "Traceback" not in proc.stderr
  assert file.read_text() == "mine\n" and sorted(os.listdir(tmp_path)) == ["taken"]


def test_main_reads_its_own_argv_and_parses_again_in_one_process():
  """train's main(argv) takes the overrides in argv (ml_collections alone reads sys.argv), and a
  second parse in the same process may repeat an override (absl alone refuses to define a flag
  twice), and parsing imports no jax. A subprocess: this process has jax already."""
  code = """if True:
    import sys
    from llmjax.cli import common, train
    sys.argv = ["pytest"]
    smoke = "--config=experiments/lm/stdlib_gpt.py:smoke"
    for steps in (3, 4):
      common.parse_flags(["llmjax train", smoke, f"--config.train.steps={steps}", "--workdir=x"],
                         train)
      print(train.FLAGS.config.train.steps, train.FLAGS.workdir)
    try:
      common.parse_flags(["llmjax train", smoke, "--config.train.steps=abc"], train)
    except SystemExit as e:
      print("exit", e.code)
    common.parse_flags(["llmjax train", smoke], train)
    print(train.FLAGS.config.train.steps, train.FLAGS.workdir, "jax" in sys.modules)
  """
  proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                        timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.split("\n")[:4] == ["3 x", "4 x", "exit 2", "20 None False"], proc.stdout
  assert proc.stderr.strip() == "error: config.train.steps must be an int, got 'abc'"


def test_a_config_json_with_every_tasks_options_still_loads():
  """Runs written before tasks owned their config sections recorded every task's options in
  config.task (a union): reading one back (resume, eval, export) keeps the named task's."""
  d = base_dict()
  d["task"] = {"name": "lm", "mask_prob": 0.15, "mask_token_ratio": 0.8,
               "random_token_ratio": 0.1, "num_classes": 0, "pooling": "auto",
               "label_smoothing": 0.1, "num_beams": 4, "length_penalty": 1.0,
               "early_stopping": False, "max_new_tokens": 0, "bleu_examples": 256}
  exp = config_lib.from_json(json.dumps(d))
  assert exp.task == config_lib.registered()["lm"](name="lm")
  with pytest.raises(ConfigError, match="config.task.label_smoothing=0.1 is an option of the "
                                        "classify, image_classify, seq2seq, dpo task"):
    config_lib.resolve(d)  # an experiment that sets another task's option is told so
  d["task"].update(name="classify", pooling="last")
  d["model"]["causal"] = True
  assert config_lib.from_json(json.dumps(d)).task.label_smoothing == 0.1
