"""Hugging Face tensor <-> llmjax parameter maps as data, and the engine that applies them.

An architecture lists `Tensor`s: one HF key, the llmjax parameter path(s) it becomes (in the
unscanned layout, `layer_{i}/...`), the HF shape, and the two transforms. GPT-2's fused c_attn is
the one HF tensor that becomes three parameters. A tensor may belong to another collection than
"params" (BatchNorm running statistics: "batch_stats"), or be written only (torch's
`num_batches_tracked`, which nothing in llmjax reads). Scanned models (`layers/...` with a leading
layer axis) are handled here, by stacking, so the tables never mention scan.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable

import jax
import numpy as np

from llmjax.errors import capped
from llmjax.hf.errors import WeightsMismatchError
from llmjax.treepaths import nest as unflatten  # noqa: F401 (part of this module's API)

_LAYER = re.compile(r"(^|/)layer_(\d+)/")


@dataclasses.dataclass(frozen=True)
class Tensor:
  """One HF tensor of `hf_shape` <-> llmjax variables of `collection` at `paths` (none: a tensor
  HF files carry that llmjax derives on save and never reads)."""
  hf_key: str
  paths: tuple[str, ...]
  hf_shape: tuple[int, ...]
  to_jax: Callable[[np.ndarray], tuple[np.ndarray, ...]]
  to_hf: Callable[..., np.ndarray]
  collection: str = "params"


def same(key: str, path: str, shape) -> Tensor:
  """Stored identically (embeddings, norms, biases, GPT-2's Conv1D [in, out] kernels)."""
  return Tensor(key, (path,), tuple(shape), lambda x: (x,), lambda x: x)


def linear(key: str, path: str, out: int, inp: int) -> Tensor:
  """torch Linear weight [out, in] <-> kernel [in, out]."""
  return Tensor(key, (path,), (out, inp), lambda w: (w.T,), lambda k: k.T)


def linear_to_heads(key: str, path: str, d: int, heads: int, h: int) -> Tensor:
  """torch Linear [heads*h, d] <-> kernel [d, heads, h] (q, k, v projections)."""
  return Tensor(key, (path,), (heads * h, d), lambda w: (w.T.reshape(d, heads, h),),
                lambda k: k.reshape(d, heads * h).T)


def linear_from_heads(key: str, path: str, heads: int, h: int, d: int) -> Tensor:
  """torch Linear [d, heads*h] <-> kernel [heads, h, d] (output projection)."""
  return Tensor(key, (path,), (d, heads * h), lambda w: (w.T.reshape(heads, h, d),),
                lambda k: k.reshape(heads * h, d).T)


def reshaped(key: str, path: str, hf_shape, jax_shape) -> Tensor:
  """Same values, different shape (per-head biases [heads*h] <-> [heads, h], Conv1D heads)."""
  return Tensor(key, (path,), tuple(hf_shape), lambda x: (x.reshape(jax_shape),),
                lambda x: x.reshape(hf_shape))


def fused(key: str, paths: tuple[str, ...], hf_shape, part_shape) -> Tensor:
  """Equal chunks of the last HF axis <-> one parameter each (GPT-2 c_attn -> q, k, v)."""
  def to_jax(x):
    return tuple(part.reshape(part_shape) for part in np.split(x, len(paths), axis=-1))

  def to_hf(*parts):
    return np.concatenate([p.reshape(hf_shape[:-1] + (-1,)) for p in parts], axis=-1)
  return Tensor(key, tuple(paths), tuple(hf_shape), to_jax, to_hf)


def conv2d(key: str, path: str, out: int, inp: int, kh: int, kw: int) -> Tensor:
  """torch Conv2d weight [out, in, kh, kw] (OIHW) <-> flax kernel [kh, kw, in, out] (HWIO)."""
  return Tensor(key, (path,), (out, inp, kh, kw), lambda w: (w.transpose(2, 3, 1, 0),),
                lambda k: k.transpose(3, 2, 0, 1))


def batchnorm(prefix: str, path: str, c: int) -> list[Tensor]:
  """torch BatchNorm2d <-> params scale/bias and batch_stats mean/var. num_batches_tracked is
  written as 0: torch reads it only when momentum=None (a cumulative average), and llmjax does
  not count batches."""
  def stat(name: str, ours: str) -> Tensor:
    return dataclasses.replace(same(f"{prefix}.{name}", f"{path}/{ours}", (c,)),
                               collection="batch_stats")
  return [same(f"{prefix}.weight", f"{path}/scale", (c,)),
          same(f"{prefix}.bias", f"{path}/bias", (c,)), stat("running_mean", "mean"),
          stat("running_var", "var"),
          Tensor(f"{prefix}.num_batches_tracked", (), (), lambda x: (),
                 lambda: np.zeros((), np.int64))]


def mlp(wi_key: str, wo_key: str, path: str, d: int, f: int) -> list[Tensor]:
  """A biased two-layer MLP of torch Linears (wi: d -> f, wo: f -> d) <-> path/wi, path/wo."""
  return [linear(f"{wi_key}.weight", f"{path}/wi/kernel", f, d),
          same(f"{wi_key}.bias", f"{path}/wi/bias", (f,)),
          linear(f"{wo_key}.weight", f"{path}/wo/kernel", d, f),
          same(f"{wo_key}.bias", f"{path}/wo/bias", (d,))]


def layernorm(prefix: str, path: str, d: int, bias: bool = True) -> list[Tensor]:
  out = [same(f"{prefix}.weight", f"{path}/scale", (d,))]
  return out + [same(f"{prefix}.bias", f"{path}/bias", (d,))] if bias else out


# --- the engine -------------------------------------------------------------------------------


def flatten(tree) -> dict[str, object]:
  """{'a/b/c': leaf} for a nested dict of arrays or ShapeDtypeStructs."""
  return {"/".join(str(k.key) for k in path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def tree_problems(want: dict[str, tuple], have: dict[str, tuple], have_name: str) -> list[str]:
  """Every path missing from, extra in, or shaped differently in `have`, with the shapes."""
  return ([f"{p} {list(want[p])} is not in {have_name}" for p in sorted(set(want) - set(have))]
          + [f"{p} {list(have[p])} is only in {have_name}" for p in sorted(set(have) - set(want))]
          + [f"{p}: expected {list(want[p])}, {have_name} has {list(have[p])}"
             for p in sorted(set(want) & set(have)) if tuple(want[p]) != tuple(have[p])])


def target(path: str, scanned: bool) -> tuple[str, int | None]:
  """Unscanned path -> (path in the model's layout, layer index to stack at or None)."""
  match = _LAYER.search(path)
  if not scanned or not match:
    return path, None
  return path[:match.start()] + match.group(1) + "layers/" + path[match.end():], int(match[2])


def of_collection(tensors: list[Tensor], collection: str) -> list[Tensor]:
  """The tensors that become variables of `collection` (write-only ones become none)."""
  return [t for t in tensors if t.collection == collection and t.paths]


def check_model_paths(tensors: list[Tensor], abstract_flat: dict, scanned: bool) -> None:
  """The table and the model must name the same variables (a bug here is llmjax's, not yours);
  `tensors` and `abstract_flat` of one collection."""
  produced = {target(p, scanned)[0] for t in tensors for p in t.paths}
  if produced != set(abstract_flat):
    only_map, only_model = produced - set(abstract_flat), set(abstract_flat) - produced
    raise AssertionError(f"hf map and model disagree: only in map {sorted(only_map)}, only in "
                         f"model {sorted(only_model)}")


def resolve_keys(tensors: list[Tensor], available: dict[str, tuple], aliases: Callable,
                 ignored: tuple[str, ...], where: str) -> dict[str, str]:
  """{our key: key in the file}; raises naming every missing, mis-shaped and unexpected tensor."""
  found, used, problems = {}, set(), []
  for t in tensors:
    key = next((k for k in aliases(t.hf_key) if k in available), None)
    if not t.paths:  # written, never read: old files may lack it
      used.update([key] if key else [])
      continue
    if key is None:
      problems.append(f"missing {t.hf_key} (expected shape {list(t.hf_shape)})")
      continue
    used.add(key)
    if tuple(available[key]) != t.hf_shape:
      problems.append(f"{key} has shape {list(available[key])}, expected {list(t.hf_shape)}")
    else:
      found[t.hf_key] = key
  for key in sorted(set(available) - used):
    if not any(re.search(p, key) for p in ignored):
      problems.append(f"unexpected {key} (shape {list(available[key])})")
  if problems:
    raise WeightsMismatchError(f"{where}: the weights do not match the config: "
                               + capped(problems, sep="; "))
  return found


def place(tensors: list[Tensor], read: Callable[[str], np.ndarray], abstract_flat: dict,
          scanned: bool, put: Callable[[str, np.ndarray], object]) -> dict:
  """Each parameter read, transformed, cast and put on its devices, one at a time."""
  producers: dict[str, list[tuple[Tensor, int, int | None]]] = {}
  for t in tensors:
    for i, path in enumerate(t.paths):
      dest, layer = target(path, scanned)
      producers.setdefault(dest, []).append((t, i, layer))
  last: list = [None, None]  # the last HF tensor's outputs: q, k, v of one c_attn read once

  def part(t: Tensor, i: int) -> np.ndarray:
    if last[0] != t.hf_key:
      last[:] = [t.hf_key, t.to_jax(read(t.hf_key))]
    return last[1][i]

  out = {}
  for dest, sources in producers.items():
    want = abstract_flat[dest]
    if scanned and sources[0][2] is not None:
      sources = sorted(sources, key=lambda s: s[2])
      value = np.stack([part(t, i) for t, i, _ in sources])
    else:
      value = part(*sources[0][:2])
    if tuple(value.shape) != tuple(want.shape):
      raise AssertionError(f"{dest}: mapped to {value.shape}, model has {want.shape}")
    out[dest] = put(dest, np.asarray(value).astype(want.dtype))
  return unflatten(out)


def collect(tensors: list[Tensor], params_flat: dict, scanned: bool,
            state_flat: dict[str, dict] | None = None) -> dict[str, np.ndarray]:
  """{HF key: numpy array} from llmjax params and, for tensors of other collections,
  `state_flat` ({collection: flat}); fetched from devices one variable at a time."""
  flats = {**(state_flat or {}), "params": params_flat}
  out = {}
  for t in tensors:
    parts = []
    for path in t.paths:
      dest, layer = target(path, scanned)
      flat = flats[t.collection]
      leaf = flat[dest] if layer is None else flat[dest][layer]
      parts.append(np.asarray(jax.device_get(leaf)))
    value = t.to_hf(*parts)
    out[t.hf_key] = np.ascontiguousarray(value).reshape(np.shape(value))  # keeps 0-d as 0-d
  return out
