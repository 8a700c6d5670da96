"""Exact resume, preemption and non-finite steps, on the real CLI.

One chain of runs shares a workdir: each run is interrupted at a seeded random moment (SIGKILL
mostly, one SIGTERM, one SIGINT) and the same command is run again, until a last run finishes.
Every step is logged and checkpointed, so most moments fall inside an asynchronous save. The
chain is compared with one uninterrupted run of the same command.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import random
import re
import shutil
import signal
import time
import types

import numpy as np
import pytest

import _ckpt_helpers as h

SEED = 4
KILLS = 10
# Two chains run side by side (each process is mostly single-threaded start-up work); each plan
# lists a chain's interruptions in order. A chain that finishes early is continued by a new one.
K = signal.SIGKILL
PLANS = ([K, K, signal.SIGTERM, K, K, K], [K, K, K, signal.SIGINT, K, K])


@dataclasses.dataclass
class Interruption:
  signal: int
  returncode: int
  stdout: str
  stderr: str
  records: list  # metrics.jsonl right after the process ended
  checkpoints: str  # a copy of checkpoints/ right after the process ended
  leftovers: list  # uncommitted entries in checkpoints/ (a save cut short)


@dataclasses.dataclass
class Chain:
  workdir: str
  interruptions: list
  final: tuple = None  # (returncode, stdout, stderr) of the run that finished


def _run_chain(workdir: str, plan: list, rng: random.Random, logs: str) -> Chain:
  """Interrupt launches of the same command by `plan` (consumed) until it is empty or a run ends."""
  chain = Chain(workdir, [])
  ckpt_dir = os.path.join(workdir, "checkpoints")
  while plan:
    launched = sum(1 for n in os.listdir(logs) if n.endswith(".out"))
    committed = h.committed_steps(ckpt_dir)
    metrics = os.path.join(workdir, "metrics.jsonl")
    inode = os.stat(metrics).st_ino if os.path.exists(metrics) else None
    proc = h.launch(h.train_cmd(workdir), os.path.join(logs, f"{launched:02d}"))
    n = rng.choice([3, 4])
    seen = h.wait_for_file_records(workdir, n, proc, committed[-1] if committed else 0, inode)
    if seen is None:  # it finished (or failed) before the moment came
      proc.wait()
      chain.final = (proc.returncode, *h.output(proc))
      return chain
    first, last = seen
    step_time = (last - first) / (n - 1)
    time.sleep(rng.uniform(0.0, 1.5) * step_time)
    sig = plan.pop(0)
    proc.send_signal(sig)
    proc.wait(timeout=120)
    copy = os.path.join(logs, f"{launched:02d}-checkpoints")
    shutil.copytree(ckpt_dir, copy)
    chain.interruptions.append(Interruption(
        sig, proc.returncode, *h.output(proc), h.read_records(workdir), copy,
        h.leftovers(ckpt_dir)))
  rc, out, err = h.run(h.train_cmd(workdir), os.path.join(logs, "final"))
  chain.final = (rc, out, err)
  return chain


def _run_plan(base, plan: list, seed: int) -> list[Chain]:
  rng, plan, chains_ = random.Random(seed), list(plan), []
  while plan:
    assert len(chains_) < 3, "runs keep finishing before their interruption"
    root = base / f"chain{len(chains_)}"
    os.makedirs(root / "logs")
    chains_.append(_run_chain(str(root / "workdir"), plan, rng, str(root / "logs")))
  return chains_


@pytest.fixture(scope="module")
def chains(tmp_path_factory):
  reference = h.reference_run()  # also fills the jit cache the chains start from
  with concurrent.futures.ThreadPoolExecutor(len(PLANS)) as pool:
    futures = [pool.submit(_run_plan, tmp_path_factory.mktemp(f"plan{i}"), plan, SEED + i)
               for i, plan in enumerate(PLANS)]
    return reference, [c for f in futures for c in f.result()]


def _all(chains_, sig):
  return [(c, i) for c in chains_ for i in c.interruptions if i.signal == sig]


def _final_train(chain):
  return h.train_records(h.read_records(chain.workdir))


def test_sigkill_at_random_moments_resumes_exactly(chains):
  reference, chains_ = chains
  ref = h.train_records(h.read_records(reference))
  assert sorted(ref) == list(range(1, h.STEPS + 1))
  kills = _all(chains_, signal.SIGKILL)
  mid_save = sum(1 for _, k in kills if k.leftovers)
  reached = [max(h.train_records(k.records)) for _, k in kills]
  print(f"\nSIGKILL trials: {len(kills)} ({mid_save} cut a checkpoint save short) in "
        f"{len(chains_)} chain(s); steps reached when killed: {reached}")
  assert len(kills) >= KILLS
  assert mid_save >= 1  # some kill landed inside an asynchronous save (left its temporary dir)
  setup = h.model_setup(reference)
  for n, (_, kill) in enumerate(kills):
    assert kill.returncode == -signal.SIGKILL, (n, kill.returncode, kill.stderr[-2000:])
    # (a) the newest committed checkpoint restores and verifies against its checksums, and its
    # iterator state has handed out exactly the rows of the steps it holds.
    steps = h.committed_steps(kill.checkpoints)
    assert steps, f"kill {n}: nothing committed after 3+ logged steps"
    state, data_state, _ = h.restore(kill.checkpoints, steps[-1], setup)
    assert int(state.step) == steps[-1]
    assert h.batches_consumed(data_state) == steps[-1]
    # Every loss logged before the kill equals the uninterrupted run's, and none is ahead of
    # or missing from one history.
    logged = h.train_records(kill.records)
    assert sorted(logged) == list(range(1, max(logged) + 1))
    assert max(logged) >= steps[-1]
    for step, record in logged.items():
      assert h.deterministic(record) == h.deterministic(ref[step]), (n, step)

  # (b) the chain run to completion has the reference's losses, exactly, and its checkpoints.
  ref_setup_steps = h.committed_steps(os.path.join(reference, "checkpoints"))
  for chain in chains_:
    rc, out, err = chain.final
    assert rc == 0, err[-3000:]
    assert f"at step {h.STEPS}" in out
    final = _final_train(chain)
    assert sorted(final) == sorted(ref)
    for step in ref:
      assert h.deterministic(final[step]) == h.deterministic(ref[step]), step
    val = lambda w: [r for r in h.read_records(w) if r["split"] == "val"]
    assert [r["loss"] for r in val(chain.workdir)] == [r["loss"] for r in val(reference)]
    ckpt_dir = os.path.join(chain.workdir, "checkpoints")
    assert h.leftovers(ckpt_dir) == []  # partial saves of killed runs were cleaned up
    assert h.committed_steps(ckpt_dir) == ref_setup_steps
    for step in ref_setup_steps:
      mine = h.restore(ckpt_dir, step, setup)
      theirs = h.restore(os.path.join(reference, "checkpoints"), step, setup)
      h.assert_trees_equal(mine[0], theirs[0], f"state of step {step}")
      assert mine[1] == theirs[1]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_preemption_signal_saves_the_step_and_resumes_after_it(chains, sig):
  reference, chains_ = chains
  found = _all(chains_, sig)
  assert len(found) == 1, "the chain never delivered this signal"
  chain, stop = found[0]
  assert stop.returncode == 0, stop.stderr[-3000:]
  match = re.search(r"preempted: checkpoint saved at step (\d+)", stop.stdout)
  assert match, stop.stdout
  step = int(match.group(1))
  assert step in h.committed_steps(stop.checkpoints)
  assert stop.leftovers == []  # the save finished before the exit
  state, data_state, _ = h.restore(stop.checkpoints, step, h.model_setup(reference))
  assert int(state.step) == step
  assert h.batches_consumed(data_state) == step
  before = h.train_records(stop.records)
  assert max(before) == step  # it finished the step it was in, and no more

  # The next run of the same command starts at step + 1: the history up to `step` is kept as
  # written (timings included, so it was not rewritten) and step + 1 follows.
  index = chain.interruptions.index(stop)
  later = (chain.interruptions[index + 1].records if index + 1 < len(chain.interruptions)
           else h.read_records(chain.workdir))
  after = h.train_records(later)
  assert {s: r for s, r in after.items() if s <= step} == before
  assert step + 1 in after
  next_stderr = (chain.interruptions[index + 1].stderr if index + 1 < len(chain.interruptions)
                 else chain.final[2])
  assert f"at step {step} of {h.STEPS}" in next_stderr, next_stderr[-2000:]  # it says so
  assert max(_final_train(chain)) == h.STEPS


# ---- non-finite steps ----

NONFINITE = ("--config.train.steps=10", "--config.train.keep_checkpoints=100")


def _nonfinite_run(tmp_path, poison: str, *overrides):
  workdir = str(tmp_path / "run")
  rc, out, err = h.run(h.train_cmd(workdir, *NONFINITE, *overrides), str(tmp_path / "log"),
                       LLMJAX_TEST_POISON_STEPS=poison)
  return workdir, rc, out, err


def _finite(tree) -> bool:
  return all(np.isfinite(x).all() for x in h.flat(tree).values()
             if np.issubdtype(x.dtype, np.floating))


def _split(tree):
  """(params + inner optimizer state, apply_if_finite counters) of a state's flat dict."""
  f = h.flat(tree)
  moving = {k: v for k, v in f.items() if k.startswith(("params/", "opt_state/inner_state/"))}
  return moving, f


