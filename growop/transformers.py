"""Hugging Face ``transformers`` models whose vocabulary grows in place (``pip install growop[hf]``).

``make_growable(model)`` swaps a causal LM's input embedding for a :class:`GrowEmbedding`
and its output head for a :class:`GrowLinear` that shares its rows (the same Parameter
when the model ties them, one mask either way). From then on
``model.resize_token_embeddings(n, optimizer=opt)`` grows the vocabulary in place: no
allocation within capacity, the same Parameters, the optimizer's state kept and new rows
given fresh per-row Adam steps. ``to_plain(model)`` turns it back into stock modules for
``save_pretrained``. In a ``Trainer``, :class:`GrowVocabularyCallback` adds tokens at a
given step; the capacity travels with checkpoints in ``config.growop_capacity``.

This is the only growop module that imports ``transformers``.
"""

from __future__ import annotations

import functools
import inspect
import math
import types
import weakref

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import skip_init

try:
    from transformers import PreTrainedModel, TrainerCallback
except ImportError as error:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "growop.transformers needs the transformers package: pip install 'growop[hf]'"
    ) from error

import growop
from growop import distributed
from growop.embedding import GrowEmbedding
from growop.modules import GrowLinear
from growop.rows import checked_int, default_capacity, grown_capacity

__all__ = ["GrowVocabularyCallback", "fuse_loss", "make_growable", "resize_token_embeddings", "to_plain"]

_RESIZE = "resize_token_embeddings"
# The config attribute that carries the capacity with a checkpoint's config.json, so that a
# model rebuilt from it and made growable has the rows the checkpoint was saved with.
CAPACITY_KEY = "growop_capacity"


def make_growable(
    model: PreTrainedModel,
    capacity: int | None = None,
    *,
    static_shape: bool = False,
    fused_loss: bool = False,
) -> PreTrainedModel:
    """Makes ``model``'s vocabulary growable in place and returns ``model``.

    The input embedding becomes a :class:`GrowEmbedding` and the output head a
    :class:`GrowLinear` with ``capacity`` rows (default :func:`growop.default_capacity` of
    the vocabulary: 25% headroom, at least 8 rows; a model built from the config of a
    growable model's checkpoint gets the capacity recorded there, ``config.growop_capacity``,
    when it holds the vocabulary; an explicit ``capacity`` wins). A tied head keeps sharing the
    embedding's weight Parameter; an untied one shares its mask, so both always have the
    same live tokens. ``static_shape=True`` makes the logits ``capacity`` wide (tokens not
    yet added are masked), so growing changes no shape.

    ``model.resize_token_embeddings`` then grows in place (see
    :func:`resize_token_embeddings`) and ``config.vocab_size`` always equals the logits'
    width. Build the optimizer after this call: the Parameters are new (``capacity`` rows).

    ``fused_loss=True``: a call with ``labels``, in training mode with gradients enabled,
    computes the loss with :meth:`GrowLinear.cross_entropy` from the head's input, never
    making the logits, and returns ``.logits = None`` (see :func:`fuse_loss`).
    """
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"make_growable expects a transformers PreTrainedModel, got {type(model).__name__}")
    embedding = model.get_input_embeddings()
    head = model.get_output_embeddings()
    if isinstance(embedding, GrowEmbedding):
        raise ValueError("make_growable: this model's embeddings are already growop modules")
    if fused_loss:
        _check_fusable(model)
    if not isinstance(embedding, nn.Embedding):
        raise TypeError(
            f"make_growable: the input embeddings must be an nn.Embedding, got {type(embedding).__name__}"
        )
    if head is not None and not isinstance(head, nn.Linear):
        raise TypeError(
            f"make_growable: the output head must be an nn.Linear, got {type(head).__name__}"
        )
    vocab = embedding.num_embeddings
    if head is not None and head.out_features != vocab:
        raise ValueError(
            f"make_growable: the head has {head.out_features} outputs but the embedding "
            f"{vocab} rows; they must describe the same vocabulary"
        )
    for module in (embedding, head):
        if module is not None and hasattr(module, "_hf_hook"):
            raise ValueError(
                f"make_growable: the {type(module).__name__} carries an accelerate hook "
                "(device_map or offloading), which a swapped module would lose; call "
                "make_growable before dispatching the model"
            )
    if head is not None and type(head).forward is not nn.Linear.forward:
        raise TypeError(
            f"make_growable: the output head is a {type(head).__name__}, whose forward "
            "is not nn.Linear's; growop cannot carry it over"
        )
    capacity = _recorded_capacity(model, vocab) if capacity is None else capacity
    tied = head is not None and head.weight is embedding.weight

    grow_embedding = _growable_class(type(embedding)).from_embedding(embedding, capacity=capacity)
    _carry_over(embedding, grow_embedding)
    grow_head = None
    if head is not None and tied:
        grow_head = _tied_head(head, grow_embedding, static_shape)
    elif head is not None:
        grow_head = GrowLinear.from_linear(head, capacity=capacity, static_shape=static_shape)
        growop.grow_together(grow_embedding, grow_head)
    if grow_head is not None:
        _carry_over(head, grow_head)
    model.set_input_embeddings(grow_embedding)
    _one_module_per_path(model, grow_embedding)
    if grow_head is not None:
        model.set_output_embeddings(grow_head)
    # An instance attribute, so the model keeps its class (and save_pretrained its
    # architecture name); to_plain removes it.
    model.resize_token_embeddings = types.MethodType(resize_token_embeddings, model)
    # A checkpoint of a grown model changes the live vocabulary: config follows it.
    model._growop_load_hook = model.register_load_state_dict_post_hook(_after_load)
    if isinstance(getattr(model, "final_logits_bias", None), torch.Tensor):
        # BART-style logit bias, a buffer of the model as wide as the logits: sized to a
        # checkpoint before it loads, and to the vocabulary before each forward (a grow
        # made on the embedding itself does not go through resize_token_embeddings).
        model._growop_bias_hooks = (
            model.register_load_state_dict_pre_hook(_fit_final_logits_bias),
            model.register_forward_pre_hook(_sync_before_forward),
        )
    _sync_vocab_size(model)
    if fused_loss:
        fuse_loss(model)
    return model


