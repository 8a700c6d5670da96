"""FLOP counts against hand counts, and datasheet peaks by device kind."""

import dataclasses

import pytest

from llmjax import flops
from llmjax.config import ModelConfig

# d_model 8, 2 heads of 4, d_ff 16, one layer, vocabulary 10; sequences of 4 tokens.
TINY = ModelConfig(vocab_size=10, d_model=8, n_layers=1, n_heads=2, d_ff=16, max_len=4,
                   mlp="gelu_tanh", causal=False)

# Hand count for one sequence of L=4 (a multiply-add is 2 FLOPs):
#   q, k, v, o projections: 4 matrices of 8 x (2 heads x 4) = 4 x 64 = 256 weights
#   MLP in and out: 2 x 8 x 16 = 256 weights                -> 512 matmul weights per block
#   matmuls: 2 x L x 512 = 2 x 4 x 512                       = 4096
#   attention scores q.k and p.v: 2 x (2 x L x L x N x H) = 4 x 16 x 2 x 4 = 512 (causal: 256)
#   logits: 2 x L x D x V = 2 x 4 x 8 x 10                   = 640
#   forward: 4096 + 512 + 640 = 5248; training (x3) = 15744 per sequence.
HAND_TRAIN_BIDIRECTIONAL = 3 * (4096 + 512 + 640)
HAND_TRAIN_CAUSAL = 3 * (4096 + 256 + 640)
# SwiGLU adds the gate matrix: 3 x 8 x 16 = 384 MLP weights -> 640 per block -> 2 x 4 x 640.
HAND_TRAIN_SWIGLU_CAUSAL = 3 * (2 * 4 * 640 + 256 + 640)
# One key/value head (GQA): k and v are 8 x 4 each: 64 + 64 + 32 + 32 + 256 = 448 weights.
HAND_TRAIN_GQA_CAUSAL = 3 * (2 * 4 * 448 + 256 + 640)


@pytest.mark.parametrize("overrides,expected", [
    (dict(), HAND_TRAIN_BIDIRECTIONAL),
    (dict(causal=True), HAND_TRAIN_CAUSAL),
    (dict(causal=True, mlp="swiglu"), HAND_TRAIN_SWIGLU_CAUSAL),
    (dict(causal=True, n_kv_heads=1), HAND_TRAIN_GQA_CAUSAL),
])
def test_train_flops_match_hand_count(overrides, expected):
  cfg = dataclasses.replace(TINY, **overrides)
  assert flops.train_flops_per_step(cfg, batch_size=1, seq_len=4) == expected


def test_flops_scale_with_batch_and_layers_but_not_head_and_logits():
  cfg = dataclasses.replace(TINY, causal=True)
  one = flops.train_flops_per_step(cfg, 1, 4)
  assert flops.train_flops_per_step(cfg, 3, 4) == 3 * one
  two_layers = dataclasses.replace(cfg, n_layers=2)
  # Only the block (matmuls + attention) doubles; the logits are counted once.
  assert flops.train_flops_per_step(two_layers, 1, 4) == one + 3 * (4096 + 256)


def test_explicit_head_dim_is_used():
  # 2 heads of 3 on d_model 8: q, k, v, o are 8 x 6 = 48 weights each.
  cfg = dataclasses.replace(TINY, head_dim=3)
  attention = 4 * 4 * 4 * 2 * 3  # 4 x L^2 x N x H, bidirectional
  expected = 3 * (2 * 4 * (4 * 48 + 256) + attention + 640)
  assert flops.train_flops_per_step(cfg, 1, 4) == expected


@pytest.mark.parametrize("kind,dtype,peak", [
    ("NVIDIA H100 80GB HBM3", "bfloat16", 989e12),
    ("NVIDIA H200", "bfloat16", 989e12),
    ("NVIDIA A100-SXM4-40GB", "bfloat16", 312e12),
    ("TPU v5 lite", "bfloat16", 197e12),
    ("TPU v5p", "bfloat16", 459e12),
    ("TPU v6 lite", "bfloat16", 918e12),
])
def test_device_peak_lookup(kind, dtype, peak):
  assert flops.device_peak(kind, dtype) == peak


@pytest.mark.parametrize("kind,dtype", [("cpu", "float32"), ("TFRT_CPU_0", "bfloat16"),
                                        ("Some Future Accelerator", "bfloat16"),
                                        ("TPU v5 lite", "float64")])
def test_device_peak_unknown_is_none(kind, dtype):
  assert flops.device_peak(kind, dtype) is None


def test_encoder_decoder_forward_flops_by_hand():
  # d=4, 2 heads of 2, d_ff=8 (ReLU), V=10, one block each side, source 3 and target 2 tokens.
  cfg = ModelConfig(arch="encoder_decoder", vocab_size=10, d_model=4, n_layers=1,
                    n_decoder_layers=1, n_heads=2, d_ff=8, mlp="relu")
  block = 4 * 2 * 2 * 2 + 4 * 2 * 2 * 2 + 2 * 4 * 8  # q+o, k+v, wi+wo weights: 128
  encoder = 2 * 3 * block + 4 * 3 * 3 * 2 * 2  # projections/MLP + bidirectional scores/sum
  decoder = (2 * 2 * block + 4 * 2 * 2 * 2 * 2 / 2  # projections/MLP + causal self-attention
             + 2 * 2 * (4 * 2 * 2) * 2  # cross q and o over the 2 target tokens
             + 2 * 3 * (4 * 2 * 2) * 2  # cross k and v over the 3 memory tokens
             + 4 * 2 * 3 * 2 * 2)  # cross scores and weighted sum
  logits = 2 * 2 * 4 * 10
  assert flops.encoder_decoder_forward_flops(cfg, 3, 2) == encoder + decoder + logits == 2032


