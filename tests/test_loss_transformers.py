"""make_growable(model, fused_loss=True): transformers' causal-LM loss computed by the head's
fused cross-entropy, against the stock model, offline on CPU with tiny models."""

from __future__ import annotations

import copy
import math
import pickle

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers import (  # noqa: E402
    BartConfig,
    BartForConditionalGeneration,
    Gemma2Config,
    Gemma2ForCausalLM,
    GemmaConfig,
    GemmaForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    PhiConfig,
    PhiForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Trainer,
    TrainingArguments,
)

import growop  # noqa: E402
from growop.transformers import make_growable, to_plain  # noqa: E402

transformers.logging.set_verbosity_error()

VOCAB = 40
SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)

FAMILIES = {
    "llama_tied": lambda: LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, tie_word_embeddings=True, **SMALL)),
    "llama_untied": lambda: LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, tie_word_embeddings=False, **SMALL)),
    "mistral": lambda: MistralForCausalLM(MistralConfig(vocab_size=VOCAB, **SMALL)),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(vocab_size=VOCAB, **SMALL)),
    "gemma": lambda: GemmaForCausalLM(GemmaConfig(vocab_size=VOCAB, head_dim=8, **SMALL)),
    "gpt2": lambda: GPT2LMHeadModel(GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=4, n_positions=64,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)),
    "gpt_neox": lambda: GPTNeoXForCausalLM(GPTNeoXConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, max_position_embeddings=64, hidden_dropout=0.0, attention_dropout=0.0)),
    "opt": lambda: OPTForCausalLM(OPTConfig(
        vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=1, num_attention_heads=4,
        max_position_embeddings=64, word_embed_proj_dim=32, dropout=0.0, attention_dropout=0.0,
        pad_token_id=1)),
    "phi": lambda: PhiForCausalLM(PhiConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, max_position_embeddings=64, resid_pdrop=0.0, embd_pdrop=0.0,
        attention_dropout=0.0)),
}


def _pair(name, **growable):
    """The stock model and a fused copy of it (same weights)."""
    torch.manual_seed(0)
    stock = FAMILIES[name]()
    stock.train()
    fused = make_growable(copy.deepcopy(stock), fused_loss=True, **growable)
    return stock, fused


def _batch(seed=0, vocab=VOCAB):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(vocab, (2, 11), generator=g)
    labels = ids.clone()
    labels[0, :4] = -100  # a prompt
    return ids, labels


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same_training_step(stock, fused, **call):
    stock_out = stock(**call)
    fused_out = fused(**call)
    assert fused_out.logits is None, "a fused training call returned logits"
    assert stock_out.logits is not None
    torch.testing.assert_close(fused_out.loss, stock_out.loss)
    stock_out.loss.backward()
    fused_out.loss.backward()
    stock_grads, fused_grads = _grads(stock), _grads(fused)
    assert stock_grads.keys() == fused_grads.keys()
    for name, g in stock_grads.items():
        f = fused_grads[name]
        torch.testing.assert_close(f[: g.shape[0]] if f.shape != g.shape else f, g, msg=name)
    stock.zero_grad()
    fused.zero_grad()


@pytest.mark.parametrize("name", FAMILIES)
def test_fused_loss_equals_the_stock_loss_and_returns_no_logits(name):
    stock, fused = _pair(name)
    ids, labels = _batch()
    _assert_same_training_step(stock, fused, input_ids=ids, labels=labels)
    # num_items_in_batch, an int or a tensor (the Trainer's count across micro-batches).
    for count in (7, torch.tensor(7)):
        _assert_same_training_step(stock, fused, input_ids=ids, labels=labels, num_items_in_batch=count)
    # shift_labels given: used as they are.
    shifted = torch.roll(labels, -1, dims=1)
    shifted[:, -1] = -100
    _assert_same_training_step(stock, fused, input_ids=ids, labels=labels, shift_labels=shifted)


@pytest.mark.parametrize("name", ["llama_tied", "phi"])
def test_static_shape_and_deactivated_tokens(name):
    """Masked columns (capacity slack, a deactivated token) never enter the fused softmax; the
    stock loss on the masked logits (the same model in evaluation mode, no dropout) gives them
    zero probability, so the two agree on live labels, gradients included."""
    _, fused = _pair(name, static_shape=True)
    ids, labels = _batch()
    labels[labels == 5] = 6
    fused.get_output_embeddings().deactivate([5])
    fused.eval()
    stock_out = fused(input_ids=ids, labels=labels)
    assert stock_out.logits.shape[-1] == fused.get_output_embeddings().capacity
    stock_out.loss.backward()
    expected = _grads(fused)
    fused.zero_grad()
    fused.train()
    fused_out = fused(input_ids=ids, labels=labels)
    assert fused_out.logits is None
    torch.testing.assert_close(fused_out.loss, stock_out.loss)
    fused_out.loss.backward()
    for name, g in _grads(fused).items():
        torch.testing.assert_close(g, expected[name], msg=name)


def test_evaluation_no_labels_and_no_grad_return_logits():
    stock, fused = _pair("llama_untied")
    ids, labels = _batch()
    with torch.no_grad():
        expected = stock(input_ids=ids, labels=labels)
    for what, run in (
        ("no labels", lambda: fused(input_ids=ids)),
        ("no grad", lambda: torch.no_grad()(lambda: fused(input_ids=ids, labels=labels))()),
        ("eval", lambda: fused.eval()(input_ids=ids, labels=labels)),
    ):
        out = run()
        torch.testing.assert_close(out.logits[..., :VOCAB], expected.logits, msg=what)
        if out.loss is not None:
            torch.testing.assert_close(out.loss, expected.loss, msg=what)
    fused.train()
    tuple_out = fused(input_ids=ids, labels=labels, return_dict=False)
    torch.testing.assert_close(tuple_out[0], expected.loss)
    assert not any(isinstance(v, torch.Tensor) and v.shape[-1:] == (0,) for v in tuple_out[1:])


