"""growop.transformers: Hugging Face causal LMs whose vocabulary grows in place, offline on CPU."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

import growop  # noqa: E402
from conftest import train_bpe_tokenizer  # noqa: E402
from growop.measure import measure_allocations  # noqa: E402
from growop.transformers import make_growable, to_plain  # noqa: E402

transformers.logging.set_verbosity_error()

NEW_WORDS = ["exoplanet", "spectrograph", "magnetosphere", "protostar"]
BASE_TEXT = [
    "the miller walks to the market in the morning.",
    "the sea is calm, so the old sailor stays quiet.",
    "after the rain the baker paints the old bridge.",
    "when the wind is cold, my sister waits near the harbour.",
] * 8
NEW_TEXT = [
    "the astronomer measures the exoplanet with the spectrograph.",
    "the protostar is bright, so the student maps the magnetosphere.",
]

MODELS = {
    "llama_tied": lambda vocab: LlamaForCausalLM(_llama_config(vocab, tied=True)),
    "llama_untied": lambda vocab: LlamaForCausalLM(_llama_config(vocab, tied=False)),
    "gpt2": lambda vocab: GPT2LMHeadModel(
        GPT2Config(
            vocab_size=vocab, n_embd=32, n_layer=1, n_head=4, n_positions=64,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        )
    ),
}


def _llama_config(vocab: int, tied: bool) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tied,
    )


@pytest.fixture(scope="module")
def tokenizer():
    """A byte-level BPE tokenizer trained here, offline, on the base text."""
    return train_bpe_tokenizer(BASE_TEXT)


def is_tied(model) -> bool:
    return model.get_output_embeddings().weight is model.get_input_embeddings().weight


def batch(tokenizer, texts) -> torch.Tensor:
    return tokenizer(texts, return_tensors="pt", padding=True).input_ids


# ----------------------------------------------------------------------------- make_growable


@pytest.mark.parametrize("name", MODELS)
def test_make_growable_swaps_modules_in_place_and_keeps_logits(name, tokenizer):
    torch.manual_seed(0)
    model = MODELS[name](len(tokenizer))
    tied = is_tied(model)
    x = batch(tokenizer, BASE_TEXT[:2])
    expected = model(input_ids=x).logits
    assert make_growable(model) is model
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert isinstance(embedding, growop.GrowEmbedding) and isinstance(embedding, nn.Embedding)
    assert isinstance(head, growop.GrowLinear) and isinstance(head, nn.Linear)
    assert embedding.capacity == head.capacity == growop.default_capacity(len(tokenizer))
    assert is_tied(model) == tied == (name != "llama_untied")
    torch.testing.assert_close(model(input_ids=x).logits, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="already growop modules"):
        make_growable(model)


# ----------------------------------------------------------------------------- training across a grow


@pytest.mark.parametrize("name", MODELS)
def test_resize_in_place_keeps_parameters_and_optimizer_state(name, tokenizer):
    tokenizer = copy.deepcopy(tokenizer)
    model = make_growable(MODELS[name](len(tokenizer)))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    params = [(p, p.data_ptr()) for p in model.parameters()]
    x = batch(tokenizer, BASE_TEXT[:4])
    for _ in range(3):
        opt.zero_grad()
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
    weight = model.get_input_embeddings().weight
    head_weight = model.get_output_embeddings().weight
    before = {
        (id(p), key): value.clone()
        for p in {id(weight): weight, id(head_weight): head_weight}.values()
        for key, value in opt.state[p].items()
        if isinstance(value, torch.Tensor) and value.dim() == 2
    }
    old_vocab = len(tokenizer)
    tokenizer.add_tokens(NEW_WORDS)
    embedding = model.resize_token_embeddings(len(tokenizer), optimizer=opt)

    assert embedding is model.get_input_embeddings()
    assert [(p, p.data_ptr()) for p in model.parameters()] == params  # nothing reallocated
    assert model.config.vocab_size == len(tokenizer) == embedding.num_embeddings
    for p in (weight, head_weight):
        for key, value in opt.state[p].items():
            if (id(p), key) in before:
                assert torch.equal(value[:old_vocab], before[id(p), key][:old_vocab])  # bit-identical
                assert torch.count_nonzero(value[old_vocab : len(tokenizer)]) == 0

    new_x = batch(tokenizer, NEW_TEXT)
    assert int(new_x.max()) >= old_vocab  # the text uses the new tokens
    losses = []
    for _ in range(15):
        opt.zero_grad()
        out = model(input_ids=new_x, labels=new_x)
        assert out.logits.shape[-1] == model.config.vocab_size
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert losses[-1] < losses[0] - 0.5


def test_mean_resizing_gives_the_mean_of_live_rows_and_untied_heads_their_own():
    model = make_growable(MODELS["llama_untied"](50))
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    embedding.deactivate([3])
    live = embedding.active[:50]
    emb_mean = embedding.weight.detach()[:50][live].mean(0)
    head_mean = head.weight.detach()[:50][live].mean(0)
    model.resize_token_embeddings(52)
    torch.testing.assert_close(embedding.weight.detach()[50:52], emb_mean.expand(2, -1))
    torch.testing.assert_close(head.weight.detach()[50:52], head_mean.expand(2, -1))
    model.resize_token_embeddings(300, mean_resizing=False)
    drawn = embedding.weight.detach()[52:300]
    assert abs(float(drawn.std()) - model.config.initializer_range) < 0.004
    head_drawn = head.weight.detach()[52:300]  # the untied head draws its own rows
    assert abs(float(head_drawn.std()) - model.config.initializer_range) < 0.004
    assert not torch.equal(head_drawn, drawn)


@pytest.mark.parametrize("mean_resizing", [True, False], ids=["mean", "plain"])
def test_resize_within_capacity_allocates_nothing(mean_resizing):
    model = make_growable(MODELS["llama_tied"](50), capacity=64)
    weight = model.get_input_embeddings().weight
    _, allocated, _ = measure_allocations(
        lambda: model.resize_token_embeddings(58, mean_resizing=mean_resizing)
    )
    # The mean is reduced into the first new row; a scalar or two of bookkeeping at most.
    assert allocated <= (16 if mean_resizing else 0), allocated
    assert model.get_input_embeddings().weight is weight and model.config.vocab_size == 58


def test_static_shape_logits_are_capacity_wide():
    model = make_growable(MODELS["llama_tied"](50), capacity=64, static_shape=True)
    x = torch.tensor([[1, 2, 3]])
    logits = model(input_ids=x, labels=x).logits
    assert logits.shape[-1] == model.config.vocab_size == 64
    assert (logits[..., 50:] == torch.finfo(logits.dtype).min).all()
    model.resize_token_embeddings(55)
    assert model.config.vocab_size == 64 and model.get_input_embeddings().num_embeddings == 55
    logits = model(input_ids=x).logits
    assert (logits[..., 55:] == torch.finfo(logits.dtype).min).all()
    assert (logits[..., :55] > -1e4).all()


def test_pad_to_multiple_of_rounds_the_capacity_and_padding_is_never_live():
    model = make_growable(MODELS["llama_tied"](50), capacity=60)
    opt = torch.optim.AdamW(model.parameters())
    embedding = model.resize_token_embeddings(52, pad_to_multiple_of=32, optimizer=opt)
    assert embedding.capacity == 64 and embedding.num_embeddings == 52
    assert model.get_output_embeddings().weight is embedding.weight
    assert embedding.active.tolist() == [True] * 52 + [False] * 12
    assert model.config.vocab_size == model(input_ids=torch.tensor([[51]])).logits.shape[-1] == 52
    with pytest.raises(IndexError):
        embedding(torch.tensor([53]))
    ptr = embedding.weight.data_ptr()
    model.resize_token_embeddings(63, pad_to_multiple_of=32, optimizer=opt)  # fits: in place
    assert embedding.capacity == 64 and embedding.weight.data_ptr() == ptr
    model.resize_token_embeddings(65, pad_to_multiple_of=32, optimizer=opt)  # 1.5 x 64, rounded
    assert embedding.capacity == 96 and embedding.num_embeddings == 65


def test_resize_past_capacity_keeps_parameters_and_optimizer_state():
    model = make_growable(MODELS["llama_untied"](50), capacity=52)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = torch.tensor([[1, 2, 3, 49]])
    model(input_ids=x, labels=x).loss.backward()
    opt.step()
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    params = [embedding.weight, head.weight]
    moments = [opt.state[p]["exp_avg"].clone() for p in params]
    model.resize_token_embeddings(60, optimizer=opt)
    assert embedding.capacity == head.capacity == 78  # max(default_capacity(60), 1.5 x 52)
    assert [embedding.weight, head.weight] == params
    for p, before in zip(params, moments):
        assert opt.state[p]["exp_avg"].shape == p.shape
        assert torch.equal(opt.state[p]["exp_avg"][:50], before[:50])
    x = torch.tensor([[1, 58, 3, 59]])
    opt.zero_grad()
    model(input_ids=x, labels=x).loss.backward()
    opt.step()
    assert torch.count_nonzero(opt.state[embedding.weight]["exp_avg"][58]) > 0


def test_shrinking_raises_and_changes_nothing():
    model = make_growable(MODELS["llama_tied"](50))
    with pytest.raises(ValueError, match="cannot shrink the vocabulary from 50 to 40.*deactivate"):
        model.resize_token_embeddings(40)
    assert model.get_input_embeddings().num_embeddings == model.config.vocab_size == 50
    with pytest.raises(ValueError, match="pad_to_multiple_of must be >= 1"):
        model.resize_token_embeddings(52, pad_to_multiple_of=0)
    assert model.get_input_embeddings().num_embeddings == 50


# ----------------------------------------------------------------------------- generation


@pytest.mark.parametrize("name", ["llama_tied", "gpt2"])
def test_generate_and_transition_scores_never_emit_ids_that_are_not_live(name, tokenizer):
    model = make_growable(MODELS[name](len(tokenizer)), static_shape=(name == "gpt2"))
    model.resize_token_embeddings(len(tokenizer) + 4)
    embedding = model.get_input_embeddings()
    allowed = torch.tensor([5, 17, 40, len(tokenizer) + 2])
    masked = torch.ones(embedding.num_embeddings, dtype=torch.bool)
    masked[allowed] = False
    embedding.deactivate(masked.nonzero().flatten())
    prompt = allowed[:2].view(1, 2)
    greedy = model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=5)
    torch.manual_seed(0)
    sampled = model.generate(
        prompt.expand(8, 2),
        max_new_tokens=12,
        do_sample=True,
        temperature=1.5,
        pad_token_id=5,
        output_scores=True,
        return_dict_in_generate=True,
    )
    scores = model.compute_transition_scores(sampled.sequences, sampled.scores, normalize_logits=True)
    assert scores.shape == (8, 12) and torch.isfinite(scores).all()
    for sequence in (greedy, sampled.sequences):
        assert torch.isin(sequence[:, 2:], allowed).all()


# ----------------------------------------------------------------------------- export


@pytest.mark.parametrize("name", MODELS)
def test_to_plain_save_pretrained_from_pretrained_round_trip(name, tokenizer, tmp_path):
    model = make_growable(MODELS[name](len(tokenizer)), static_shape=(name == "gpt2"))
    tied = is_tied(model)
    model.resize_token_embeddings(len(tokenizer) + 3)
    x = torch.tensor([[1, 2, len(tokenizer) + 2, 7]])
    expected = model(input_ids=x).logits[..., : len(tokenizer) + 3]
    assert to_plain(model) is model
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert type(embedding) is nn.Embedding and type(head) is nn.Linear
    assert is_tied(model) == tied
    assert model.config.vocab_size == len(tokenizer) + 3
    assert "resize_token_embeddings" not in model.__dict__ and "_growop_load_hook" not in model.__dict__
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert is_tied(loaded) == tied
    torch.testing.assert_close(loaded(input_ids=x).logits, expected, rtol=1e-5, atol=1e-5)


def test_to_plain_refuses_deactivated_tokens():
    model = make_growable(MODELS["llama_tied"](50))
    model.get_input_embeddings().deactivate([4])
    with pytest.raises(ValueError, match=r"tokens \[4\] are deactivated"):
        to_plain(model)
    assert isinstance(model.get_input_embeddings(), growop.GrowEmbedding)


# ----------------------------------------------------------------------------- DDP


DDP_VOCAB, DDP_NEW = 60, 4


def _ddp_batches() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    before = torch.randint(0, DDP_VOCAB, (4, 12), generator=gen)
    after = torch.randint(0, DDP_VOCAB + DDP_NEW, (4, 12), generator=gen)
    return before, after


def _ddp_train(model, opt, resize, rows=slice(None)) -> None:
    before, after = _ddp_batches()
    for x in (before, before, None, after, after):
        if x is None:
            resize(DDP_VOCAB + DDP_NEW, optimizer=opt)
            continue
        opt.zero_grad()
        model(input_ids=x[rows], labels=x[rows]).loss.backward()
        opt.step()


def ddp_resize_within_capacity(rank: int) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(rank)  # ranks start different: wrapping broadcasts rank 0's weights
    inner = make_growable(MODELS["llama_tied"](DDP_VOCAB))
    model = DDP(inner)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    params = [(p, p.data_ptr()) for p in inner.parameters()]
    _ddp_train(model, opt, inner.resize_token_embeddings, rows=slice(2 * rank, 2 * rank + 2))
    assert [(p, p.data_ptr()) for p in inner.parameters()] == params  # no re-wrap needed
    return {k: v for k, v in inner.state_dict().items() if isinstance(v, torch.Tensor)}


def test_ddp_resize_within_capacity_matches_single_process(tmp_path):
    from conftest import run_on_ranks

    # Each process imports transformers first: allow for it on a loaded machine.
    results = run_on_ranks(ddp_resize_within_capacity, tmp_path, timeout=150)
    torch.manual_seed(0)
    model = make_growable(MODELS["llama_tied"](DDP_VOCAB))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _ddp_train(model, opt, model.resize_token_embeddings)
    expected = model.state_dict()
    assert model.get_input_embeddings().num_embeddings == DDP_VOCAB + DDP_NEW
    for rank, state in enumerate(results):
        for key, value in state.items():
            torch.testing.assert_close(value, expected[key], rtol=1e-5, atol=1e-5, msg=f"rank {rank}: {key}")


@pytest.mark.parametrize("name", ["llama_tied", "llama_untied"])
def test_state_dict_of_a_grown_model_loads_into_a_growable_one(name):
    torch.manual_seed(0)
    model = make_growable(MODELS[name](50), capacity=64)
    model.resize_token_embeddings(55)
    model.get_input_embeddings().deactivate([7])
    state = model.state_dict()
    other = make_growable(MODELS[name](50), capacity=64)
    other.load_state_dict(state)
    embedding = other.get_input_embeddings()
    assert embedding.num_embeddings == other.get_output_embeddings().out_features == 55
    assert is_tied(other) == (name == "llama_tied")
    assert other.config.vocab_size == 55
    x = torch.tensor([[1, 54, 3]])
    got, want = other(input_ids=x, labels=x), model(input_ids=x, labels=x)
    torch.testing.assert_close(got.logits, want.logits)
    torch.testing.assert_close(got.loss, want.loss)
    with pytest.raises(IndexError, match="id 7 is a deactivated row"):
        embedding(torch.tensor([7]))


def test_make_growable_refuses_what_it_cannot_convert():
    with pytest.raises(TypeError, match="expects a transformers PreTrainedModel, got Linear"):
        make_growable(nn.Linear(2, 2))
    model = MODELS["llama_tied"](50)
    model.lm_head = nn.Linear(32, 40, bias=False)  # untied and of another width
    with pytest.raises(ValueError, match="the head has 40 outputs but the embedding 50 rows"):
        make_growable(model)
    assert type(model.get_input_embeddings()) is nn.Embedding  # nothing swapped


# ----------------------------------------------------------------------------- other architectures


def _gemma(vocab: int):
    from transformers import GemmaConfig, GemmaForCausalLM

    return GemmaForCausalLM(GemmaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
    ))


def _bart(vocab: int):
    from transformers import BartConfig, BartForConditionalGeneration

    return BartForConditionalGeneration(BartConfig(
        vocab_size=vocab, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, scale_embedding=True,
        max_position_embeddings=32, dropout=0.0,
    ))


@pytest.mark.parametrize("build", [_gemma, _bart], ids=["gemma", "bart"])
def test_scaled_embeddings_and_logit_biases_carry_over(build):
    """Gemma's and BART's input embeddings are nn.Embedding subclasses that multiply by
    embed_scale, and BART adds a final_logits_bias as wide as the logits: logits are the
    model's own after make_growable, stay right across a resize, and to_plain gives back
    the model's own embedding class."""
    torch.manual_seed(0)
    model = build(50).eval()
    plain_class = type(model.get_input_embeddings())
    x = torch.randint(0, 50, (2, 7))

    def logits(m):
        kwargs = {"decoder_input_ids": x} if hasattr(m, "final_logits_bias") else {}
        return m(input_ids=x, **kwargs).logits

    before = logits(model)
    make_growable(model)
    assert isinstance(model.get_input_embeddings(), (plain_class, growop.GrowEmbedding))
    assert isinstance(model.get_input_embeddings(), plain_class)
    torch.testing.assert_close(logits(model), before)
    model.resize_token_embeddings(56)
    grown = logits(model)
    assert grown.shape[-1] == 56
    torch.testing.assert_close(grown[..., :50], before)
    if hasattr(model, "final_logits_bias"):  # a grow on the embedding itself, and loads
        model.get_input_embeddings().grow(2)
        assert logits(model).shape[-1] == 58
        fresh = make_growable(build(50).eval())
        fresh.load_state_dict(model.state_dict())
        torch.testing.assert_close(logits(fresh), logits(model))
        grown = logits(model)
    restored = copy.deepcopy(model)
    to_plain(restored)
    assert type(restored.get_input_embeddings()) is plain_class
    torch.testing.assert_close(logits(restored), grown)
    torch.testing.assert_close(logits(pickle.loads(pickle.dumps(model))), grown)