def resize_token_embeddings(
    model: PreTrainedModel,
    new_num_tokens: int | None = None,
    pad_to_multiple_of: int | None = None,
    mean_resizing: bool = True,
    *,
    optimizer: torch.optim.Optimizer | None = None,
) -> GrowEmbedding:
    """``PreTrainedModel.resize_token_embeddings`` for a model made growable, in place.

    Installed as ``model.resize_token_embeddings`` by :func:`make_growable`.

    - ``new_num_tokens``: the vocabulary after the call; every token below it is live.
      Shrinking raises: deactivate tokens instead (``model.get_input_embeddings().deactivate``).
    - ``pad_to_multiple_of``: the capacity is rounded up to a multiple of it. The padding
      rows exist but are never live (never looked up, never predicted).
    - ``mean_resizing=True``: new rows are the mean of the live rows, in O(V d) (the
      embedding's and, when untied, the head's own); ``False``: drawn from
      ``normal(0, config.initializer_range)`` as transformers' ``_init_weights`` does.
    - ``optimizer``: an optimizer holding the embedding or head; the new rows' state starts
      fresh (Adam and AdamW also get per-row step counts), every other row's is kept.

    Within capacity nothing is allocated and every Parameter stays the same object. Past
    capacity the storage is reallocated once, as ``grow`` does (to ``max(default_capacity(n),
    1.5 x capacity)`` rows, rounded up by ``pad_to_multiple_of``); the Parameters stay the
    same objects; pass ``optimizer=`` so its state follows.
    Returns the input embedding, as transformers does.
    """
    embedding = model.get_input_embeddings()
    head = model.get_output_embeddings()
    for module, grow_class in ((embedding, GrowEmbedding), (head, GrowLinear)):
        if isinstance(getattr(module, "base_layer", None), grow_class):
            raise TypeError(
                f"resize_token_embeddings: the {'input embeddings' if grow_class is GrowEmbedding else 'output head'} "
                f"are wrapped by a {type(module).__name__} (a PEFT adapter or modules_to_save), "
                "whose own rows would keep the old vocabulary; resize before adding the adapter, "
                "or merge it first (nothing was changed)"
            )
    if not isinstance(embedding, GrowEmbedding):
        raise TypeError("resize_token_embeddings: call growop.transformers.make_growable(model) first")
    live = embedding.num_embeddings
    if new_num_tokens is None and pad_to_multiple_of is None:
        return embedding
    # transformers' order and exception types: pad_to_multiple_of first (ValueError), then
    # new_num_tokens (TypeError for a non-integer), before anything about the vocabulary.
    multiple = None if pad_to_multiple_of is None else _checked_multiple(pad_to_multiple_of)
    new = live if new_num_tokens is None else checked_int(new_num_tokens, f"{_RESIZE}: new_num_tokens", 0)
    if new < live:
        raise ValueError(
            f"resize_token_embeddings: cannot shrink the vocabulary from {live} to {new} tokens "
            "in place. To stop using tokens, mask them: "
            "model.get_input_embeddings().deactivate(token_ids) (the head shares the mask)."
        )
    capacity = embedding.capacity
    if new > capacity:  # the growth policy of grow(): room for the tokens to come
        capacity = grown_capacity(capacity, new)
    if multiple is not None:
        capacity = math.ceil(capacity / multiple) * multiple
    if new > live and mean_resizing and embedding.live_count == 0:
        raise ValueError(  # before reserve() reallocates anything
            "resize_token_embeddings: mean_resizing needs at least one live token; "
            "reactivate one or pass mean_resizing=False"
        )
    embedding.reserve(capacity, optimizer=optimizer)
    if new > live:
        rows = embedding.grow(new - live, init="mean" if mean_resizing else "zeros", optimizer=optimizer)
        if not mean_resizing:
            _draw_normal_(model, embedding, rows)
    _sync_vocab_size(model)
    return embedding


