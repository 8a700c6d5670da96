"""Shared by tests whose runs need no more than one device: the loop's mesh on the first device.

A program compiled for one device costs a fraction of the same program partitioned over the
suite's 8 simulated devices, and tests that train the same experiment on one device share its
programs (the persistent compilation cache). Tests whose point is the devices (8 == 1, FSDP)
keep all 8.
"""

import jax

from llmjax.train import setup


def on_one_device(monkeypatch) -> None:
  """Until the test ends, every `setup.prepare` that names no devices (the loop's, a teacher's
  run, export's) builds its mesh on jax.devices()[:1]."""
  prepare = setup.prepare

  def one_device(exp, workdir=None, devices=None):
    """setup.prepare on the first device unless told otherwise."""
    return prepare(exp, workdir, devices or jax.devices()[:1])
  monkeypatch.setattr(setup, "prepare", one_device)