def test_nonfinite_step_is_skipped_counted_and_training_goes_on(tmp_path):
  # Step 3's batch has a NaN example weight: its loss and gradients are NaN.
  workdir, rc, out, err = _nonfinite_run(tmp_path, "3", "--config.train.log_every=2")
  assert rc == 0, err[-3000:]
  assert "at step 10" in out
  records = h.read_records(workdir)
  train = h.train_records(records)
  assert sorted(train) == [2, 4, 6, 8, 10]
  assert [train[s]["nonfinite_steps"] for s in sorted(train)] == [0, 1, 0, 0, 0]
  # The logged loss of the interval holding the NaN step is the finite steps' mean, not NaN.
  assert all(isinstance(r["loss"], float) and np.isfinite(r["loss"]) for r in records)

  setup = h.model_setup(workdir)
  ckpt_dir = os.path.join(workdir, "checkpoints")
  states = {s: h.restore(ckpt_dir, s, setup)[0] for s in (2, 3, 4, 10)}
  assert all(_finite(s) for s in states.values())
  # The NaN step changed neither params nor optimizer moments; the next one did.
  (moving2, all2), (moving3, all3), (moving4, _) = (_split(states[s]) for s in (2, 3, 4))
  h.assert_trees_equal(moving2, moving3, "params/optimizer state across the non-finite step")
  assert any(moving3[k].tobytes() != moving4[k].tobytes() for k in moving3)
  assert int(all3["opt_state/total_notfinite"]) == int(all2["opt_state/total_notfinite"]) + 1
  assert int(h.flat(states[10])["opt_state/total_notfinite"]) == 1


