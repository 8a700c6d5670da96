"""Fine-tuning methods as a parameter mask plus, where needed, a wrapper (docs/finetune.md).

`spec` turns config.finetune into the model's extra parameters (`Peft`) and the trainable set;
`partition` keeps trainable and frozen parameters apart (gradients and optimizer state only for
the first); `setup` is what the loop calls; `lora` merges low-rank updates into their kernels;
`adalora` runs AdaLoRA's rank budget as an optax transformation; `prune` keeps config.prune's
masks the same way.
"""

from llmjax.finetune import prune
from llmjax.finetune.partition import merge, split
from llmjax.finetune.setup import (PARAMS_FILE, initialise_added, optimizer, params_report,
                                   plan, record_sparsity)
from llmjax.finetune.spec import peft_for, trainable_paths

__all__ = ["PARAMS_FILE", "initialise_added", "merge", "optimizer", "params_report",
           "peft_for", "plan", "prune", "record_sparsity", "split", "trainable_paths"]