def test_refused_models_and_heads_that_change_logits():
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        make_growable(Gemma2ForCausalLM(Gemma2Config(vocab_size=VOCAB, head_dim=8, **SMALL)), fused_loss=True)
    bart = BartForConditionalGeneration(BartConfig(
        vocab_size=VOCAB, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=16, decoder_ffn_dim=16, max_position_embeddings=32))
    with pytest.raises(ValueError, match="encoder-decoder"):
        make_growable(bart, fused_loss=True)
    assert not isinstance(bart.get_output_embeddings(), growop.GrowLinear)  # nothing changed
    # A hook that changes the head's output: the loss gets something else than the head's output.
    _, fused = _pair("llama_tied")
    fused.get_output_embeddings().register_forward_hook(lambda module, args, out: out * 2)
    ids, labels = _batch()
    with pytest.raises(RuntimeError, match="changes its head's logits before its loss"):
        fused(input_ids=ids, labels=labels)
    fused.eval()
    assert fused(input_ids=ids, labels=labels).logits is not None  # the stock path still runs


def test_to_plain_unfuses_and_the_model_pickles():
    stock, fused = _pair("llama_untied")
    ids, labels = _batch()
    clone = pickle.loads(pickle.dumps(fused))
    torch.testing.assert_close(clone(input_ids=ids, labels=labels).loss, stock(input_ids=ids, labels=labels).loss)
    assert clone(input_ids=ids, labels=labels).logits is None
    to_plain(fused)
    assert "_loss_function" not in fused.__dict__
    assert not fused._forward_hooks and not fused._forward_pre_hooks
    out = fused(input_ids=ids, labels=labels)
    assert out.logits is not None
    torch.testing.assert_close(out.loss, stock(input_ids=ids, labels=labels).loss)


def test_resize_then_fused_loss_trains_the_new_tokens():
    _, fused = _pair("llama_tied")
    opt = torch.optim.AdamW(fused.parameters(), lr=1e-2)
    fused.resize_token_embeddings(VOCAB + 3, optimizer=opt)
    ids, labels = _batch(vocab=VOCAB + 3)
    labels[1, 5:] = VOCAB + 2
    loss = fused(input_ids=ids, labels=labels).loss
    loss.backward()
    assert fused.get_output_embeddings().weight.grad[VOCAB + 2].abs().sum() > 0
    opt.step()


# ----------------------------------------------------------------------------- the Trainer


def _train(model, tmp_path, smoothing, steps=3):
    ids = torch.randint(VOCAB, (8, 11), generator=torch.Generator().manual_seed(3))
    data = [{"input_ids": row, "labels": row.clone()} for row in ids]
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=4,
        gradient_accumulation_steps=2, learning_rate=1e-2, label_smoothing_factor=smoothing,
        report_to=[], use_cpu=True, logging_steps=1, save_strategy="no", seed=0,
        dataloader_num_workers=0, disable_tqdm=True, data_seed=0, optim="sgd",
    )
    trainer = Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


@pytest.mark.parametrize("smoothing", [0.0, 0.1], ids=["plain", "label_smoothing"])
def test_trainer_matches_the_stock_model(smoothing, tmp_path, monkeypatch):
    """The same training run, stock and fused on a static_shape vocabulary (masked columns):
    the same losses and weights, with and without the Trainer's label smoothing. Without it
    the Trainer passes the labels (and num_items_in_batch) and the loss is fused; with it the
    Trainer keeps the labels and smooths over the logits, over the live columns."""
    stock, fused = _pair("llama_untied", static_shape=True)
    fused_calls = []
    fused_loss = growop.GrowLinear.cross_entropy
    monkeypatch.setattr(growop.GrowLinear, "cross_entropy",
                        lambda *a, **k: fused_calls.append(k) or fused_loss(*a, **k))
    stock_losses = _train(stock, tmp_path / "stock", smoothing)
    fused_losses = _train(fused, tmp_path / "fused", smoothing)
    assert len(fused_calls) == (0 if smoothing else 6)  # 3 steps of 2 micro-batches
    assert all(call["reduction"] == "sum" for call in fused_calls)  # over num_items_in_batch
    assert all(math.isfinite(v) for v in fused_losses)
    assert fused_losses == pytest.approx(stock_losses, rel=1e-4)
    for (name, p), q in zip(stock.named_parameters(), fused.parameters()):
        torch.testing.assert_close(q[: p.shape[0]] if q.shape != p.shape else q, p, msg=name,
                                   rtol=1e-4, atol=1e-5)


def test_stock_label_smoother_gives_inf_on_masked_columns_and_the_fused_model_does_not():
    from transformers.trainer_pt_utils import LabelSmoother

    stock, fused = _pair("llama_tied", static_shape=True)
    ids, labels = _batch()
    out = fused(input_ids=ids)  # what the Trainer gets once it has taken the labels away
    smoother = LabelSmoother(epsilon=0.1)
    assert LabelSmoother.__call__._growop_stock(smoother, out, labels, shift_labels=True).isinf()
    expected = smoother(stock(input_ids=ids), labels, shift_labels=True)
    torch.testing.assert_close(smoother(out, labels, shift_labels=True), expected)
    # A plain tensor's smoothing is the stock code's.
    plain_logits = torch.randn(2, 11, VOCAB)
    assert torch.equal(smoother([plain_logits], labels), LabelSmoother.__call__._growop_stock(
        smoother, [plain_logits], labels))
