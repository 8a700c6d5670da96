"""The XLA flags of the suite, for conftest and for the processes tests start with their own
device count.

XLA:CPU's newer fusion emitters (an MLIR pipeline per fusion) and its concurrency-minded scheduler
make each compile of the suite's tiny programs two to three times slower than the classic LLVM
emitters and scheduler (a tiny LM train step on 8 devices: 3.4 s -> 1.1 s to compile), and
compiling is most of the suite's time. The tests and every process they start use the classic
ones; users keep XLA's defaults. Results are compared within the session (or with other
libraries within a tolerance), so every process of a session compiling the same way is what
matters.

XLA:CPU also splits each program's LLVM module into parts to compile them on several threads; on
the suite's two cores, already busy with two pytest workers, the split and the clones it makes
only add work: one part compiles the suite's train steps with a quarter less CPU (a tiny LM, a
classifier and a seq2seq step compiled in one process: 8.2 -> 6.2 CPU-s), and tests/test_model.py
with tests/test_sharding.py, cold cache, take 10% less (28.4 -> 25.5 CPU-s; two rounds, taking
turns; 2026-12-07).

Two more trims of each compile's work. XLA:CPU rewrites every long reduction into a windowed
partial reduction followed by a final one (tree_reduction_rewriter, for accuracy over millions
of elements): in a train step that is the sum of squares and the non-finite check of every
parameter, each then two kernels to generate instead of one, for the suite's small tensors.
And XLA verifies the code it emits before compiling it (xla_cpu_emitter_verification_level), a
check on XLA itself, not on the program. Without the rewriter a step compiles in 6-16% less
time (a tiny LM 0.517 -> 0.434 s, a BERT classifier 0.807 -> 0.756 s; medians of twelve and ten
compiles, taking turns in one process); with both off, the whole suite's compiles took 308 CPU-s
instead of 357 (train steps 120 instead of 157; two instrumented runs of `pytest -n 2 tests`, one
after the other, 2026-12-08). Sums without the rewriter round differently in their last bits;
every process of the suite compiles alike, and all 885 tests pass.
"""

COMPILE_FLAGS = ("--xla_cpu_use_fusion_emitters=false",
                 "--xla_cpu_enable_concurrency_optimized_scheduler=false",
                 "--xla_cpu_parallel_codegen_split_count=1",
                 "--xla_disable_hlo_passes=tree_reduction_rewriter",
                 "--xla_cpu_emitter_verification_level=0")


def xla_flags(devices: int = 1) -> str:
  """XLA_FLAGS for a process of the suite with `devices` simulated CPU devices."""
  count = (f"--xla_force_host_platform_device_count={devices}",) if devices > 1 else ()
  return " ".join(count + COMPILE_FLAGS)
