"""llmjax.eval.scoring and zeroshot: choice log-probs equal transformers' (GPT-2, Llama), packing
changes nothing, each bad input is named, and zero-/few-shot classification reports exactly what
its scores say, with shots drawn only from the shot pool."""

import dataclasses
import json

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

import _hf_helpers as H  # noqa: E402
from llmjax import hf  # noqa: E402
from llmjax.data.tokenizers import ByteTokenizer  # noqa: E402
from llmjax.errors import UserError  # noqa: E402
from llmjax.eval import scoring, zeroshot  # noqa: E402

ROWS = 2  # rows per device call; with the default row length (max_len 64) one compile per model
DECODERS = ("gpt2", "llama_gqa_untied")


@pytest.fixture(scope="module")
def decoders(tmp_path_factory):
  """name -> (llmjax model, params, torch model) for the tiny decoders, built once."""
  out = {}
  for name in DECODERS + ("gpt2_chars",):
    directory = tmp_path_factory.mktemp(name)
    ref_model = H.make(name, directory)
    if name == "gpt2_chars":
      H.save_char_tokenizer(directory)
    out[name] = (*hf.load(str(directory)), ref_model, str(directory))
  return out


def _problems(seed: int = 0):
  """Contexts and 3 choices each, of mixed lengths; the last example needs a row to itself."""
  rng = np.random.default_rng(seed)
  ids = lambda n: rng.integers(0, H.VOCAB, n).tolist()  # noqa: E731
  contexts = [ids(int(rng.integers(1, 20))) for _ in range(5)] + [ids(55)]
  choices = [[ids(int(rng.integers(1, 7))) for _ in range(3)] for _ in contexts]
  return contexts, choices


def _assert_packed(model, contexts, choices):
  lengths = [len(x) + len(y) - 1 for x, row in zip(contexts, choices) for y in row]
  assert len(scoring.pack_rows(lengths, model.cfg.max_len)) < len(lengths) / 2


def _torch_logprobs(ref_model, contexts, choices) -> np.ndarray:
  """Summed log p(choice | context) by a forward on context + choice, log_softmax, gather."""
  import torch
  out = np.zeros((len(contexts), len(choices[0])), np.float64)
  for n, context in enumerate(contexts):
    for c, choice in enumerate(choices[n]):
      with torch.no_grad():
        logits = ref_model(input_ids=torch.tensor([context + choice])).logits[0]
      logp = torch.log_softmax(logits[len(context) - 1:-1].double(), dim=-1)
      out[n, c] = logp[torch.arange(len(choice)), torch.tensor(choice)].sum().item()
  return out


@pytest.mark.parametrize("name", DECODERS)
def test_choice_logprobs_equal_transformers(decoders, name):
  model, params, ref_model, _ = decoders[name]
  contexts, choices = _problems()
  _assert_packed(model, contexts, choices)
  ours = scoring.choice_logprobs(model, params, contexts, choices, rows_per_batch=ROWS)
  ref = _torch_logprobs(ref_model, contexts, choices)
  assert ours.dtype == np.float32 and ours.shape == (6, 3)
  assert np.abs(ref).min() > 1  # the comparison means something
  np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-4)


@pytest.mark.parametrize("name", DECODERS)
def test_packed_scores_equal_each_sequence_alone(decoders, name):
  model, params, _, _ = decoders[name]
  contexts, choices = _problems(seed=1)
  _assert_packed(model, contexts, choices)
  scores = scoring.score_choices(model, params, contexts, choices, rows_per_batch=ROWS)
  compiled = scoring._target_logprobs._cache_size()
  alone = np.array([[scoring.choice_logprobs(model, params, [x], [[y]], rows_per_batch=ROWS)[0, 0]
                     for y in row] for x, row in zip(contexts, choices)])
  np.testing.assert_allclose(scores.logprobs, alone, rtol=0, atol=1e-5)
  assert scoring._target_logprobs._cache_size() == compiled  # fixed shapes: no recompiles
  np.testing.assert_array_equal(scores.n_tokens, [[len(y) for y in row] for row in choices])
  normalised = scoring.choice_scores(model, params, contexts, choices, length_normalize=True,
                                     rows_per_batch=ROWS)
  np.testing.assert_allclose(normalised, alone / scores.n_tokens, rtol=1e-6)