def test_make_growable_keeps_frozen_heads_hooks_and_initialised_weights():
    model = MODELS["llama_untied"](50)
    model.requires_grad_(False)  # frozen, as for adapter training
    model.enable_input_require_grads()  # a forward hook on the input embeddings
    make_growable(model)
    assert not model.lm_head.weight.requires_grad
    x = torch.randint(0, 50, (1, 5))
    assert model.get_input_embeddings()(x).requires_grad
    model.disable_input_require_grads()  # its handle still removes the hook
    assert not model.get_input_embeddings()(x).requires_grad
    weight = model.get_input_embeddings().weight.detach().clone()
    model.init_weights()  # transformers leaves initialised modules alone
    assert torch.equal(model.get_input_embeddings().weight, weight)


def test_resize_refuses_heads_wrapped_by_peft_and_changes_nothing():
    peft = pytest.importorskip("peft")
    model = make_growable(MODELS["llama_tied"](50))
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj", "lm_head"]))
    with pytest.raises(TypeError, match="wrapped by a .*resize before adding the adapter"):
        wrapped.resize_token_embeddings(56)
    assert model.get_input_embeddings().num_embeddings == 50 and model.config.vocab_size == 50


def test_mean_resizing_without_live_tokens_raises_before_reallocating():
    model = make_growable(MODELS["llama_tied"](50), capacity=52)
    embedding = model.get_input_embeddings()
    embedding.deactivate(range(50))
    weight = embedding.weight
    with pytest.raises(ValueError, match="needs at least one live token"):
        model.resize_token_embeddings(60)
    assert embedding.capacity == 52 and embedding.weight is weight and embedding.num_embeddings == 50