# --- each task's head, and frozen weights (hand counts on TINY: L=4, D=8, V=10, C=3) -----------
# The blocks: 4096 weight-matmul FLOPs, attention 512 (bidirectional) or 256 (causal).
BLOCKS, ATTENTION = 4096, 512


def _param_shapes(model, *args, **kwargs):
  """path -> shape of `model`'s parameters, nothing allocated."""
  import jax
  from flax import linen as nn

  from llmjax.finetune import partition
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *args, **kwargs))
  return dict(partition.items(nn.unbox(shapes["params"])))


def _tokens():
  import jax.numpy as jnp
  return jnp.zeros((1, 4), jnp.int32)


def test_classify_counts_its_pooled_head_not_lm_logits():
  # BERT's pooler 2 x D x D = 128 and the classifier 2 x D x C = 48, once per sequence.
  pooled = flops.classify_forward(TINY, 4, num_classes=3, pooled=True)
  assert pooled.total == BLOCKS + ATTENTION + 128 + 48
  # A decoder read at its last token: the classifier alone.
  causal = dataclasses.replace(TINY, causal=True)
  last = flops.classify_forward(causal, 4, num_classes=3, pooled=False)
  assert last.total == BLOCKS + ATTENTION / 2 + 48
  assert flops.train_flops(pooled) == 3 * pooled.total


def test_mlm_counts_its_transform_and_logits():
  # transform 2 x L x D x D = 512, logits 2 x L x D x V = 640, at every position.
  assert flops.mlm_forward(TINY, 4).total == BLOCKS + ATTENTION + 512 + 640


def test_a_frozen_encoder_takes_no_weight_gradients():
  from llmjax.models import heads
  model = heads.SequenceClassifier(TINY, num_labels=3)
  params = _param_shapes(model, _tokens(), attention_mask_BL=_tokens() + 1)
  forward = flops.classify_forward(TINY, 4, 3, pooled=True)
  head_only = frozenset(p for p in params if p.startswith("classifier/"))
  # Frozen: the blocks' 4096 and the pooler's 128 weight-gradient FLOPs are never spent.
  assert flops.train_flops(forward, params, head_only) == 3 * forward.total - 4096 - 128
  assert flops.train_flops(forward, params, frozenset(params)) == 3 * forward.total
  assert flops.train_flops(forward, params, None) == 3 * forward.total


def test_lora_counts_weight_gradients_of_its_factors_only():
  from llmjax.models.peft import Peft
  from llmjax.models.transformer import Transformer
  cfg = dataclasses.replace(TINY, causal=True)
  model = Transformer(cfg, Peft(lora_targets=".*", lora_rank=2))
  params = _param_shapes(model, _tokens())
  lora = frozenset(p for p in params if "/lora/" in p)
  assert lora and all("/kernel" not in p for p in lora)
  forward = flops.lm_forward(cfg, 4)
  # Blocks (4096) and the tied logits (640) are frozen: train = 3 x forward - 4736.
  assert flops.train_flops(forward, params, lora) == 3 * (BLOCKS + ATTENTION / 2 + 640) - 4736
  # Half the blocks' weight matrices training (q, k, v, o of the one layer: 256 of 512 weights).
  attention = frozenset(p for p in params if "/attn/" in p and p.endswith("/kernel"))
  assert flops.train_flops(forward, params, attention) == 3 * forward.total - 2048 - 640


def test_encoder_decoder_groups_add_up_to_its_forward():
  cfg = ModelConfig(arch="encoder_decoder", vocab_size=10, d_model=4, n_layers=1,
                    n_decoder_layers=1, n_heads=2, d_ff=8, mlp="relu")
  forward = flops.encoder_decoder_forward(cfg, 3, 2)
  assert forward.total == 2032
  # Weight matmuls: encoder 2 x 3 x 128, decoder 2 x 2 x 128, cross q/o 2 x 2 x 32, cross k/v
  # 2 x 3 x 32, logits 2 x 2 x 4 x 10; the rest (2032 - 1760 = 272) is attention.
  assert [f for _, f in forward.weights] == [768, 512, 128, 192, 160]


def test_a_distillation_teacher_counts_one_forward():
  student = flops.lm_forward(dataclasses.replace(TINY, causal=True), 4)
  teacher = flops.lm_forward(dataclasses.replace(TINY, causal=True, n_layers=2), 4)
  with_teacher = dataclasses.replace(student, no_grad=teacher.total)
  assert flops.train_flops(with_teacher) == 3 * student.total + teacher.total


def test_an_image_model_with_a_frozen_backbone_counts_its_classifier_exactly():
  import jax.numpy as jnp

  from llmjax.models import cnn
  cfg = ModelConfig(arch="cnn", cnn_widths="2", cnn_hidden=4)
  # One 3x3 conv 1 -> 2 channels on 4x4 (2 x 16 x 9 x 1 x 2 = 576), pooled to 2x2, hidden
  # 2 x (2 x 2 x 2) x 4 = 64, classifier 2 x 4 x 3 = 24.
  forward = flops.image_forward(cfg, 4, 1, 3)
  assert forward.total == 576 + 64 + 24
  model = cnn.CNN(cfg, num_classes=3, in_channels=1, image_size=4)
  params = _param_shapes(model, jnp.zeros((1, 4, 4, 1)), deterministic=True)
  head = frozenset(p for p in params if p.startswith("classifier/"))
  assert flops.train_flops(forward, params, head) == 3 * forward.total - 576 - 64
