"""config.finetune -> what the model adds (`Peft`) and which parameters train.

The trainable set is decided by ordered rules over `a/b/c` parameter paths, full match, first
match wins: `frozen` (never trained), the method's own parameters, the fresh heads of
`train.init_new` (a new head left at its random init is never what anyone asked for), the
`trainable` regex, the named presets; everything else trains only under `method="full"`.
Every regex and preset must match something, and something must train.
"""

from __future__ import annotations

import dataclasses
import re

from llmjax.config import Experiment, FinetuneConfig, ModelConfig
from llmjax.errors import ConfigError, capped
from llmjax.models.peft import Peft

# lora_targets presets: regexes over DenseGeneral module paths ("layer_3/attn/q").
LORA_TARGETS = {
    "qv": r"(.*/)?attn/(q|v)",
    "attention": r"(.*/)?attn/(q|k|v|o)",
    "mlp": r"(.*/)?mlp/(wi|wg|wo)",
    "all_linear": r"(.*/)?(attn/(q|k|v|o)|mlp/(shared/)?(wi|wg|wo))",
    # Mixtures of experts (models/moe.py): each expert's projections (stacked: one LoRA per
    # expert), the shared experts', the router's. No other preset reaches the router.
    "experts": r"(.*/)?mlp/experts/(wi|wg|wo)",
    "shared_experts": r"(.*/)?mlp/shared/(wi|wg|wo)",
    "router": r"(.*/)?mlp/router",
    "all_linear_experts": r"(.*/)?(attn/(q|k|v|o)|mlp/((shared|experts)/)?(wi|wg|wo))",
}

# The parameters each method adds (and trains).
METHOD_PARAMS = {
    "full": r".*",
    "freeze": None,
    "bitfit": r"(.*/)?bias",
    "lora": r".*/lora/.*",
    "adalora": r".*/lora/.*",
    "adapter": r".*/adapter_(attn|mlp)/.*",
    "prompt": r"(.*/)?prompt",
    "prefix": r".*/prefix/(k|v)",
}

_HEAD = r"(classifier|pooler|lm_head|transform|transform_norm|decoder|bias)(/.*)?"
_BLOCK = r"(.*/)?(layer_\d+|layers)/"
PRESETS = {
    "head": _HEAD,
    "ffn": _BLOCK + r"mlp/.*",
    "attention": _BLOCK + r"attn/.*",
    "norms": r"(.*/)?[a-z_]*norm[0-9]*/.*",
    "embeddings": r"(.*/)?(embed|pos_embed|type_embed)/.*",
    # Mixtures of experts: the router alone, the shared experts (and their gate), the experts.
    "router": _BLOCK + r"mlp/router/.*",
    "shared_experts": _BLOCK + r"mlp/(shared|shared_gate)/.*",
    "experts": _BLOCK + r"mlp/experts/.*",
    "bitfit": r"(.*/)?bias",
}


def lora_target_regex(targets: str) -> str:
  return LORA_TARGETS.get(targets, targets)


def peft_for(exp: Experiment) -> Peft:
  """The extra parameters the model is built with (none for full, freeze and bitfit)."""
  f = exp.finetune
  if f.method in ("lora", "adalora"):
    _compile("lora_targets", lora_target_regex(f.lora_targets))
    return Peft(lora_targets=lora_target_regex(f.lora_targets), lora_rank=f.lora_rank,
                lora_alpha=f.lora_alpha, rslora=f.rslora and f.method == "lora",
                lora_dropout=f.lora_dropout, adalora=f.method == "adalora")
  if f.method == "adapter":
    layers = tuple(int(s) for s in f.adapter_layers.split(",") if s.strip())
    _check_adapter_layers(layers, exp.model)
    return Peft(adapter_dim=f.adapter_dim, adapter_placement=f.adapter_placement,
                adapter_layers=layers)
  if f.method in ("prompt", "prefix"):
    # The prompt takes positions; a prefix takes none, but both lengthen every attention row
    # beyond the context the model was built for.
    length = f.prompt_length if f.method == "prompt" else f.prefix_length
    left = exp.model.max_len - exp.data.seq_len
    if length > left:
      raise ConfigError(f"config.finetune.{f.method}_length={length} is longer than the "
                        f"positions left: config.model.max_len={exp.model.max_len} - "
                        f"config.data.seq_len={exp.data.seq_len} = {left}")
    return Peft(**{f"{f.method}_length": length})
  return Peft()