def test_pack_rows_is_best_fit_longest_first_and_a_full_length_sequence_stands_alone():
  # 64 fills a row; 60, 30, 30 open rows; 5 fits none of them; 4 and 2 take the tightest gaps.
  assert scoring.pack_rows([5, 60, 30, 30, 4, 64, 2], 64) == [[5], [1, 4], [2, 3, 6], [0]]


@pytest.mark.parametrize("contexts, choices, message", [
    ([[]], [[[1]]], r"example 0 has an empty context"),
    ([[1], [2]], [[[1], [2]], [[3]]], r"example 1 has 1 choices but example 0 has 2"),
    ([[1], [2]], [[[1]], [[3], []]], r"example 1 has 2 choices but example 0 has 1"),
    ([[1], [2]], [[[1], [2]], [[3], []]], r"example 1 choice 1 is empty"),
    ([[1] * 60], [[[1] * 5]], r"example 0 choice 0: context \(60 tokens\) \+ choice \(5\) = 65 "
                              r"tokens, more than max_len 64"),
    ([[1]], [[[H.VOCAB]]], r"example 0 choice 0: token id 100 is outside the vocabulary"),
    ([[1], [2]], [[[1]]], r"2 contexts but 1 choice lists"),
])
def test_bad_inputs_are_named(decoders, contexts, choices, message):
  model, params, _, _ = decoders["gpt2"]
  with pytest.raises(UserError, match=message):
    scoring.choice_logprobs(model, params, contexts, choices)


def test_bad_models_and_sizes_are_named(decoders):
  model, params, _, _ = decoders["gpt2"]
  with pytest.raises(UserError, match="context.*= 9 tokens, more than max_len 8"):
    scoring.choice_logprobs(model, params, [[1] * 6], [[[2, 3, 4]]], max_len=8)
  with pytest.raises(UserError, match="rows_per_batch must be >= 1"):
    scoring.choice_logprobs(model, params, [[1]], [[[2]]], rows_per_batch=0)
  encoder = model.clone(cfg=dataclasses.replace(model.cfg, causal=False))
  with pytest.raises(UserError, match="needs a causal decoder.*Transformer \\(bidirectional\\)"):
    scoring.choice_logprobs(encoder, params, [[1]], [[[2]]])


# --- zero-/few-shot classification --------------------------------------------------------------

TEMPLATE = "{text} is"
LABELS = ["good", "bad"]
DATA = [("nice cake", "good"), ("cold tea", "bad"), ("warm sun", "good"), ("sad song", "bad"),
        ("fun game", "good"), ("wet sock", "bad")]
POOL = [("kind dog", "good"), ("old bread", "bad"), ("big win", "good"), ("lost key", "bad"),
        ("soft bed", "good"), ("loud noise", "bad")]


def _write(path, rows):
  path.write_text("".join(json.dumps({"text": t, "label": l}) + "\n" for t, l in rows))
  return str(path)


def _shot_lines(prompt):
  return prompt.split(zeroshot.SHOT_END)[:-1]


def test_shots_come_from_the_pool_only_and_are_deterministic_for_a_seed():
  prompts = zeroshot.build_prompts(DATA, LABELS, TEMPLATE, 2, POOL, seed=3)
  assert prompts == zeroshot.build_prompts(DATA, LABELS, TEMPLATE, 2, POOL, seed=3)
  assert prompts != zeroshot.build_prompts(DATA, LABELS, TEMPLATE, 2, POOL, seed=4)
  pool_lines = {f"{t} is {l}" for t, l in POOL}
  for prompt, (text, _) in zip(prompts, DATA):
    shots = _shot_lines(prompt)
    assert len(shots) == len(set(shots)) == 2 and set(shots) <= pool_lines
    assert prompt.split(zeroshot.SHOT_END)[-1] == f"{text} is"
  assert zeroshot.build_prompts(DATA, LABELS, TEMPLATE) == [f"{t} is" for t, _ in DATA]


def test_encode_pair_keeps_bos_drops_eos_and_scores_the_label_tokens_only():
  class _WithSpecials:  # a transformers tokenizer that adds BOS (7) and EOS (8)
    def encode(self, text, add_special_tokens=True):
      ids = [ord(ch) for ch in text]
      return [7] + ids + [8] if add_special_tokens else ids

  class _Text:  # the shape of llmjax.hf.TextTokenizer
    hf = _WithSpecials()

    def encode(self, text):
      return self.hf.encode(text)

  context, choices = zeroshot.encode_pair(_Text(), "ab", [" c", " dd"])
  assert context == [7, ord("a"), ord("b")]
  assert choices == [[ord(" "), ord("c")], [ord(" "), ord("d"), ord("d")]]
  assert zeroshot.encode_pair(ByteTokenizer(), "ab", [" c"]) == ([97, 98], [[32, 99]])


