"""The combinations of an experiment's settings that cannot run, each refused with a ConfigError
naming the key and what is allowed (device-dependent checks live in parallel.mesh)."""

from __future__ import annotations

from llmjax import config_prune
from llmjax.config_sections import Experiment, ModelConfig
from llmjax.errors import ConfigError
from llmjax.models.presets import RNN_IGNORED


def require(ok: bool, message: str) -> None:
  """A ConfigError with `message` unless `ok` (what every check here, and tasks' own, use)."""
  if not ok:
    raise ConfigError(message)


_require = require


def validate(exp: Experiment) -> None:
  """Combinations that cannot run; device-dependent checks live in parallel.mesh."""
  m, t, o, data = exp.model, exp.train, exp.optim, exp.data
  for key, value in (("model.vocab_size", m.vocab_size), ("model.d_model", m.d_model),
                     ("model.n_layers", m.n_layers), ("model.n_heads", m.n_heads),
                     ("model.d_ff", m.d_ff), ("model.max_len", m.max_len),
                     ("model.attention_block", m.attention_block),
                     ("data.seq_len", data.seq_len), ("train.steps", t.steps),
                     ("train.batch_size", t.batch_size), ("optim.accum_steps", o.accum_steps),
                     ("train.log_every", t.log_every), ("train.eval_every", t.eval_every),
                     ("train.checkpoint_every", t.checkpoint_every),
                     ("train.keep_checkpoints", t.keep_checkpoints),
                     ("train.max_nonfinite", t.max_nonfinite)):
    _require(value > 0, f"config.{key} must be positive, got {value}")
  _validate_model(exp)
  _require(0.0 < data.val_fraction < 1.0,
           f"config.data.val_fraction must be in (0, 1), got {data.val_fraction}")
  _require(t.batch_size % o.accum_steps == 0,
           f"config.train.batch_size={t.batch_size} must be divisible by "
           f"config.optim.accum_steps={o.accum_steps}")
  _require(data.source != "files" or bool(data.files),
           "config.data.files must be a glob when config.data.source='files'")
  _require(data.source != "tfds" or bool(data.tfds_name),
           "config.data.tfds_name must be set when config.data.source='tfds'")
  kind, _, size = data.tokenizer.partition(":")
  _require(data.tokenizer == "byte" or (kind == "hf" and bool(size))
           or (kind in ("wordpiece", "bpe") and size.isdigit() and int(size) > 0),
           f"config.data.tokenizer={data.tokenizer!r}: allowed 'byte', 'hf:PATH', "
           "'wordpiece:N' or 'bpe:N' (N a vocabulary size)")
  _require(data.stdlib_classes >= 2,
           f"config.data.stdlib_classes must be >= 2, got {data.stdlib_classes}")
  _require(t.keep_best >= 0, f"config.train.keep_best must be >= 0, got {t.keep_best}")
  _require(t.early_stop_patience >= 0 and t.early_stop_min_delta >= 0,
           "config.train.early_stop_patience and early_stop_min_delta must be >= 0, got "
           f"{t.early_stop_patience} and {t.early_stop_min_delta}")
  _require(t.init_from == "" or t.init_from.split(":", 1)[0] in ("hf", "workdir", "export",
                                                                  "peft"),
           f"config.train.init_from={t.init_from!r}: allowed '', 'hf:PATH', 'workdir:PATH', "
           "'export:PATH', 'peft:ADAPTER_DIR'")
  _require(0.0 <= data.test_fraction < 1.0 and data.val_fraction + data.test_fraction < 1.0,
           f"config.data.test_fraction must be in [0, 1) with val_fraction + test_fraction < 1, "
           f"got {data.test_fraction}")
  validate_finetune(exp)
  validate_distill(exp)
  config_prune.validate(exp.prune, t.steps)
  validate_images(exp)
  validate_rnn(exp)
  validate_moe(exp)
  exp.task.validate(exp)  # the task's own options, checked by the task (llmjax/task_config.py)
  _validate_mesh(exp)


