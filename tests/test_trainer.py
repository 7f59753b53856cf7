"""The Hugging Face Trainer across a mid-training vocabulary grow: checkpoints, resumes and
gradient accumulation, offline on CPU with tiny models and a tokenizer trained here on the
texts below."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
pytest.importorskip("accelerate")

from transformers import (  # noqa: E402
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

import growop  # noqa: E402
from conftest import assert_equal, train_bpe_tokenizer  # noqa: E402
from growop.transformers import CAPACITY_KEY, GrowVocabularyCallback, make_growable  # noqa: E402

transformers.logging.set_verbosity_error()

WORDS = ["exoplanet", "spectrograph", "magnetosphere", "heliosphere"]  # the tokens a grow adds
GROW_STEP, SAVE_STEP, MAX_STEPS = 3, 4, 8

PEOPLE = ("the miller", "the old sailor", "my sister", "the baker", "the teacher", "our neighbour")
PLACES = ("the harbour", "the old bridge", "the market", "the lighthouse")
# The tokenizer learns the base text; the new text uses WORDS, which it splits until the grow.
BASE_TEXT = [f"{person} walks to {place} when the wind is cold." for person in PEOPLE for place in PLACES]
NEW_TEXT = [
    f"{person} studies the {first} near the {second}."
    for person in PEOPLE
    for first, second in zip(WORDS, WORDS[1:] + WORDS[:1])
]


@pytest.fixture(scope="module")
def corpus() -> tuple[list[str], list[str]]:
    """(the tokenizer's text, the training texts: both topics in every batch)."""
    return BASE_TEXT, [line for pair in zip(BASE_TEXT, NEW_TEXT) for line in pair]


def tiny_llama(vocab: int, tied: bool, seed: int = 0, capacity: int | None = None):
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
        tie_word_embeddings=tied,
    )
    return make_growable(LlamaForCausalLM(config), capacity=capacity)


