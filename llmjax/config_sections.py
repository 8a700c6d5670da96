"""The sections of an experiment as frozen dataclasses (`Experiment` and one class per section),
with the allowed values of their string fields. `llmjax.config` builds them from a ConfigDict and
re-exports them; this module holds only their definitions, so the checks (config_checks.py) can
name them without importing the module that runs the checks.
"""

from __future__ import annotations

import dataclasses
import json

from llmjax.config_prune import PruneConfig
from llmjax.config_tasks import TaskEntry
from llmjax.task_config import TaskConfig


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shape and numerics of one Transformer; decoder or encoder, GPT-2 or Llama style, is data."""
  vocab_size: int = 256
  d_model: int = 256
  n_layers: int = 4
  n_heads: int = 4
  n_kv_heads: int = 0  # 0: same as n_heads (multi-head attention); fewer: grouped-query attention.
  head_dim: int = 0  # 0: d_model // n_heads.
  d_ff: int = 1024
  max_len: int = 256
  causal: bool = True  # False: bidirectional encoder.
  pos_emb: str = "learned"  # learned | rope | sinusoidal (Marian's: sin half, cos half) | none
  rope_theta: float = 10000.0
  # Rotary scaling as transformers computes it (llmjax/models/rope.py): none | linear (positions
  # / factor) | dynamic (NTK base grown with the input past max_len) | yarn | llama3.
  rope_scaling: str = "none"
  rope_factor: float = 1.0
  rope_original_max_len: int = 0  # llama3, yarn: the pretraining context (0: max_len)
  rope_low_freq_factor: float = 1.0  # llama3
  rope_high_freq_factor: float = 4.0  # llama3
  rope_beta_fast: float = 32.0  # yarn
  rope_beta_slow: float = 1.0  # yarn
  rope_attention_factor: float = 0.0  # yarn: cos and sin scaled by it (0: 0.1 ln(factor) + 1)
  rope_truncate: bool = True  # yarn: the correction range rounded outwards to whole dims
  norm: str = "layernorm"  # layernorm | rmsnorm
  # RMSNorm multiplies by (norm_offset + scale): Gemma stores its scales around 0 (1.0 there).
  norm_offset: float = 0.0
  norm_eps: float = 1e-5
  norm_position: str = "pre"  # pre (GPT/Llama) | post (BERT)
  embed_norm: bool = False  # normalise the summed embeddings (BERT)
  final_norm: bool = True  # a norm after the last block (pre-norm models)
  mlp: str = "gelu_tanh"  # gelu_tanh | gelu | relu | silu | swiglu | geglu (gated tanh-GELU)
  use_bias: bool = True  # a bias on every projection (attention, MLP, adapters)
  # Biases on some projections only (with use_bias=False): q, k and v (Qwen2); o; the MLP's.
  qkv_bias: bool = False
  o_bias: bool = False
  mlp_bias: bool = False
  qk_norm: bool = False  # a norm (config.norm) over each query and key head before RoPE (Qwen3)
  # Sliding-window attention: a local layer's query sees itself and the sliding_window - 1 keys
  # before it (0: no window). layer_pattern: L (local) or G (global) per layer, repeated from
  # layer 0 ("LG" alternates; "GGLL" for a 4-layer Qwen2 with max_window_layers=2); "": all L.
  sliding_window: int = 0
  layer_pattern: str = ""
  tie_embeddings: bool = True
  type_vocab_size: int = 0  # >0: token-type embeddings (BERT segment A/B)
  dropout: float = 0.0
  init_std: float = 0.02
  dtype: str = "float32"  # compute dtype
  param_dtype: str = "float32"
  scan_layers: bool = False
  remat: str = "none"  # none | full | dots | dots_no_batch
  attention_impl: str = "auto"  # auto | xla | blocked | cudnn | splash (models/attention.py)
  attention_block: int = 64  # query block of attention_impl="blocked"
  # splash (TPU, models/splash.py): query / key tile sizes, multiples of 128 dividing the
  # sequence length; 0: the largest of 512, 256, 128 that divides it.
  splash_block_q: int = 0
  splash_block_kv: int = 0
  # Encoder-decoders (arch="encoder_decoder", llmjax/models/encoder_decoder.py): n_layers encoder
  # blocks, n_decoder_layers decoder blocks; embeddings shared by both stacks and, when
  # tie_embeddings, by the output projection.
  n_decoder_layers: int = 0  # 0: n_layers
  n_decoder_heads: int = 0  # the decoder's attention heads (self and cross); 0: n_heads
  d_ff_decoder: int = 0  # the decoder's MLP width; 0: d_ff
  embed_scale: bool = False  # token embeddings times sqrt(d_model) (Marian, the original paper)
  final_logits_bias: bool = False  # a bias over the vocabulary on the logits (Marian, BART)
  # Gemma 2/3 (hf/gemma.py): scores scaled by query_pre_attn_scalar ** -0.5 (0: head_dim ** -0.5);
  # soft-capping cap * tanh(x / cap) of the attention scores and of the logits (0: off); a norm
  # on each sublayer's output before its residual add (post_norms).
  query_pre_attn_scalar: int = 0
  # Gemma 3: the RoPE base of local (sliding-window) layers, unscaled; 0: as the global layers.
  rope_local_theta: float = 0.0
  attn_softcap: float = 0.0
  final_softcap: float = 0.0
  post_norms: bool = False
  # Image models (presets resnet18 ... resnet152 and cnn; llmjax/models/resnet.py, cnn.py).
  arch: str = "transformer"  # transformer | encoder_decoder | resnet | cnn | rnn | gan (config.task)
  resnet_block: str = "bottleneck"  # basic | bottleneck
  resnet_depths: str = "3,4,6,3"  # blocks per stage
  resnet_widths: str = "256,512,1024,2048"  # output channels per stage (HF hidden_sizes)
  stem: str = "imagenet"  # imagenet (7x7/2 conv, 3x3/2 max-pool) | small (3x3/1 conv, no pool)
  stem_width: int = 64  # channels out of the stem (HF embedding_size)
  zero_init_residual: bool = False  # each block's last BatchNorm scale starts at 0
  resnet_downsample_first: bool = False  # the first stage halves the resolution too
  resnet_stride_1x1: bool = False  # a block's stride on its first conv (v1), not the 3x3 (v1.5)
  bn_momentum: float = 0.9  # running statistics: new = momentum * old + (1 - momentum) * batch
  bn_eps: float = 1e-5
  cnn_widths: str = "32,64"  # the small CNN: channels of its 3x3 conv layers (each 2x2-pooled)
  cnn_hidden: int = 128  # the small CNN: width of its hidden dense layer
  # Recurrent networks (arch="rnn", preset rnn; llmjax/models/rnn.py): an embedding of width
  # d_model, rnn_layers recurrent layers of rnn_hidden units each (`dropout` between them, as
  # torch's nn.LSTM applies it), a dense head. Tasks lm (unidirectional) and classify.
  rnn_cell: str = "lstm"  # lstm (OptimizedLSTMCell) | gru (GRUCell) | simple (tanh SimpleCell)
  rnn_layers: int = 1
  rnn_hidden: int = 256
  bidirectional: bool = False  # each layer reads the sequence both ways (nn.Bidirectional)
  # Mixture of experts (llmjax/models/moe.py, docs/moe.md). n_experts > 0: the MLP of each sparse
  # layer routes every token to experts_per_token of n_experts MLPs (config.mlp, width moe_d_ff;
  # 0: d_ff). Layer i is sparse unless i is in mlp_only_layers ("0,3") or (i + 1) %
  # decoder_sparse_step != 0 (as transformers' Qwen2-MoE). A shared MLP of width shared_d_ff (0:
  # n_shared_experts * the expert width) sees every token, scaled by sigmoid(x w) with
  # shared_expert_gate. Routing: softmax in float32 over the router logits, top-k, renormalised
  # when norm_topk_prob (Mixtral, Qwen3-MoE; not Qwen2-MoE). moe_capacity_factor 0: dropless
  # (grouped matmul); > 0: each expert takes ceil(factor * L * k / E) tokens of a row, the rest
  # are dropped. The load-balancing (Switch) and router z-losses enter the training loss times
  # their weights. router_jitter: multiplicative uniform noise on the router input while training.
  n_experts: int = 0
  experts_per_token: int = 2
  moe_d_ff: int = 0
  decoder_sparse_step: int = 1
  mlp_only_layers: str = ""
  n_shared_experts: int = 0
  shared_d_ff: int = 0
  shared_expert_gate: bool = False
  norm_topk_prob: bool = True
  router_jitter: float = 0.0
  moe_capacity_factor: float = 0.0
  moe_aux_loss_weight: float = 0.01
  moe_z_loss_weight: float = 0.0
  quant: str = ""  # "" | int8[:gN][:asym] | int4:gN[:asym] | nf4:gN (docs/compression.md)
  quant_compute: str = "dequant"  # dequant (then a float matmul) | int8 (an int32 dot)

  @property
  def kv_heads(self) -> int:
    return self.n_kv_heads or self.n_heads

  @property
  def dim_per_head(self) -> int:
    return self.head_dim or self.d_model // self.n_heads

  def decoder_stack(self) -> "ModelConfig":
    """An encoder-decoder's decoder blocks: causal, with their own heads and MLP width."""
    return dataclasses.replace(self, causal=True, n_heads=self.n_decoder_heads or self.n_heads,
                               d_ff=self.d_ff_decoder or self.d_ff)

  @property
  def expert_d_ff(self) -> int:
    return self.moe_d_ff or self.d_ff

  @property
  def shared_width(self) -> int:
    """The shared experts' MLP width (0: none)."""
    return self.shared_d_ff or self.n_shared_experts * self.expert_d_ff

  def moe_layers(self, n_layers: int | None = None) -> tuple[bool, ...]:
    """Per layer of a stack of `n_layers` (n_layers): whether its MLP is a mixture of experts."""
    n = self.n_layers if n_layers is None else n_layers
    dense = {int(t) for t in self.mlp_only_layers.split(",") if t.strip().isdigit()}
    step = max(self.decoder_sparse_step, 1)
    return tuple(self.n_experts > 0 and i not in dense and (i + 1) % step == 0 for i in range(n))

  def local_layers(self, n_layers: int | None = None) -> tuple[bool, ...]:
    """Per layer of a stack of `n_layers` (n_layers): whether it attends within the window."""
    n = self.n_layers if n_layers is None else n_layers
    if not self.sliding_window:
      return (False,) * n
    pattern = self.layer_pattern or "L"
    return tuple(pattern[i % len(pattern)] == "L" for i in range(n))


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Device mesh (dcn, data, fsdp, expert, context, tensor) and the logical->mesh rules preset; -1 fills
  the rest of a slice; dcn counts TPU slices (the batch splits over them too)."""
  dcn: int = 1
  data: int = -1
  fsdp: int = 1
  tensor: int = 1
  expert: int = 1  # expert parallelism (rules ep, fsdp_ep, fsdp_tp_ep); elsewhere data parallel
  context: int = 1  # the sequence split (any rules preset); attention gathers K/V (tpu_attention)
  rules: str = "dp"  # dp | fsdp | tp | fsdp_tp | ep | fsdp_ep | fsdp_tp_ep


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """AdamW with linear warmup and cosine decay, global-norm clipping, gradient accumulation."""
  lr: float = 1e-3
  warmup_steps: int = 100
  schedule: str = "cosine"  # cosine | constant
  min_lr_ratio: float = 0.1
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  weight_decay: float = 0.1
  grad_clip: float = 1.0  # 0 disables clipping
  accum_steps: int = 1
  name: str = "adamw"  # adamw | sgd
  momentum: float = 0.9  # sgd
  nesterov: bool = False  # sgd
  step_boundaries: str = "0.5,0.75"  # schedule=step: fractions of the run where lr drops
  step_factor: float = 0.1  # schedule=step: what each boundary multiplies lr by


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Where text comes from and how it becomes packed token sequences."""
  source: str = "stdlib"  # stdlib | files | tfds
  files: str = ""  # glob, for source=files
  tfds_name: str = ""
  tfds_split: str = "train"
  tfds_data_dir: str = ""
  tfds_text_key: str = "text"  # the text field of a tfds LM corpus
  tfds_val_split: str = ""  # labelled tfds data: "" splits validation off the train split
  tfds_test_split: str = ""  # labelled tfds data: "" means no test split
  # byte | hf:PATH (with tokenizer.json) | wordpiece:N | bpe:N (trained: WORKDIR/tokenizer.json)
  tokenizer: str = "byte"
  text_key: str = "text"  # labelled data (CSV/JSONL columns, tfds fields): the text
  label_key: str = "label"  # ... and the label (names or integers)
  label_names: str = ""  # comma-separated: fixes the label set and its order ("" from the data)
  val_files: str = ""  # labelled files: glob of the validation split ("" splits it off train)
  test_files: str = ""  # labelled files: glob of the test split ("" means none)
  stdlib_classes: int = 8  # source=stdlib for classification: the K most common packages
  seq_len: int = 256
  val_fraction: float = 0.05
  max_bytes: int = 0  # 0: whole corpus; >0: read at most this many bytes (smoke runs)
  seed: int = 0
  # Images (task image_classify; llmjax/data/vision.py).
  image_folder: str = ""  # source=image_folder: ROOT/<class>/*.png|jpg; a sibling val/ if any
  idx_dir: str = ""  # source=idx: the MNIST-format files ("" the Debian Fashion-MNIST package)
  tfds_image_key: str = "image"
  image_size: int = 0  # square side images are resized to (0: as stored)
  crop_padding: int = 0  # train: random crop of the image zero-padded by this much (0: off)
  random_resized_crop: bool = False  # train: random area/aspect crop resized to image_size
  crop_scale_min: float = 0.08  # ... smallest fraction of the area
  crop_ratio_min: float = 0.75  # ... aspect range [min, 1/min]
  hflip: bool = False  # train: mirror half of the images
  rotate_degrees: float = 0.0  # train: rotate by a uniform angle in [-d, d]
  normalize: bool = True  # subtract the training set's per-channel mean, divide by its std
  # Parallel text (task seq2seq; llmjax/data/parallel_text.py). source=files: TSV (source<TAB>
  # target) or JSONL ({source_key, target_key}) files; source=tfds: a translation dataset whose
  # features are the language codes; source=gettext: the machine's gettext catalogs (English
  # msgid -> translated msgstr) under locale_dir.
  source_key: str = "source"
  target_key: str = "target"
  source_lang: str = "en"
  target_lang: str = "de"
  locale_dir: str = "/usr/share/locale"
  test_fraction: float = 0.0  # parallel text: held out as the test split when no test files
  pack: bool = True  # seq2seq: several short pairs share a row (segment ids keep them apart)
  # Conversations (task sft; llmjax/data/chat.py, chat_rows.py, docs/instruct.md).
  chat_template: str = ""  # "" tokenizer=hf:PATH's own, a built-in (byte, chatml), a jinja file
  train_on: str = "assistant"  # the tokens the loss counts: assistant | last_assistant | all
  too_long: str = "cut"  # a conversation longer than seq_len: cut | drop
  chat_fields: str = ""  # source=tfds: e.g. prompt=instruction+context,completion=response


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """The loop: budget, batch, cadence of logging, evaluation, checkpoints and samples."""
  steps: int = 1000
  batch_size: int = 32  # global, in sequences
  seed: int = 0
  log_every: int = 50
  eval_every: int = 250
  eval_batches: int = 20
  checkpoint_every: int = 500
  keep_checkpoints: int = 3  # the newest k are always kept
  keep_best: int = 0  # plus the best n by validation loss (NaN/inf rank worst)
  async_checkpoint: bool = True
  max_nonfinite: int = 20  # consecutive non-finite steps tolerated before the run stops
  sample_prompts: int = 4
  sample_tokens: int = 200
  sample_temperature: float = 0.8
  progress: bool = True
  init_from: str = ""  # "" (random init) | hf:PATH | workdir:PATH | export:PATH | peft:PATH
  init_new: str = ""  # regex of parameter paths initialised fresh despite init_from (new heads)
  # Early stopping (llmjax/train/early_stop.py): stop at the evaluation after which the metric
  # has not improved by more than min_delta for `patience` evaluations; with keep_best, the best
  # evaluation's checkpoint is saved and kept, retention ranking by this metric.
  early_stop_patience: int = 0  # 0: off
  early_stop_metric: str = "loss"  # a validation metric the task reports (`<task>/<key>` in
  #                                  config.tasks runs)
  early_stop_mode: str = "min"  # min | max: which direction improves
  early_stop_min_delta: float = 0.0


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
  """What trains and what stays frozen (llmjax/finetune; docs/finetune.md)."""
  method: str = "full"  # full | freeze | bitfit | lora | adalora | adapter | prompt | prefix
  trainable: str = ""  # regex (full match on a/b/c paths) trained besides the method's own
  frozen: str = ""  # regex kept frozen whatever else matches (checked first)
  presets: str = ""  # comma-separated trained groups: head, ffn, attention, norms, embeddings,
  #                    bitfit (every bias), top_k_layers=K
  lora_rank: int = 8  # adalora: the initial rank of every module
  lora_alpha: float = 16.0
  lora_dropout: float = 0.0
  lora_targets: str = "qv"  # qv | attention | mlp | all_linear, or a regex over module paths
  rslora: bool = False  # scale alpha / sqrt(r) instead of alpha / r
  adalora_target_rank: int = 4  # average rank per module once the budget has shrunk
  adalora_warmup: int = 0  # steps at the initial budget (0: a tenth of the run)
  adalora_final: int = 0  # last steps at the final budget (0: a fifth of the run)
  adalora_interval: int = 10  # steps between re-allocations of the budget
  adalora_beta1: float = 0.85  # EMA of the sensitivity |p * g|
  adalora_beta2: float = 0.85  # EMA of its uncertainty
  adalora_orth_reg: float = 0.5  # weight of ||A A^T - I||^2 + ||B^T B - I||^2
  adapter_dim: int = 16
  adapter_placement: str = "both"  # attn | mlp | both
  adapter_layers: str = ""  # comma-separated block indices ("" every block)
  prompt_length: int = 16
  prompt_init: str = "vocab"  # random | vocab (embeddings of random tokens) | labels
  prefix_length: int = 16
  base_quant: str = ""  # QLoRA: the frozen base stored as int8[:gN] | int4:gN | nf4:gN (model.quant)