def _validate_model(exp: Experiment) -> None:
  """The model's shape against itself and against the sequence length."""
  m, data = exp.model, exp.data
  heads = m.arch != "rnn"  # an RNN has no attention heads (validate_rnn checks its fields)
  _require(not heads or m.head_dim > 0 or m.d_model % m.n_heads == 0,
           f"config.model.n_heads={m.n_heads} must divide config.model.d_model={m.d_model} "
           "(or set config.model.head_dim)")
  _require(m.n_heads % m.kv_heads == 0,
           f"config.model.n_kv_heads={m.n_kv_heads} must divide config.model.n_heads={m.n_heads}")
  _require(not heads or m.pos_emb != "rope" or m.dim_per_head % 2 == 0,
           f"rotary embeddings need an even head dim, got {m.dim_per_head}")
  _require(m.pos_emb != "sinusoidal" or m.d_model % 2 == 0,
           f"sinusoidal positions need an even config.model.d_model, got {m.d_model}")
  _require(m.n_decoder_layers >= 0,
           f"config.model.n_decoder_layers must be >= 0 (0: n_layers), got {m.n_decoder_layers}")
  _require(m.n_decoder_heads >= 0 and m.d_ff_decoder >= 0,
           f"config.model.n_decoder_heads={m.n_decoder_heads} and d_ff_decoder={m.d_ff_decoder} "
           "must be >= 0 (0: the encoder's)")
  dec = m.decoder_stack()
  _require(m.head_dim > 0 or m.d_model % dec.n_heads == 0,
           f"config.model.n_decoder_heads={m.n_decoder_heads} must divide config.model.d_model="
           f"{m.d_model} (or set config.model.head_dim)")
  _require(dec.n_heads % dec.kv_heads == 0,
           f"config.model.n_kv_heads={m.n_kv_heads} must divide config.model.n_decoder_heads="
           f"{dec.n_heads}")
  _require(data.seq_len <= m.max_len,
           f"config.data.seq_len={data.seq_len} is longer than config.model.max_len={m.max_len}")
  _require(0.0 <= m.dropout < 1.0, f"config.model.dropout must be in [0, 1), got {m.dropout}")
  _require(not m.norm_offset or m.norm == "rmsnorm",
           f"config.model.norm_offset={m.norm_offset} needs config.model.norm='rmsnorm' (Gemma's "
           f"1 + weight), got {m.norm!r}")
  for key in ("query_pre_attn_scalar", "attn_softcap", "final_softcap", "rope_local_theta"):
    _require(getattr(m, key) >= 0, f"config.model.{key} must be >= 0 (0: off), got "
             f"{getattr(m, key)}")
  _require(not (m.attn_softcap and m.attention_impl == "cudnn"),
           f"config.model.attention_impl='cudnn' cannot soft-cap attention scores "
           f"(attn_softcap={m.attn_softcap}); allowed: 'auto', 'xla', 'blocked'")
  validate_model_features(m)