class Collate:
    """Tokenizes at batch time with the tokenizer the grow adds tokens to."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, texts: list[str]) -> dict[str, torch.Tensor]:
        batch = self.tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=32)
        labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
        return {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, "labels": labels}


def trainer_for(model, tokenizer, texts, out: Path, callbacks=(), **overrides) -> Trainer:
    settings = dict(
        max_steps=MAX_STEPS, per_device_train_batch_size=4, learning_rate=1e-2, logging_steps=1,
        save_steps=SAVE_STEP, report_to=[], use_cpu=True, seed=0, disable_tqdm=True,
        dataloader_num_workers=0,
    )
    settings.update(overrides)
    return Trainer(
        model=model, args=TrainingArguments(str(out), **settings), train_dataset=texts,
        data_collator=Collate(tokenizer), processing_class=tokenizer, callbacks=list(callbacks),
    )


def losses_after(trainer: Trainer, step: int) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry and entry["step"] > step]


def assert_same_state(model, expected: dict[str, torch.Tensor]) -> None:
    state = model.state_dict()
    assert state.keys() == expected.keys()
    for key, want in expected.items():
        assert_equal(state[key], want, what=key)


def uninterrupted(corpus, tmp_path: Path, tied: bool, capacity: int | None = None):
    """Trains MAX_STEPS steps, growing after GROW_STEP; returns the trainer, the final state
    and the checkpoint saved after the grow."""
    base, texts = corpus
    tokenizer = train_bpe_tokenizer(base)
    vocab = len(tokenizer)
    model = tiny_llama(vocab, tied, capacity=capacity)
    trainer = trainer_for(
        model, tokenizer, texts, tmp_path, [GrowVocabularyCallback(tokenizer, WORDS, step=GROW_STEP)]
    )
    trainer.train()
    assert model.get_input_embeddings().num_embeddings == model.config.vocab_size == vocab + len(WORDS)
    new_rows = model.get_input_embeddings().weight.detach()[vocab : vocab + len(WORDS)]
    assert not torch.equal(new_rows[0], new_rows[1])  # grown as the mean, then trained apart
    final = {key: value.clone() for key, value in model.state_dict().items()}
    return trainer, final, tmp_path / f"checkpoint-{SAVE_STEP}", vocab


@pytest.mark.parametrize(
    "tied, tight", [(True, False), (False, True)], ids=["tied", "untied_past_capacity"]
)
def test_resume_after_a_mid_training_grow_matches_the_uninterrupted_run(corpus, tmp_path, tied, tight):
    """A callback grows at step 3 (past the capacity when ``tight``), a checkpoint is saved
    at step 4; a fresh Trainer resumes a model resized to the checkpoint's tokenizer: the
    losses of steps 5 to 8 and the final weights are the uninterrupted run's, bit for bit."""
    base, texts = corpus
    capacity = len(train_bpe_tokenizer(base)) + 2 if tight else None
    trainer, final, checkpoint, vocab = uninterrupted(corpus, tmp_path / "run", tied, capacity)
    grown = trainer.model.get_input_embeddings()
    if tight:
        assert grown.capacity == max(growop.default_capacity(vocab + len(WORDS)), int(1.5 * (vocab + 2)))
    config = json.loads((checkpoint / "config.json").read_text())
    assert config["vocab_size"] == vocab + len(WORDS) and config[CAPACITY_KEY] == grown.capacity

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)  # the tokenizer comes from the checkpoint
    assert len(tokenizer) == vocab + len(WORDS)
    model = tiny_llama(vocab, tied, seed=1, capacity=capacity)
    model.resize_token_embeddings(len(tokenizer))
    resumed = trainer_for(
        model, tokenizer, texts, tmp_path / "resumed", [GrowVocabularyCallback(tokenizer, WORDS, step=GROW_STEP)]
    )
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert len(tokenizer) == vocab + len(WORDS)  # the callback's step was before the checkpoint
    assert losses_after(resumed, SAVE_STEP) == losses_after(trainer, SAVE_STEP)
    assert len(losses_after(resumed, SAVE_STEP)) == MAX_STEPS - SAVE_STEP
    assert_same_state(model, final)