@dataclasses.dataclass(frozen=True)
class DistillConfig:
  """Knowledge distillation (llmjax/tasks/distill.py): the task's loss becomes
  alpha * T^2 KL(teacher_T || student_T) + (1 - alpha) * task loss, over the task's own positions."""
  # "" (no distillation) | workdir:PATH | export:PATH | hf:PATH | experiment:FILE[:ARG] (that
  # experiment, trained first in WORKDIR/teacher: llmjax/train/teacher_run.py)
  teacher: str = ""
  alpha: float = 0.5  # weight of the distillation term; 1 - alpha weighs the task's own loss
  temperature: float = 2.0  # both distributions are softened by it; the term is scaled by T^2
  # constant | linear: alpha and temperature move linearly from their value at step 0 to
  # alpha_end / temperature_end at the last step (a teacher leaned on early, the labels late).
  schedule: str = "constant"
  alpha_end: float = 0.0
  temperature_end: float = 1.0
  # >0: offline teacher: its top-k logits per position are computed once over the training rows,
  # stored in the workdir (teacher_topk/, orbax) and read with the data; no teacher in memory
  # while training. Tasks whose inputs change every step (mlm corruption, image augmentation)
  # need the online teacher.
  top_k: int = 0
  # >0: also match the features the student's output layer reads to the teacher's (last hidden
  # states, a pooled vector) through a learned linear projection (student width -> teacher
  # width): this weight times their squared distance per counted position, averaged over the
  # teacher's width. The projection trains with the student and is left out of what eval and
  # export see.
  hidden_weight: float = 0.0