def test_too_many_consecutive_nonfinite_steps_stop_the_run(tmp_path):
  # From step 3 on every batch is poisoned; the limit is 2, so the 3rd in a row (step 5) stops it.
  workdir, rc, out, err = _nonfinite_run(tmp_path, "3,4,5,6,7,8,9,10",
                                         "--config.train.max_nonfinite=2")
  assert rc == 1, (rc, err[-3000:])
  message = [line for line in err.splitlines() if line.startswith("error:")]
  assert len(message) == 1, err[-3000:]
  assert "step 5" in message[0] and "max_nonfinite=2" in message[0]
  assert "Traceback" not in err
  good = re.search(r"last good checkpoint: step (\d+)", message[0])
  assert good, message[0]
  named = int(good.group(1))
  ckpt_dir = os.path.join(workdir, "checkpoints")
  assert named in h.committed_steps(ckpt_dir), (named, os.listdir(ckpt_dir))
  train = h.train_records(h.read_records(workdir))
  assert [train[s]["nonfinite_steps"] for s in sorted(train)] == [0, 0, 1, 1]
  # The named checkpoint restores, finite, with the params of the last finite step (2).
  setup = h.model_setup(workdir)
  kept = h.restore(ckpt_dir, named, setup)[0]
  assert _finite(kept)
  h.assert_trees_equal(_split(kept)[0], _split(h.restore(ckpt_dir, 2, setup)[0])[0],
                       "state of the named checkpoint vs. step 2")


# ---- the data iterator ----

def _rows(n_rows: int, seq_len: int = 4) -> dict:
  tokens = np.arange(n_rows * seq_len, dtype=np.int32).reshape(n_rows, seq_len)
  return {"tokens": tokens, "segment_ids": np.ones_like(tokens)}