def test_resume_into_a_model_rebuilt_from_the_checkpoints_config(corpus, tmp_path):
    """The checkpoint's config.json holds the grown vocabulary and the capacity: a model
    built from it and made growable (no capacity given) resumes exactly."""
    _, texts = corpus
    trainer, final, checkpoint, _ = uninterrupted(corpus, tmp_path / "run", tied=True)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model = make_growable(AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(checkpoint)))
    assert model.get_input_embeddings().capacity == trainer.model.get_input_embeddings().capacity
    resumed = trainer_for(model, tokenizer, texts, tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert losses_after(resumed, SAVE_STEP) == losses_after(trainer, SAVE_STEP)
    assert_same_state(model, final)


def test_resume_into_a_rebuilt_model_of_another_capacity(corpus, tmp_path):
    """A model rebuilt from a config that records no capacity gets the default capacity of
    the grown vocabulary, not the checkpoint's: the weights fit on load, the optimizer's
    state, loaded next, still has the checkpoint's row count."""
    _, texts = corpus
    trainer, final, checkpoint, _ = uninterrupted(corpus, tmp_path / "run", tied=True)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    config = AutoConfig.from_pretrained(checkpoint)
    delattr(config, CAPACITY_KEY)
    model = make_growable(AutoModelForCausalLM.from_config(config))
    assert model.get_input_embeddings().capacity != trainer.model.get_input_embeddings().capacity
    resumed = trainer_for(model, tokenizer, texts, tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert losses_after(resumed, SAVE_STEP) == losses_after(trainer, SAVE_STEP)
    for key, value in model.state_dict().items():
        want = final[key]
        if value.dim():  # the rows both capacities hold
            rows = min(value.shape[0], want.shape[0])
            value, want = value[:rows], want[:rows]
        assert_equal(value, want, what=key)


class GrowBetweenMicroBatches(TrainerCallback):
    """Grows after the first micro-batch of step ``step``, recording what the gradient
    accumulation does: the gradient after that micro-batch, the model just after the grow,
    the second micro-batch's inputs, and the gradient the optimizer steps with."""

    def __init__(self, tokenizer, step: int):
        self.tokenizer, self.step = tokenizer, step
        self.micro_batches = 0
        self.inputs: list[dict] = []
        self.first_grad = self.grown = self.final_grad = self.state_after = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        def record(module, args, kwargs):
            if state.global_step == self.step - 1:  # the micro-batches of step `step`
                self.inputs.append(dict(kwargs))

        model.register_forward_pre_hook(record, with_kwargs=True)

    def on_substep_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        if state.global_step != self.step - 1:
            return
        self.first_grad = model.get_input_embeddings().weight.grad.clone()
        self.tokenizer.add_tokens(WORDS)
        model.resize_token_embeddings(len(self.tokenizer), optimizer=optimizer)
        self.grown = copy.deepcopy(model)

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step - 1:
            self.final_grad = model.get_input_embeddings().weight.grad.clone()

    def on_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        if state.global_step == self.step - 1:
            self.state_after = {k: v.clone() for k, v in optimizer.state[model.get_input_embeddings().weight].items()
                                if isinstance(v, torch.Tensor) and v.dim() == 2}


def test_a_grow_between_micro_batches_accumulates_each_micro_batchs_own_gradient(corpus, tmp_path):
    """Gradient accumulation with a grow after the first micro-batch of a step: the step's
    gradient is the first micro-batch's (old vocabulary, nothing on the new rows) plus the
    second's (grown model), and the new rows' Adam state starts fresh at that step."""
    base, texts = corpus
    tokenizer = train_bpe_tokenizer(base)
    vocab = len(tokenizer)
    model = tiny_llama(vocab, tied=True)
    probe = GrowBetweenMicroBatches(tokenizer, step=2)
    trainer = trainer_for(
        model, tokenizer, texts, tmp_path, [probe], max_steps=3, per_device_train_batch_size=2,
        gradient_accumulation_steps=2, max_grad_norm=0.0, save_strategy="no",
    )
    trainer.train()
    assert probe.grown is not None and len(probe.inputs) == 2
    new = slice(vocab, vocab + len(WORDS))
    assert torch.count_nonzero(probe.first_grad[new]) == 0

    second = probe.inputs[1]
    assert trainer.model_accepts_loss_kwargs and "num_items_in_batch" in second  # loss not rescaled
    probe.grown.zero_grad(set_to_none=True)
    probe.grown(**second).loss.backward()
    second_grad = probe.grown.get_input_embeddings().weight.grad
    torch.testing.assert_close(probe.final_grad, probe.first_grad + second_grad, rtol=0, atol=0)

    betas = trainer.optimizer.param_groups[0]["betas"]
    exp_avg = probe.state_after["exp_avg"][new]
    torch.testing.assert_close(exp_avg, (1 - betas[0]) * probe.final_grad[new])  # a fresh first moment
    assert model.get_input_embeddings().num_embeddings == vocab + len(WORDS)


def test_grow_vocabulary_callback_refuses_a_model_that_is_not_growable(corpus, tmp_path):
    base, texts = corpus
    tokenizer = train_bpe_tokenizer(base)
    torch.manual_seed(0)
    plain = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1,
    ))
    trainer = trainer_for(plain, tokenizer, texts, tmp_path, [GrowVocabularyCallback(tokenizer, WORDS, step=1)])
    with pytest.raises(TypeError, match="not growable; pass growop.transformers.make_growable"):
        trainer.train()
    with pytest.raises(ValueError, match="tokens is empty"):
        GrowVocabularyCallback(tokenizer, [], step=1)
    with pytest.raises(ValueError, match="step must be >= 1"):
        GrowVocabularyCallback(tokenizer, WORDS, step=0)