@dataclasses.dataclass(frozen=True)
class Experiment:
  name: str
  model: ModelConfig
  mesh: MeshConfig
  optim: OptimConfig
  data: DataConfig
  train: TrainConfig
  task: TaskConfig = TaskConfig()  # the named task's own options (a subclass; task_config.py)
  finetune: FinetuneConfig = FinetuneConfig()
  distill: DistillConfig = DistillConfig()
  prune: PruneConfig = PruneConfig()  # magnitude pruning (config_prune.py)
  # config.tasks: several tasks on one backbone (config_tasks.py); () for a single task
  tasks: tuple[TaskEntry, ...] = ()

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)


# The sections of an experiment besides config.task and config.tasks, and the fixed choices of
# their string fields (a task's own options name theirs in field metadata: task_config.py).
SECTIONS = {"model": ModelConfig, "mesh": MeshConfig, "optim": OptimConfig, "data": DataConfig,
             "train": TrainConfig, "finetune": FinetuneConfig, "distill": DistillConfig,
             "prune": PruneConfig}
CHOICES = {
    "model.pos_emb": ("learned", "rope", "sinusoidal", "none"),
    "model.norm": ("layernorm", "rmsnorm"),
    "model.norm_position": ("pre", "post"),
    "model.mlp": ("gelu_tanh", "gelu", "relu", "silu", "swiglu", "geglu"),
    "model.dtype": ("float32", "bfloat16", "float16"),
    "model.param_dtype": ("float32", "bfloat16"),
    "model.remat": ("none", "full", "dots", "dots_no_batch"),
    "model.attention_impl": ("auto", "xla", "blocked", "cudnn", "splash"),
    "model.rope_scaling": ("none", "linear", "dynamic", "yarn", "llama3"),
    "mesh.rules": ("dp", "fsdp", "tp", "fsdp_tp", "ep", "fsdp_ep", "fsdp_tp_ep"),
    "optim.schedule": ("cosine", "constant", "step"),
    "train.early_stop_mode": ("min", "max"),
    "optim.name": ("adamw", "sgd"),
    "data.source": ("stdlib", "files", "tfds", "image_folder", "idx", "mnist_digits", "gettext"),
    "model.arch": ("transformer", "encoder_decoder", "resnet", "cnn", "rnn", "gan"),
    "model.rnn_cell": ("lstm", "gru", "simple"),
    "model.resnet_block": ("basic", "bottleneck"),
    "model.stem": ("imagenet", "small"),
    "finetune.method": ("full", "freeze", "bitfit", "lora", "adalora", "adapter", "prompt",
                        "prefix"),
    "distill.schedule": ("constant", "linear"),
    "data.train_on": ("assistant", "last_assistant", "all"),
    "data.too_long": ("cut", "drop"),
    "finetune.adapter_placement": ("attn", "mlp", "both"),
    "finetune.prompt_init": ("random", "vocab", "labels"),
}
