"""Logical axis names: the only sharding vocabulary model code may use (never a mesh axis)."""

# Parameter axes.
VOCAB = "vocab"
EMBED = "embed"
MLP = "mlp"
HEADS = "heads"
KV_HEADS = "kv_heads"
HEAD_DIM = "head_dim"
LAYERS = "layers"
NORM = "norm"
POSITIONS = "positions"
TYPES = "types"
EXPERT = "expert"  # the expert dim of mixture-of-experts kernels (models/moe.py)

# Activation axes.
BATCH = "batch"
LENGTH = "length"
ACT_EMBED = "act_embed"
ACT_MLP = "act_mlp"
ACT_HEADS = "act_heads"
ACT_KV_HEADS = "act_kv_heads"
ACT_VOCAB = "act_vocab"
# Attention's keys and values along the sequence: never split (under context parallelism every
# shard's queries need every key, so these are gathered: MaxText's all-gather strategy).
KV_LENGTH = "kv_length"
ACT_EXPERT = "act_expert"  # tokens dispatched to experts: [B, E, C, D]
EXPERT_BATCH = "expert_batch"  # ... their batch dim (the batch axes less the expert axis)

# Image models (models/resnet.py, models/cnn.py). Conv kernels are [H, W, in, out] (HWIO).
CONV_H = "conv_height"
CONV_W = "conv_width"
CONV_IN = "conv_in"
CONV_OUT = "conv_out"
FEATURES = "features"  # the input of a dense layer over image features (pooled or flattened)
HIDDEN = "hidden"  # the small CNN's hidden dense layer
CLASSES = "classes"

# Recurrent networks (models/rnn.py): a cell's input kernels [in, hidden], recurrent kernels
# [state, hidden] and biases [hidden]; the head reads [rnn_out, ...].
RNN_IN = "rnn_in"
RNN_STATE = "rnn_state"
RNN_HIDDEN = "rnn_hidden"
RNN_OUT = "rnn_out"