def test_data_iterator_restored_at_recorded_states_continues_identically(tmp_path):
  from llmjax.train import loop

  import jax

  from llmjax.config import MeshConfig
  from llmjax.parallel import mesh as meshlib

  data = types.SimpleNamespace(train=_rows(23), augment=None)
  setup = types.SimpleNamespace(
      data=data, mesh=meshlib.make_mesh(MeshConfig(data=1), jax.devices()[:1]),
      exp=types.SimpleNamespace(train=types.SimpleNamespace(batch_size=4),
                                data=types.SimpleNamespace(seed=7)))
  iterator = loop._data_iterator(setup, None)
  states, batches = [], []
  for _ in range(40):  # 5 batches per epoch: several epoch boundaries
    states.append(loop._data_state(iterator))
    batches.append(next(iterator)["tokens"])
  assert len({b.tobytes() for b in batches[:5]}) == 5  # shuffled rows, no repeats in an epoch
  assert any(not np.array_equal(batches[i], batches[i + 5]) for i in range(5))  # reshuffled
  rng = random.Random(SEED)
  for index in sorted({0, 1, 4, 5, 6, 10, 29} | set(rng.sample(range(30), 4))):
    resumed = loop._data_iterator(setup, json.loads(json.dumps(states[index])))  # saved as JSON
    rest = [next(resumed)["tokens"] for _ in range(40 - index)]
    for k, batch in enumerate(rest):
      np.testing.assert_array_equal(batch, batches[index + k], err_msg=f"from {index}, +{k}")


def test_data_iterator_state_round_trips_through_a_checkpoint(tmp_path):
  import jax
  import jax.numpy as jnp

  from llmjax import checkpoint
  from llmjax.data import text
  from llmjax.train import loop

  iterator = text.batch_iterator(_rows(23), 4, seed=3, shuffle=True, num_epochs=None)
  for _ in range(7):
    next(iterator)
  state = {"w": jnp.arange(4.0)}
  ckpt = checkpoint.Checkpointer(str(tmp_path / "checkpoints"), keep=2)
  ckpt.save(7, state, loop._data_state(iterator), {"name": "t"})
  ckpt.wait()
  expected = [next(iterator)["tokens"] for _ in range(12)]
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  _, data_state, config = ckpt.restore(7, jax.eval_shape(lambda: state), {"w": sharding})
  ckpt.close()
  assert config == {"name": "t"}
  resumed = text.batch_iterator(_rows(23), 4, seed=3, shuffle=True, num_epochs=None)
  resumed.set_state(text.iterator_state(data_state["grain"], 4))
  for want in expected:
    np.testing.assert_array_equal(next(resumed)["tokens"], want)


# ---- running the same command again, in-process ----


def test_a_run_run_again_says_where_it_resumes_and_writes_no_record_twice(tmp_path, capfd):
  """Finished: "already finished", the final evaluation is not appended again. Extended: it
  resumes at the step it had reached. No (step, split) record is ever written twice."""
  import llmjax.train
  from _task_helpers import experiment
  exp = experiment("lm", tmp_path, train=dict(steps=4, log_every=1, eval_every=2,
                                              checkpoint_every=2, sample_prompts=0))
  workdir = str(tmp_path / "run")
  first = llmjax.train.run(exp, workdir)
  assert "resum" not in capfd.readouterr().err
  written = h.read_records(workdir)
  pairs = [(r["step"], r["split"]) for r in written]
  assert len(pairs) == len(set(pairs)) and (4, "val") in pairs

  again = llmjax.train.run(exp, workdir)
  err = capfd.readouterr().err
  assert f"{workdir} already finished at step 4 of 4" in err, err
  assert h.read_records(workdir) == written  # nothing appended, nothing rewritten
  assert again["loss"] == first["loss"] and again["step"] == 4

  longer = dataclasses.replace(exp, train=dataclasses.replace(exp.train, steps=6))
  llmjax.train.run(longer, workdir)
  assert f"resuming {workdir} at step 4 of 6" in capfd.readouterr().err
  pairs = [(r["step"], r["split"]) for r in h.read_records(workdir)]
  assert len(pairs) == len(set(pairs)), pairs
  assert pairs[:len(written)] == [(r["step"], r["split"]) for r in written]
  assert {(5, "train"), (6, "train"), (6, "val")} <= set(pairs)