def _check_adapter_layers(layers: tuple[int, ...], cfg: ModelConfig) -> None:
  if not layers:
    return
  if cfg.scan_layers:
    raise ConfigError("config.finetune.adapter_layers selects blocks, which needs "
                      "config.model.scan_layers=False (a scanned stack has one block body)")
  bad = [i for i in layers if i >= cfg.n_layers]
  if bad:
    raise ConfigError(f"config.finetune.adapter_layers={','.join(map(str, layers))}: block "
                      f"{bad[0]} does not exist (config.model.n_layers={cfg.n_layers})")


def _compile(key: str, pattern: str) -> re.Pattern:
  try:
    return re.compile(pattern)
  except re.error as e:
    raise ConfigError(f"config.finetune.{key}={pattern!r} is not a regex: {e}") from e


def _preset_regex(name: str, cfg: ModelConfig) -> str:
  kind, _, arg = name.partition("=")
  if kind == "top_k_layers":
    if not arg.isdigit() or not 0 < int(arg) <= cfg.n_layers:
      raise ConfigError(f"config.finetune.presets: top_k_layers={arg} must be in "
                        f"[1, {cfg.n_layers}] (config.model.n_layers)")
    if cfg.scan_layers:
      raise ConfigError("config.finetune.presets: top_k_layers needs config.model.scan_layers="
                        "False (scanned layers are one stacked array per parameter)")
    top = "|".join(str(i) for i in range(cfg.n_layers - int(arg), cfg.n_layers))
    return rf"(.*/)?layer_({top})/.*"
  if kind not in PRESETS or arg:
    raise ConfigError(f"config.finetune.presets: unknown preset {name!r}; allowed: "
                      f"{', '.join(PRESETS)}, top_k_layers=K")
  return PRESETS[kind]


@dataclasses.dataclass(frozen=True)
class Rule:
  source: str  # the config key it came from, for messages
  pattern: re.Pattern
  trains: bool


def rules(f: FinetuneConfig, cfg: ModelConfig, init_new: str) -> list[Rule]:
  out = []
  if f.frozen:
    out.append(Rule("config.finetune.frozen", _compile("frozen", f.frozen), False))
  if METHOD_PARAMS[f.method]:
    out.append(Rule(f"config.finetune.method={f.method!r}", re.compile(METHOD_PARAMS[f.method]),
                    True))
  if init_new:
    out.append(Rule("config.train.init_new", re.compile(init_new), True))
  if f.trainable:
    out.append(Rule("config.finetune.trainable", _compile("trainable", f.trainable), True))
  for name in filter(None, (s.strip() for s in f.presets.split(","))):
    out.append(Rule(f"config.finetune.presets={name}", re.compile(_preset_regex(name, cfg)),
                    True))
  return out


def trainable_paths(exp: Experiment, paths) -> frozenset[str]:
  """The parameter paths that train; ConfigError for a rule that matches nothing, or when
  nothing would train."""
  paths = sorted(paths)
  check_lora_targets(exp, paths)
  all_rules = rules(exp.finetune, exp.model, exp.train.init_new)
  for rule in all_rules:
    if not any(rule.pattern.fullmatch(p) for p in paths):
      raise ConfigError(_matches_nothing(rule, exp, paths))
  trains = set()
  for p in paths:
    decided = next((r.trains for r in all_rules if r.pattern.fullmatch(p)), None)
    if decided:
      trains.add(p)
  if not trains:
    raise ConfigError(f"config.finetune: nothing trains (method={exp.finetune.method!r}); name "
                      "parameters with config.finetune.trainable or config.finetune.presets")
  return frozenset(trains)


def _matches_nothing(rule: Rule, exp: Experiment, paths: list[str]) -> str:
  m = exp.model
  if rule.source.startswith("config.finetune.method='bitfit'") or rule.source.endswith("bitfit"):
    return (f"{rule.source} needs bias parameters, and this model has none "
            f"(config.model.use_bias={m.use_bias}, norm={m.norm!r})")
  return (f"{rule.source} matches no parameter of the model; its parameters include: "
          f"{capped(paths, 12)}")


def check_lora_targets(exp: Experiment, paths) -> None:
  """LoRA's target regex must have reached some projection."""
  f = exp.finetune
  if f.method in ("lora", "adalora") and not any("/lora/" in p for p in paths):
    kernels = sorted(p[:-len("/kernel")] for p in paths if p.endswith("/kernel"))
    raise ConfigError(f"config.finetune.lora_targets={f.lora_targets!r} matches no projection; "
                      f"module paths include: {capped(kernels, 12)}")