def to_plain(model: PreTrainedModel) -> PreTrainedModel:
    """Turns a model made growable back into stock ``nn.Embedding`` / ``nn.Linear``, in place.

    The new modules hold the live vocabulary (``num_embeddings`` rows), a tied head shares
    the embedding's Parameter again, ``config.vocab_size`` is the live count, and
    ``resize_token_embeddings`` is transformers' own again: ``save_pretrained`` and a stock
    ``from_pretrained`` give the same logits. Raises if a token is deactivated, since a
    plain head without bias cannot mask it. Returns ``model``.
    """
    embedding = model.get_input_embeddings()
    if not isinstance(embedding, GrowEmbedding):
        raise TypeError("to_plain: this model's input embeddings are not a GrowEmbedding")
    head = model.get_output_embeddings()
    live = embedding.num_embeddings
    masked = (~embedding.active[:live]).nonzero().flatten()
    if masked.numel():
        raise ValueError(
            f"to_plain: tokens {masked[:8].tolist()}{' ...' if masked.numel() > 8 else ''} are "
            "deactivated and a stock head cannot mask them; reactivate them first"
        )
    tied = isinstance(head, GrowLinear) and head.weight is embedding.weight
    plain_embedding = _plain_embedding(embedding)
    plain_head = None
    if isinstance(head, GrowLinear):
        weight = head.weight.detach()
        plain_head = nn.Linear(
            head.in_features, live, bias=head.bias is not None, device=weight.device, dtype=weight.dtype
        )
        if tied:
            plain_head.weight = plain_embedding.weight
        else:
            with torch.no_grad():
                plain_head.weight.copy_(weight[:live])
        if head.bias is not None:
            with torch.no_grad():
                plain_head.bias.copy_(head.bias.detach()[:live])
    if plain_head is not None:
        _carry_over(head, plain_head)
    model.set_input_embeddings(plain_embedding)
    if plain_head is not None:
        model.set_output_embeddings(plain_head)
    model.__dict__.pop("resize_token_embeddings", None)
    hook = model.__dict__.pop("_growop_load_hook", None)
    if hook is not None:
        hook.remove()
    for hook in model.__dict__.pop("_growop_bias_hooks", ()):
        hook.remove()
    _unfuse_loss(model)
    _sync_vocab_size(model)
    return model