def validate_model_features(m) -> None:
  """Rotary scaling, sliding windows: values the one Transformer can run (a ModelConfig `m`)."""
  _require(m.rope_scaling == "none" or m.pos_emb == "rope",
           f"config.model.rope_scaling={m.rope_scaling!r} needs config.model.pos_emb='rope', got "
           f"{m.pos_emb!r}")
  _require(m.rope_factor > 0, f"config.model.rope_factor must be positive, got {m.rope_factor}")
  _require(m.rope_original_max_len >= 0, "config.model.rope_original_max_len must be >= 0 (0: "
           f"max_len), got {m.rope_original_max_len}")
  _require(m.rope_scaling != "llama3" or m.rope_low_freq_factor < m.rope_high_freq_factor,
           f"config.model.rope_low_freq_factor={m.rope_low_freq_factor} must be below "
           f"rope_high_freq_factor={m.rope_high_freq_factor}")
  _require(m.rope_scaling != "dynamic" or m.dim_per_head > 2,
           f"config.model.rope_scaling='dynamic' needs a head dim above 2, got {m.dim_per_head}")
  _require(m.sliding_window >= 0,
           f"config.model.sliding_window must be >= 0 (0: none), got {m.sliding_window}")
  _require(set(m.layer_pattern) <= {"L", "G"},
           f"config.model.layer_pattern={m.layer_pattern!r}: allowed letters L (local: within "
           "sliding_window) and G (global), e.g. 'LG' or 'LLLLLG'")
  _require(not m.layer_pattern or m.sliding_window > 0,
           f"config.model.layer_pattern={m.layer_pattern!r} needs config.model.sliding_window > 0")
  # A window is a causal decoder's: an encoder (or the encoder of an encoder-decoder) would
  # have to look right as well, which no attention implementation here does.
  _require(not m.sliding_window or (m.causal and m.arch == "transformer"),
           f"config.model.sliding_window={m.sliding_window} needs a causal decoder (arch="
           f"'transformer', causal=True); this model has arch={m.arch!r}, causal={m.causal}")


def _validate_mesh(exp: Experiment) -> None:
  """The mesh axes' sizes (whether they fit the devices is checked in parallel.mesh)."""
  for axis in ("data", "fsdp", "tensor", "expert", "context"):
    size = getattr(exp.mesh, axis)
    _require(size == -1 or size > 0, f"config.mesh.{axis} must be positive or -1, got {size}")
  _require([exp.mesh.data, exp.mesh.fsdp, exp.mesh.tensor, exp.mesh.expert,
            exp.mesh.context].count(-1) <= 1,
           "at most one of config.mesh.data/fsdp/tensor/expert/context may be -1")
  n_experts, expert = exp.model.n_experts, exp.mesh.expert
  _require(not exp.mesh.rules.endswith("ep") or expert == -1 or
           (n_experts > 0 and n_experts % expert == 0),
           f"config.mesh.expert={expert} must divide config.model.n_experts={n_experts} under "
           f"config.mesh.rules={exp.mesh.rules!r}")
  _require(exp.mesh.dcn > 0, f"config.mesh.dcn must be positive, got {exp.mesh.dcn}")


def validate_finetune(exp: Experiment) -> None:
  """The numbers of config.finetune; which parameters they name is checked on the model."""
  f = exp.finetune
  for key in ("lora_rank", "adalora_target_rank", "adalora_interval", "adapter_dim",
              "prompt_length", "prefix_length"):
    _require(getattr(f, key) > 0, f"config.finetune.{key} must be positive, got "
             f"{getattr(f, key)}")
  _require(f.lora_alpha > 0, f"config.finetune.lora_alpha must be positive, got {f.lora_alpha}")
  _require(0.0 <= f.lora_dropout < 1.0,
           f"config.finetune.lora_dropout must be in [0, 1), got {f.lora_dropout}")
  _require(f.method != "adalora" or f.adalora_target_rank <= f.lora_rank,
           f"config.finetune.adalora_target_rank={f.adalora_target_rank} must be at most "
           f"config.finetune.lora_rank={f.lora_rank} (the initial rank)")
  for key in ("adalora_beta1", "adalora_beta2"):
    _require(0.0 <= getattr(f, key) < 1.0,
             f"config.finetune.{key} must be in [0, 1), got {getattr(f, key)}")
  _require(f.adalora_warmup >= 0 and f.adalora_final >= 0 and f.adalora_orth_reg >= 0,
           "config.finetune.adalora_warmup, adalora_final and adalora_orth_reg must be >= 0")
  layers = [s.strip() for s in f.adapter_layers.split(",") if s.strip()]
  _require(all(s.isdigit() for s in layers),
           f"config.finetune.adapter_layers={f.adapter_layers!r} must be comma-separated block "
           "indices, or empty for every block")