@pytest.mark.parametrize("length_normalize", [False, True])
def test_classify_reports_the_accuracy_of_its_own_argmax(decoders, tmp_path, length_normalize):
  model, params, _, directory = decoders["gpt2_chars"]
  tokenizer = hf.TextTokenizer(hf.load_tokenizer(directory))
  examples = zeroshot.read_jsonl(_write(tmp_path / "data.jsonl", DATA), "text", "label")
  pool = zeroshot.read_jsonl(_write(tmp_path / "pool.jsonl", POOL), "text", "label")
  assert examples == DATA and examples[2].source.endswith("data.jsonl:3")
  result = zeroshot.classify(model, params, tokenizer, examples, LABELS, TEMPLATE, shots=2,
                             shot_pool=pool, length_normalize=length_normalize, seed=5,
                             rows_per_batch=ROWS)
  # Independently: the char tokenizer has no specials and no merges, so encode() pieces concatenate.
  prompts = zeroshot.build_prompts(DATA, LABELS, TEMPLATE, 2, POOL, seed=5)
  contexts = [tokenizer.encode(p) for p in prompts]
  choices = [[tokenizer.encode(" " + label) for label in LABELS]] * len(DATA)
  scores = scoring.choice_logprobs(model, params, contexts, choices, rows_per_batch=ROWS)
  if length_normalize:
    scores = scores / np.array([[len(c) for c in choices[0]]])
  np.testing.assert_allclose(result["scores"], scores, rtol=1e-6)
  gold = np.array([LABELS.index(label) for _, label in DATA])
  assert result["predictions"] == [LABELS[i] for i in scores.argmax(axis=1)]
  assert result["report"]["accuracy"] == pytest.approx(np.mean(scores.argmax(axis=1) == gold))
  assert np.sum(result["confusion"]) == len(DATA)
  assert [c["name"] for c in result["report"]["per_class"]] == LABELS


def test_bad_files_labels_and_templates_are_named(tmp_path):
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"text": "a", "label": "good"}\n{"text": "b", "label": \n')
  with pytest.raises(UserError, match=r"bad.jsonl:2: not valid JSON"):
    zeroshot.read_jsonl(str(bad), "text", "label")
  bad.write_text('{"text": "a", "label": "good"}\n\n{"text": "b", "y": 1}\n')
  with pytest.raises(UserError, match=r"bad.jsonl:3: no 'label' key"):
    zeroshot.read_jsonl(str(bad), "text", "label")
  bad.write_text('["a", "good"]\n')
  with pytest.raises(UserError, match=r"bad.jsonl:1: expected a JSON object"):
    zeroshot.read_jsonl(str(bad), "text", "label")
  with pytest.raises(UserError, match=r"missing.jsonl: cannot read"):
    zeroshot.read_jsonl(str(tmp_path / "missing.jsonl"), "text", "label")
  data = zeroshot.read_jsonl(_write(tmp_path / "d.jsonl", DATA[:2] + [("meh", "so-so")]),
                             "text", "label")
  with pytest.raises(UserError, match=r"d.jsonl:3: label 'so-so' is not one of the labels"):
    zeroshot.build_prompts(data, LABELS, TEMPLATE)
  with pytest.raises(UserError, match=r"shot 1: label 'x' is not one of"):
    zeroshot.build_prompts(DATA, LABELS, TEMPLATE, 1, [("a", "good"), ("b", "x")])
  with pytest.raises(UserError, match=r"has no \{text\} placeholder"):
    zeroshot.build_prompts(DATA, LABELS, "Review: {txt}")
  with pytest.raises(UserError, match=r"shots=2 needs a shot pool"):
    zeroshot.build_prompts(DATA, LABELS, TEMPLATE, 2)
  with pytest.raises(UserError, match=r"shots=7 but the shot pool has only 6"):
    zeroshot.build_prompts(DATA, LABELS, TEMPLATE, 7, POOL)