# ----------------------------------------------------------------------------- transformers' contracts


def _t5(vocab: int):
    from transformers import T5Config, T5ForConditionalGeneration

    return T5ForConditionalGeneration(T5Config(
        vocab_size=vocab, d_model=16, d_kv=4, d_ff=16, num_layers=1, num_heads=2, dropout_rate=0.0,
    ))


def _gpt_neox(vocab: int):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    return GPTNeoXForCausalLM(GPTNeoXConfig(
        vocab_size=vocab, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
    ))


def _opt(vocab: int):
    from transformers import OPTConfig, OPTForCausalLM

    return OPTForCausalLM(OPTConfig(
        vocab_size=vocab, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, ffn_dim=16,
        word_embed_proj_dim=16, max_position_embeddings=32,
    ))


def _gpt2_base(vocab: int):
    from transformers import GPT2Model

    return GPT2Model(GPT2Config(vocab_size=vocab, n_embd=16, n_layer=1, n_head=2, n_positions=32))


def _encoder_decoder_logits(model, x):
    return model(input_ids=x, decoder_input_ids=x).logits


@pytest.mark.parametrize("build", [_bart, _t5], ids=["bart", "t5"])
def test_encoder_decoder_save_pretrained_round_trips_into_a_growable_model(build, tmp_path):
    """BART and T5 hold their input embedding at three paths (``shared`` and the encoder's
    and decoder's ``embed_tokens``): each path gets its own module sharing the one weight,
    so each mask is its own tensor, save_pretrained writes it, and a growable model rebuilt
    from the checkpoint's config loads every key back exactly."""
    from safetensors.torch import load_file
    from transformers import AutoConfig

    torch.manual_seed(0)
    model = make_growable(build(99).eval(), capacity=120)
    shared = model.get_input_embeddings()
    paths = [name for name, module in model.named_modules() if isinstance(module, growop.GrowEmbedding)]
    assert len(paths) == 3
    modules = [model.get_submodule(path) for path in paths]
    assert len({id(m) for m in modules}) == 3 and all(m.weight is shared.weight for m in modules)
    model.resize_token_embeddings(104)
    shared.deactivate([5])
    assert all(m.num_embeddings == 104 and not bool(m.active[5]) for m in modules)  # one row set
    x = torch.tensor([[1, 2, 103, 7]])
    expected = _encoder_decoder_logits(model, x)

    model.save_pretrained(tmp_path)  # a Trainer checkpoint saves the same way
    saved = load_file(tmp_path / "model.safetensors")
    assert {f"{path}.active" for path in paths} <= saved.keys()
    rebuilt = make_growable(type(model)(AutoConfig.from_pretrained(tmp_path)).eval())
    assert rebuilt.get_input_embeddings().capacity == 120  # from the config
    result = rebuilt.load_state_dict(saved, strict=False)  # as the Trainer resumes
    assert not result.unexpected_keys
    assert set(result.missing_keys) <= set(rebuilt.all_tied_weights_keys)  # the tied weights only
    state, want = rebuilt.state_dict(), model.state_dict()
    assert state.keys() == want.keys() and all(torch.equal(state[k], want[k]) for k in want)
    assert torch.equal(_encoder_decoder_logits(rebuilt, x), expected)
    for path in paths:
        with pytest.raises(IndexError, match="id 5 is a deactivated row"):
            rebuilt.get_submodule(path)(torch.tensor([5]))

    shared.reactivate([5])  # to_plain exports into the stock model
    expected = _encoder_decoder_logits(model, x)
    to_plain(model).save_pretrained(tmp_path / "plain")
    stock = type(model).from_pretrained(tmp_path / "plain").eval()
    assert type(stock.get_input_embeddings()) is type(build(8).get_input_embeddings())
    torch.testing.assert_close(_encoder_decoder_logits(stock, x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "build", [_gpt2_base, MODELS["gpt2"], _gpt_neox, _opt, _bart, _t5],
    ids=["gpt2_base", "gpt2", "gpt_neox", "opt", "bart", "t5"],
)
def test_model_vocab_size_follows_every_resize_as_in_transformers(build):
    stock = build(50)
    stock.resize_token_embeddings(55)
    model = make_growable(build(50))
    assert model.vocab_size == model.config.vocab_size == 50
    model.resize_token_embeddings(55)
    assert model.vocab_size == model.config.vocab_size == stock.vocab_size == 55
    model.resize_token_embeddings(60, pad_to_multiple_of=16)
    assert model.vocab_size == model.config.vocab_size == 60  # the live vocabulary
    to_plain(model)
    assert model.vocab_size == model.config.vocab_size == 60


def _resize_error(model, kwargs):
    try:
        model.resize_token_embeddings(**kwargs)
    except Exception as error:  # noqa: BLE001 - the point is which exception
        return error
    return None


@pytest.mark.parametrize(
    "kwargs",
    [
        {"new_num_tokens": 52, "pad_to_multiple_of": 1.3},
        {"new_num_tokens": 40, "pad_to_multiple_of": 1.3},  # also a shrink: the padding is checked first
        {"new_num_tokens": None, "pad_to_multiple_of": "8"},
        {"new_num_tokens": 52.0},
        {"new_num_tokens": 52, "pad_to_multiple_of": True},  # an int to transformers: no error
    ],
    ids=["float_multiple", "float_multiple_and_shrink", "str_multiple", "float_tokens", "bool_multiple"],
)
def test_resize_arguments_are_checked_in_transformers_order_with_its_exception_types(kwargs):
    stock_error = _resize_error(MODELS["gpt2"](50), kwargs)
    model = make_growable(MODELS["gpt2"](50))
    error = _resize_error(model, kwargs)
    assert type(error) is type(stock_error)
    if isinstance(stock_error, ValueError):  # transformers' words, which its tests match
        assert str(stock_error) in str(error)
    expected_vocab = 50 if error is not None else kwargs["new_num_tokens"]
    assert model.get_input_embeddings().num_embeddings == model.config.vocab_size == expected_vocab


def test_capacity_is_recorded_in_the_config_and_used_by_a_rebuilt_model(tmp_path):
    from transformers import AutoConfig

    model = make_growable(MODELS["llama_tied"](50), capacity=56)
    assert model.config.growop_capacity == 56
    model.resize_token_embeddings(60)  # past capacity: max(default_capacity(60), 1.5 x 56)
    assert model.config.growop_capacity == model.get_input_embeddings().capacity == 84
    model.save_pretrained(tmp_path / "growable")
    config = AutoConfig.from_pretrained(tmp_path / "growable")  # a stock load of the config
    assert (config.vocab_size, config.growop_capacity) == (60, 84)
    assert make_growable(LlamaForCausalLM(config)).get_input_embeddings().capacity == 84
    assert make_growable(LlamaForCausalLM(config), capacity=70).get_input_embeddings().capacity == 70
    config.vocab_size = 90  # resized since by stock code: the recorded rows are too few
    assert make_growable(LlamaForCausalLM(config)).get_input_embeddings().capacity == growop.default_capacity(90)

    to_plain(model)
    assert not hasattr(model.config, "growop_capacity")
    model.config.growop_capacity = 84  # a stock model whose config carries the key loads as usual
    model.save_pretrained(tmp_path / "plain")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "plain")
    assert type(loaded.get_input_embeddings()) is nn.Embedding and loaded.config.growop_capacity == 84