def validate_distill(exp: Experiment) -> None:
  """The numbers of config.distill; the teacher itself is checked when it is loaded."""
  d = exp.distill
  _require(d.teacher == "" or d.teacher.split(":", 1)[0] in ("hf", "workdir", "export",
                                                               "experiment"),
           f"config.distill.teacher={d.teacher!r}: allowed '', 'workdir:PATH', 'export:PATH', "
           "'hf:PATH', 'experiment:FILE[:ARG]' (trained first in WORKDIR/teacher)")
  for key in ("alpha", "alpha_end"):
    _require(0.0 <= getattr(d, key) <= 1.0,
             f"config.distill.{key} must be in [0, 1], got {getattr(d, key)}")
  for key in ("temperature", "temperature_end"):
    _require(getattr(d, key) > 0.0,
             f"config.distill.{key} must be > 0, got {getattr(d, key)}")
  _require(d.top_k >= 0, f"config.distill.top_k must be >= 0 (0: online teacher), got {d.top_k}")
  _require(d.hidden_weight >= 0.0,
           f"config.distill.hidden_weight must be >= 0, got {d.hidden_weight}")
  _require(not (d.hidden_weight and d.top_k),
           f"config.distill.hidden_weight={d.hidden_weight} needs the online teacher (top_k=0): "
           "an offline teacher stores logits only")


# The options of recurrent networks, and the fine-tuning methods that fit them (the others add
# to Transformer blocks, attention or input positions, which an RNN has none of).
RNN_FIELDS = ("rnn_cell", "rnn_layers", "rnn_hidden", "bidirectional")
RNN_METHODS = ("full", "freeze", "bitfit", "lora", "adalora")


def validate_rnn(exp: Experiment) -> None:
  """RNN options only on arch='rnn', and the Transformer's never on it."""
  m, default = exp.model, ModelConfig()
  if m.arch != "rnn":
    for key in RNN_FIELDS:
      _require(getattr(m, key) == getattr(default, key),
               f"config.model.{key}={getattr(m, key)!r} is an option of recurrent networks "
               f"(config.model.arch='rnn'), not of arch {m.arch!r}; leave it at "
               f"{getattr(default, key)!r}")
    return
  for key, neutral in RNN_IGNORED.items():
    hint = {"n_layers": "; set config.model.rnn_layers",
            "causal": "; set config.model.bidirectional"}.get(key, "")
    _require(getattr(m, key) == neutral,
             f"config.model.{key}={getattr(m, key)!r} is a Transformer option that "
             f"config.model.arch='rnn' does not read; leave it at {neutral!r}{hint}")
  for key in ("rnn_layers", "rnn_hidden"):
    _require(getattr(m, key) > 0, f"config.model.{key} must be positive, got {getattr(m, key)}")
  _require(exp.finetune.method in RNN_METHODS,
           f"config.finetune.method={exp.finetune.method!r} does not fit a recurrent network "
           f"(it adds to Transformer blocks); allowed with config.model.arch='rnn': "
           f"{', '.join(RNN_METHODS)}")


def _int_list(key: str, text: str) -> list[int]:
  items = [t.strip() for t in text.split(",")]
  _require(all(t.isdigit() and int(t) > 0 for t in items),
           f"config.{key}={text!r} must be comma-separated positive integers")
  return [int(t) for t in items]