class GrowVocabularyCallback(TrainerCallback):
    """Adds ``tokens`` to ``tokenizer`` and grows the model's vocabulary in place after
    optimizer step ``step`` of a ``Trainer``: the one line a mid-training grow takes.

    ``trainer = Trainer(model=make_growable(model), ..., processing_class=tokenizer,
    callbacks=[GrowVocabularyCallback(tokenizer, ["<tool>"], step=500)])``

    At the end of step ``step`` (after the optimizer stepped, never between the micro-batches
    of gradient accumulation) it calls ``tokenizer.add_tokens(tokens, special_tokens=...)``
    and ``model.resize_token_embeddings(len(tokenizer), optimizer=...)`` with the Trainer's
    optimizer, so the new rows start fresh with their own Adam steps and every other row's
    state is kept. ``tokenizer`` must be the one the data collator tokenizes with, and the
    Trainer's ``processing_class``, so that checkpoints save it grown. A run resumed from a
    checkpoint saved after ``step`` has the tokens already (from the checkpoint's tokenizer)
    and does nothing; one resumed from before it grows at ``step``.

    The Trainer's data loader collates one batch ahead: text tokenized by the collator uses
    the new tokens from batch ``step + 2`` on (batch ``step + 1`` was tokenized before the
    grow), while a run resumed from a checkpoint saved at ``step`` itself tokenizes batch
    ``step + 1`` with them. To resume bit for bit, save checkpoints at other steps than
    ``step``, or tokenize the data before training.
    """

    def __init__(
        self,
        tokenizer,
        tokens,
        step: int,
        *,
        special_tokens: bool = False,
        mean_resizing: bool = True,
        pad_to_multiple_of: int | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.tokens = [tokens] if isinstance(tokens, str) else list(tokens)
        if not self.tokens:
            raise ValueError("GrowVocabularyCallback: tokens is empty; give the tokens to add")
        self.step = checked_int(step, "GrowVocabularyCallback: step", 1)
        self.special_tokens = special_tokens
        self.mean_resizing = mean_resizing
        self.pad_to_multiple_of = pad_to_multiple_of

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if not isinstance(model.get_input_embeddings(), GrowEmbedding):
            raise TypeError(
                "GrowVocabularyCallback: the Trainer's model is not growable; pass "
                "growop.transformers.make_growable(model) to the Trainer"
            )

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        if state.global_step != self.step:
            return
        self.tokenizer.add_tokens(self.tokens, special_tokens=self.special_tokens)
        model.resize_token_embeddings(
            len(self.tokenizer),
            pad_to_multiple_of=self.pad_to_multiple_of,
            mean_resizing=self.mean_resizing,
            optimizer=optimizer,
        )


# What a swapped module keeps of the one it replaces: its hooks (the dicts themselves, so
# handles such as enable_input_require_grads' still remove them).
_HOOK_DICTS = (
    "_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
    "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_backward_hooks",
    "_backward_pre_hooks",
)


def _carry_over(old: nn.Module, new: nn.Module) -> None:
    """What ``new`` takes over from ``old`` besides the rows: its hooks, the instance
    attributes and buffers of a subclass (an ``embed_scale``), and transformers' mark that
    its weights are initialised (else ``init_weights()`` would draw them again)."""
    for name in _HOOK_DICTS:
        if hasattr(old, name):
            setattr(new, name, getattr(old, name))
    for name, value in old.__dict__.items():
        if not name.startswith("_") and name not in new.__dict__:
            setattr(new, name, value)
    for name, buffer in old._buffers.items():
        if name not in new._buffers and name not in _GROWOP_BUFFERS and buffer is not None:
            new.register_buffer(name, buffer, persistent=name not in old._non_persistent_buffers_set)
    new._is_hf_initialized = True


_GROWOP_BUFFERS = ("active", "_init_seed")  # growop's own, never carried to a plain module
_GROWABLE_CLASSES: dict[type, type] = {}


def _growable_class(cls: type) -> type:
    """The GrowEmbedding class standing in for an ``nn.Embedding`` subclass: ``cls`` first,
    so its ``forward`` (transformers' scaled word embeddings multiply by ``embed_scale``)
    runs and reaches GrowEmbedding's lookup through ``super().forward``, and the module
    stays an instance of ``cls``. Construction is GrowEmbedding's; :func:`_carry_over`
    copies the subclass's attributes."""
    if cls is nn.Embedding:
        return GrowEmbedding
    if cls not in _GROWABLE_CLASSES:
        _GROWABLE_CLASSES[cls] = type(
            f"Grow{cls.__name__}",
            (cls, GrowEmbedding),
            {"__init__": GrowEmbedding.__init__, "__module__": __name__,
             "_plain_class": cls, "extra_repr": GrowEmbedding.extra_repr,
             "__reduce_ex__": _reduce_growable},
        )
    return _GROWABLE_CLASSES[cls]


def _reduce_growable(module: GrowEmbedding, protocol: int):
    # A class made at run time cannot be found by name when unpickling: the module is
    # rebuilt from the class it stands in for, which can.
    return _new_growable, (module._plain_class,), module.__getstate__()


def _new_growable(cls: type) -> GrowEmbedding:
    growable = _growable_class(cls)
    return growable.__new__(growable)


def _plain_embedding(embedding: GrowEmbedding) -> nn.Embedding:
    """``embedding.to_embedding()``, as an instance of the class it replaced."""
    plain = embedding.to_embedding()
    plain.__class__ = getattr(type(embedding), "_plain_class", nn.Embedding)
    _carry_over(embedding, plain)
    return plain


def _tied_head(head: nn.Linear, embedding: GrowEmbedding, static_shape: bool) -> GrowLinear:
    """A GrowLinear tied to ``embedding``, built without a weight of its own.

    ``skip_init`` leaves the head's own ``(capacity, d)`` weight unwritten (so, on Linux,
    never backed by memory) until ``tie`` drops it for the embedding's Parameter.
    """
    weight = embedding.weight
    grow_head = skip_init(
        GrowLinear,
        head.in_features,
        head.out_features,
        bias=head.bias is not None,
        capacity=embedding.capacity,
        static_shape=static_shape,
        device=weight.device,
        dtype=weight.dtype,
    )  # skip_init's to_empty leaves the mask and seed as the constructor makes them
    if head.bias is not None:
        with torch.no_grad():
            grow_head.bias[: head.out_features].copy_(head.bias)
            grow_head.bias[head.out_features :].zero_()
    growop.tie(embedding, grow_head)
    return grow_head


def _recorded_capacity(model: PreTrainedModel, vocab: int) -> int:
    """The capacity recorded in ``model``'s config by :func:`make_growable` (a model rebuilt
    from a growable checkpoint's config.json), where it holds ``vocab`` tokens; else
    :func:`growop.default_capacity`. A config resized since by stock code records too few
    rows, and is ignored."""
    recorded = getattr(model.config.get_text_config(), CAPACITY_KEY, None)
    if isinstance(recorded, int) and not isinstance(recorded, bool) and recorded >= vocab:
        return recorded
    return default_capacity(vocab)


def _one_module_per_path(model: PreTrainedModel, embedding: GrowEmbedding) -> None:
    """Gives every further place ``set_input_embeddings`` put ``embedding`` (BART's and T5's
    ``shared``, ``encoder.embed_tokens`` and ``decoder.embed_tokens``) a module of its own
    that shares its weight Parameter and rows (``growop.tie``), as the stock model has three
    modules sharing one weight.

    One module in three places would put its ``active`` buffer in the state dict under
    three keys of one storage, which ``save_pretrained`` refuses (transformers declares tied
    keys for the weight only). Each tied module keeps its own copy of the mask, so every key
    is its own tensor and a checkpoint loads each back exactly.
    """
    paths = [name for name, module in model.named_modules(remove_duplicate=False) if module is embedding]
    for path in paths[1:]:
        parent, _, name = path.rpartition(".")
        setattr(model.get_submodule(parent), name, _tied_embedding(embedding))


def _tied_embedding(embedding: GrowEmbedding) -> GrowEmbedding:
    """A module like ``embedding`` (its class, attributes and hooks) whose weight is
    ``embedding``'s Parameter, joined to its rows. Built without a weight of its own, as
    :func:`_tied_head` builds a tied head."""
    weight = embedding.weight
    tied = skip_init(
        type(embedding),
        embedding.num_embeddings,
        embedding.embedding_dim,
        embedding.padding_idx,
        capacity=embedding.capacity,
        device=weight.device,
        dtype=weight.dtype,
    )
    tied.max_norm, tied.norm_type = embedding.max_norm, embedding.norm_type
    tied.scale_grad_by_freq = embedding.scale_grad_by_freq
    _carry_over(embedding, tied)
    growop.tie(embedding, tied)
    return tied


def _after_load(model: PreTrainedModel, incompatible_keys) -> None:
    # A function, not a lambda, so the model still pickles.
    _sync_vocab_size(model)


def _fit_final_logits_bias(model, state_dict, prefix, *args) -> None:
    saved = state_dict.get(prefix + "final_logits_bias")
    if isinstance(saved, torch.Tensor) and saved.shape[-1] != model.final_logits_bias.shape[-1]:
        model._resize_final_logits_bias(saved.shape[-1])


def _sync_before_forward(model, args) -> None:
    if model.final_logits_bias.shape[-1] != _logits_width(model):
        _sync_vocab_size(model)


def _logits_width(model: PreTrainedModel) -> int:
    head = model.get_output_embeddings()
    if isinstance(head, GrowLinear) and head.static_shape:
        return head.capacity
    return model.get_input_embeddings().num_embeddings


def _sync_vocab_size(model: PreTrainedModel) -> None:
    """``config.vocab_size`` and ``model.vocab_size`` := the logits' width (transformers'
    resize sets both, on every model), and ``config.growop_capacity`` := the capacity while
    the model is growable (removed once it is plain again)."""
    width = _logits_width(model)
    text_config = model.config.get_text_config()
    text_config.vocab_size = width
    model.vocab_size = width
    embedding = model.get_input_embeddings()
    if isinstance(embedding, GrowEmbedding):
        setattr(text_config, CAPACITY_KEY, embedding.capacity)
    elif hasattr(text_config, CAPACITY_KEY):
        delattr(text_config, CAPACITY_KEY)
    # Encoder-decoder heads (BART, mBART, Pegasus) add a bias buffer as wide as the logits.
    bias = getattr(model, "final_logits_bias", None)
    if isinstance(bias, torch.Tensor) and bias.shape[-1] != width and hasattr(model, "_resize_final_logits_bias"):
        model._resize_final_logits_bias(width)


def _checked_multiple(value) -> int:
    """``pad_to_multiple_of`` checked as transformers checks it: an ``int`` (a ``bool``
    counts, as there), else ``ValueError``; and at least 1."""
    if not isinstance(value, int):
        # transformers' own message, word for word, so code and tests matching it still do.
        raise ValueError(
            f"{_RESIZE}: Asking to pad the embedding matrix to a multiple of `{value}`, which is "
            "not and integer. Please make sure to pass an integer"
        )
    if value < 1:
        raise ValueError(f"{_RESIZE}: pad_to_multiple_of must be >= 1, got {value}")
    return int(value)


def _draw_normal_(model: PreTrainedModel, embedding: GrowEmbedding, rows: range) -> None:
    """Draws the new rows' weights as transformers' ``_init_weights`` does,
    ``normal(0, initializer_range)``, in place (an untied head's bias rows stay zero).

    The rows were grown as zeros, so nothing is allocated for them.
    """
    std = float(getattr(model.config.get_text_config(), "initializer_range", 0.02))
    with torch.no_grad():
        for param in embedding.rows.params:
            if param.dim() != 2:
                continue
            if distributed.is_sharded(param):  # a DTensor's slice is a copy: blend rows in
                values = distributed.local(param).new_empty((len(rows), param.shape[1]))
                distributed.write_rows_(param, rows.start, values.normal_(0.0, std))
            else:
                param[rows.start : rows.stop].normal_(0.0, std)


# ----------------------------------------------------------------------------- fused loss
#
# A causal LM in transformers 5.x computes ``logits = self.lm_head(hidden)`` and then
# ``self.loss_function(logits=logits, labels=labels, vocab_size=..., **kwargs)``. With the
# loss fused, a call that wants a training loss (labels given, training mode, gradients on)
# is marked by a forward pre-hook on the model; the head (a _LossHead) then keeps its input
# and returns a zero-width stand-in instead of the logits; the model's loss_function (a
# _FusedLoss) finds the stand-in and computes GrowLinear.cross_entropy on the kept input; and
# a forward hook takes the stand-in out of the output (``.logits`` is None). Any other call
# (evaluation, no labels, no gradients) runs the stock head and loss. A model that does
# anything to the logits between its head and its loss (Gemma 2/3's softcapping, BART's
# final_logits_bias) passes something else to its loss: that call raises, naming the cause,
# and such models are refused up front where their config says so.


def fuse_loss(model: PreTrainedModel) -> PreTrainedModel:
    """Makes a growable causal LM compute its training loss fused, and returns ``model``.

    Called by ``make_growable(model, fused_loss=True)``. From then on a call with ``labels``,
    in training mode and with gradients enabled, returns ``.loss`` as transformers' own loss
    would be on the live vocabulary (the same shift, or ``shift_labels`` when given;
    ``ignore_index=-100``; with ``num_items_in_batch``, the sum over tokens divided by it) and
    ``.logits`` None: the ``(tokens, vocabulary)`` logits are never made (see
    :func:`growop.linear_cross_entropy`). Evaluation, calls without labels and calls without
    gradients return logits as usual.

    The Trainer's ``label_smoothing_factor`` takes the labels away from the model and smooths
    over the logits it gets back, over every column, masked ones included (``inf`` on a
    ``static_shape`` or deactivated vocabulary). The first call of this function wraps
    transformers' ``LabelSmoother.__call__`` so that, given logits from a model this function
    fused, it smooths over the live columns only (exactly ``F.cross_entropy`` with
    ``label_smoothing`` over them); for any other logits it runs the stock code unchanged.
    Importing growop changes nothing.

    Refused with a ``ValueError``: encoder-decoder models and heads that post-process their
    logits (Gemma 2/3's ``final_logit_softcapping``), which a fused loss cannot reproduce.
    """
    _check_fusable(model)
    head = model.get_output_embeddings()
    if not isinstance(head, GrowLinear):
        raise TypeError("fuse_loss: call growop.transformers.make_growable(model) first")
    if isinstance(head, _LossHead):
        return model
    head.__class__ = _LossHead
    model.loss_function = _FusedLoss(model)
    model._growop_fused_hooks = (
        model.register_forward_pre_hook(_mark_fused_call, with_kwargs=True),
        model.register_forward_hook(_finish_fused_call, always_call=True),
    )
    _smooth_labels_over_live_columns()
    return model


def _check_fusable(model: PreTrainedModel) -> None:
    config = model.config
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(
            f"fused_loss: {type(model).__name__} is an encoder-decoder model; the fused loss "
            "supports decoder-only causal LMs (use fused_loss=False)"
        )
    softcap = getattr(config.get_text_config(), "final_logit_softcapping", None)
    if softcap is not None:
        raise ValueError(
            f"fused_loss: {type(model).__name__} caps its logits (final_logit_softcapping="
            f"{softcap}) between its head and its loss, which a fused linear cross-entropy "
            "does not reproduce; use fused_loss=False"
        )


class _LossHead(GrowLinear):
    """A GrowLinear whose forward, in a call marked for the fused loss, keeps its input and
    returns a zero-width stand-in for the logits (see :func:`fuse_loss`)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        call = self.__dict__.get("_growop_call")
        if call is None or call.hidden is not None:
            return super().forward(input)
        call.hidden = input
        call.stand_in = input.new_empty((*input.shape[:-1], 0))
        return call.stand_in


class _FusedCall:
    """One forward of a fused model that wants its training loss."""

    def __init__(self) -> None:
        self.hidden: torch.Tensor | None = None
        self.stand_in: torch.Tensor | None = None
        self.consumed = False


def _mark_fused_call(model, args, kwargs):
    head = model.get_output_embeddings()
    if not isinstance(head, _LossHead):
        return None
    labels = kwargs.get("labels")
    if labels is None and args:
        labels = inspect.signature(model.forward).bind_partial(*args).arguments.get("labels")
    wanted = labels is not None and model.training and torch.is_grad_enabled()
    head._growop_call = _FusedCall() if wanted else None
    return None


def _finish_fused_call(model, args, output):
    head = model.get_output_embeddings()
    call = head.__dict__.get("_growop_call") if isinstance(head, _LossHead) else None
    if call is None:
        if isinstance(head, _LossHead):
            _note_live_logits(output, head)
        return None
    head._growop_call = None
    if output is None or call.hidden is None:  # the forward raised, or never reached the head
        return None
    if not call.consumed:
        raise RuntimeError(
            f"fused_loss: {type(model).__name__} did not pass its head's output to "
            "self.loss_function, so the fused loss was not computed; this model is not "
            "supported with fused_loss=True"
        )
    if isinstance(output, tuple):
        return tuple(value for value in output if value is not call.stand_in)
    return type(output)(**{key: value for key, value in output.items() if key != "logits"})


class _FusedLoss:
    """The loss_function of a fused model: transformers' causal-LM loss, computed by the head
    from its input where the call was marked (else the model's own loss function)."""

    def __init__(self, model: PreTrainedModel) -> None:
        self.model = model
        self.stock = model.loss_function
        self.model_had_its_own = "_loss_function" in model.__dict__

    def __call__(self, logits, labels, vocab_size=None, num_items_in_batch=None, ignore_index=-100,
                 shift_labels=None, **kwargs):
        head = self.model.get_output_embeddings()
        call = head.__dict__.get("_growop_call") if isinstance(head, _LossHead) else None
        if call is None or call.hidden is None:
            return self.stock(logits, labels, vocab_size, num_items_in_batch=num_items_in_batch,
                              ignore_index=ignore_index, shift_labels=shift_labels, **kwargs)
        if logits is not call.stand_in:
            raise RuntimeError(
                f"fused_loss: {type(self.model).__name__} changes its head's logits before its "
                "loss, which the fused loss cannot reproduce; use fused_loss=False"
            )
        hidden = call.hidden
        if shift_labels is None:
            shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
        shift_labels = shift_labels.to(hidden.device)
        reduction = "mean" if num_items_in_batch is None else "sum"
        loss = head.cross_entropy(hidden, shift_labels, ignore_index=ignore_index, reduction=reduction)
        if num_items_in_batch is not None:
            if torch.is_tensor(num_items_in_batch):
                num_items_in_batch = num_items_in_batch.to(loss.device)
            loss = loss / num_items_in_batch
        call.consumed = True
        return loss


def _unfuse_loss(model: PreTrainedModel) -> None:
    """Undoes :func:`fuse_loss` (for ``to_plain``); the head is replaced by the caller."""
    for hook in model.__dict__.pop("_growop_fused_hooks", ()):
        hook.remove()
    loss = model.__dict__.get("_loss_function")
    if isinstance(loss, _FusedLoss):
        if loss.model_had_its_own:
            model.loss_function = loss.stock
        else:
            del model._loss_function


# Logits returned by fused models: id(logits) -> (a weak reference to them, their head). An
# entry leaves when its logits are freed (so an id is never mistaken for a later tensor's).
_LIVE_LOGITS: dict[int, tuple[weakref.ref, GrowLinear]] = {}


def _note_live_logits(output, head: GrowLinear) -> None:
    logits = output.get("logits") if isinstance(output, dict) else None
    if isinstance(logits, torch.Tensor):
        key = id(logits)
        _LIVE_LOGITS[key] = (weakref.ref(logits, lambda _, key=key: _LIVE_LOGITS.pop(key, None)), head)


def _head_of_live_logits(logits) -> GrowLinear | None:
    entry = _LIVE_LOGITS.get(id(logits))
    return entry[1] if entry is not None and entry[0]() is logits else None


def _smooth_labels_over_live_columns() -> None:
    """Wraps ``LabelSmoother.__call__`` once (see :func:`fuse_loss`)."""
    from transformers.trainer_pt_utils import LabelSmoother

    stock = LabelSmoother.__call__
    if getattr(stock, "_growop_stock", None) is not None:
        return

    @functools.wraps(stock)
    def __call__(self, model_output, labels, *args, **kwargs):
        logits = model_output["logits"] if isinstance(model_output, dict) else model_output[0]
        head = _head_of_live_logits(logits)
        if head is None:
            return stock(self, model_output, labels, *args, **kwargs)
        bound = inspect.signature(stock).bind(self, model_output, labels, *args, **kwargs).arguments
        return _live_label_smoothing(
            logits, labels, head, self.epsilon, self.ignore_index,
            bound.get("shift_labels", False), bound.get("num_items_in_batch"),
        )

    __call__._growop_stock = stock
    LabelSmoother.__call__ = __call__


def _live_label_smoothing(logits, labels, head: GrowLinear, epsilon: float, ignore_index: int,
                          shift_labels: bool, num_items_in_batch) -> torch.Tensor:
    """``LabelSmoother``'s loss with the softmax and the smoothing over the live columns only:
    ``(1 - eps) * nll + eps * mean over live columns of -log p``, summed over tokens not
    ignored and divided by their count (or by ``num_items_in_batch``)."""
    if shift_labels:
        logits, labels = logits[..., :-1, :], labels[..., 1:]
    labels = labels.to(logits.device)
    live = head.active[: logits.shape[-1]]
    log_probs = torch.log_softmax(logits.float().masked_fill(~live, -math.inf), dim=-1)
    ignored = labels.eq(ignore_index)
    nll = -log_probs.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    smoothed = -log_probs.masked_fill(~live, 0).sum(-1) / live.sum()
    per_token = ((1 - epsilon) * nll + epsilon * smoothed).masked_fill(ignored, 0)
    if num_items_in_batch is None:
        denominator = (~ignored).sum()
    elif torch.is_tensor(num_items_in_batch):
        denominator = num_items_in_batch.to(per_token.device)
    else:
        denominator = num_items_in_batch
    return per_token.sum() / denominator