def validate_images(exp: Experiment) -> None:
  """Image models, image data and the step schedule."""
  m, data, o = exp.model, exp.data, exp.optim
  depths = _int_list("model.resnet_depths", m.resnet_depths)
  widths = _int_list("model.resnet_widths", m.resnet_widths)
  _require(len(depths) == len(widths),
           f"config.model.resnet_depths has {len(depths)} stages but resnet_widths has "
           f"{len(widths)}")
  _int_list("model.cnn_widths", m.cnn_widths)
  for key, value in (("model.stem_width", m.stem_width), ("model.cnn_hidden", m.cnn_hidden),
                     ("model.bn_eps", m.bn_eps)):
    _require(value > 0, f"config.{key} must be positive, got {value}")
  _require(0.0 <= m.bn_momentum < 1.0,
           f"config.model.bn_momentum must be in [0, 1), got {m.bn_momentum}")
  for key, value in (("data.image_size", data.image_size),
                     ("data.crop_padding", data.crop_padding),
                     ("data.rotate_degrees", data.rotate_degrees)):
    _require(value >= 0, f"config.{key} must be >= 0, got {value}")
  _require(0.0 < data.crop_scale_min <= 1.0 and 0.0 < data.crop_ratio_min <= 1.0,
           "config.data.crop_scale_min and crop_ratio_min must be in (0, 1]")
  _require(data.source != "image_folder" or bool(data.image_folder),
           "config.data.image_folder must be a directory when config.data.source='image_folder'")
  fractions = [f.strip() for f in o.step_boundaries.split(",") if f.strip()]
  try:
    ok = all(0.0 < float(f) < 1.0 for f in fractions)
  except ValueError:
    ok = False
  _require(ok, f"config.optim.step_boundaries={o.step_boundaries!r} must be comma-separated "
           "fractions of the run in (0, 1)")
  _require(o.momentum >= 0.0, f"config.optim.momentum must be >= 0, got {o.momentum}")


MOE_FIELDS = ("n_experts", "experts_per_token", "moe_d_ff", "decoder_sparse_step",
              "mlp_only_layers", "n_shared_experts", "shared_d_ff", "shared_expert_gate",
              "norm_topk_prob", "router_jitter", "moe_capacity_factor", "moe_aux_loss_weight",
              "moe_z_loss_weight")


def validate_moe(exp: Experiment) -> None:
  """Mixture-of-experts options: only on the Transformer (decoder or encoder), and consistent."""
  m, default = exp.model, ModelConfig()
  _require(m.n_experts >= 0, f"config.model.n_experts must be >= 0 (0: dense MLPs), got "
           f"{m.n_experts}")
  if m.arch != "transformer":
    for key in MOE_FIELDS:
      _require(getattr(m, key) == getattr(default, key),
               f"config.model.{key}={getattr(m, key)!r} is a mixture-of-experts option of "
               f"config.model.arch='transformer', not of arch {m.arch!r}; leave it at "
               f"{getattr(default, key)!r}")
  if m.n_experts == 0:
    return
  _require(1 <= m.experts_per_token <= m.n_experts,
           f"config.model.experts_per_token={m.experts_per_token} must be in [1, n_experts="
           f"{m.n_experts}]")
  _require(m.moe_capacity_factor >= 0, f"config.model.moe_capacity_factor="
           f"{m.moe_capacity_factor}: allowed 0 (dropless) or a positive factor")
  for key in ("moe_d_ff", "shared_d_ff", "n_shared_experts", "router_jitter",
              "moe_aux_loss_weight", "moe_z_loss_weight"):
    _require(getattr(m, key) >= 0, f"config.model.{key} must be >= 0, got {getattr(m, key)}")
  _require(m.router_jitter < 1, f"config.model.router_jitter must be in [0, 1), got "
           f"{m.router_jitter}")
  _require(m.decoder_sparse_step >= 1, f"config.model.decoder_sparse_step must be >= 1, got "
           f"{m.decoder_sparse_step}")
  items = [t.strip() for t in m.mlp_only_layers.split(",") if t.strip()]
  _require(all(t.isdigit() and int(t) < m.n_layers for t in items),
           f"config.model.mlp_only_layers={m.mlp_only_layers!r} must be comma-separated layer "
           f"indices in [0, {m.n_layers})")
  _require(not m.shared_expert_gate or m.shared_width > 0, "config.model.shared_expert_gate "
           "needs a shared expert (config.model.n_shared_experts or shared_d_ff > 0)")
  _require(not m.scan_layers or len(set(m.moe_layers())) == 1,
           f"config.model.scan_layers=True needs every layer alike, but the MoE layer pattern "
           f"(decoder_sparse_step={m.decoder_sparse_step}, mlp_only_layers="
           f"{m.mlp_only_layers!r}) mixes dense and sparse layers; set scan_layers=False")
