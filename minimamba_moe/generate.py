"""Autoregressive generation: sampling rules and the token loop.

    sample_token(logits, temperature, top_k, top_p)    one token per row of (b, vocab) logits
    generate_tokens(model, prompt_ids, ...)            yields one (b,) tensor of new tokens at a time
    generate(model, prompt_ids, ...)                   the whole (b, l + n) sequence at once

Two ways to get the next-token logits, which must agree (tests/test_sample.py holds them equal):

- ``use_state=True`` (what sample.py runs): one forward pass over the prompt fills the recurrent
  state (each Mamba layer's conv tail and SSM state, each attention layer's KV cache), then
  ``Model.step`` feeds one token at a time. For Mamba and MoE layers the state has a fixed size,
  so every new token costs the same time and memory however many came before.
- ``use_state=False`` (the reference): re-run the full forward on the whole growing sequence and
  take the last position's logits. Obviously right, and quadratic in the length.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from .model import InferenceState, Model


# --8<-- [start:sample_token]
def sample_token(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """logits (b, vocab) -> token ids (b,) int64.

    temperature 0 picks the argmax (greedy). Otherwise the logits are divided by ``temperature``,
    then ``top_k`` keeps the k largest, ``top_p`` keeps the smallest set of most likely tokens whose
    probabilities sum to at least p (nucleus sampling; the most likely token is always kept), and
    one token is drawn from what is left.
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(dim=-1)
    scaled = logits / temperature
    if not bool(torch.isfinite(scaled).all()):  # a temperature so small that the division overflows: shift first,
        shifted = logits.double() - logits.double().amax(dim=-1, keepdim=True)  # so the top logit stays 0, not inf,
        scaled = (shifted / temperature).float()  # in float64, where 1e-300 is not 0
    logits = scaled
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]  # (b, 1) the k-th largest logit
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs  # probability mass of the tokens ranked above each one
        drop_sorted = before >= top_p  # those above already reach p: not needed
        drop = drop_sorted.scatter(1, order, drop_sorted)  # back to vocabulary order
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)[:, 0]
# --8<-- [end:sample_token]


@torch.no_grad()
def generate_tokens(
    model: Model,
    prompt_ids: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    use_state: bool = True,
    state: InferenceState | None = None,
    vocab_size: int | None = None,
) -> Iterator[torch.Tensor]:
    """Yield ``max_new_tokens`` tensors of shape (b,), the next token of every sequence.

    prompt_ids (b, l) with l >= 1. The first token is ready after the prefill (so a caller timing
    the first ``next()`` times the prefill); each later one costs one ``Model.step``. Pass ``state``
    (from ``model.init_state(b)``) to look at it afterwards; it is updated in place. ``vocab_size``:
    draw only among the first ``vocab_size`` ids (a tokenizer smaller than the model's vocabulary,
    e.g. bytes on a GPT-2-sized model, cannot decode the others).
    """
    def sample(logits):
        return sample_token(logits[:, :vocab_size], temperature, top_k, top_p, generator)

    if prompt_ids.ndim != 2 or prompt_ids.shape[1] == 0:
        raise ValueError(f"prompt_ids must be (batch, length) with length >= 1, got {tuple(prompt_ids.shape)}")
    model.eval()
    # --8<-- [start:reference_loop]
    if not use_state:  # reference: the full forward over everything so far, every time
        ids = prompt_ids
        for _ in range(max_new_tokens):
            token = sample(model(ids).logits[:, -1])
            yield token
            ids = torch.cat([ids, token[:, None]], dim=1)
        return
    # --8<-- [end:reference_loop]
    # --8<-- [start:decode_loop]
    if state is None:
        state = model.init_state(prompt_ids.shape[0])
    logits = model(prompt_ids, state=state).logits[:, -1]  # prefill: one pass fills the state
    for i in range(max_new_tokens):
        token = sample(logits)
        yield token
        if i + 1 < max_new_tokens:  # the last token is never fed back
            logits = model.step(token, state)
    # --8<-- [end:decode_loop]


def generate(model: Model, prompt_ids: torch.Tensor, max_new_tokens: int, **kwargs) -> torch.Tensor:
    """The prompt followed by ``max_new_tokens`` generated tokens: (b, l + max_new_tokens)."""
    new = list(generate_tokens(model, prompt_ids, max_new_tokens, **kwargs))
    return torch.cat([prompt_ids, *(t[:, None] for t in new)], dim=1)


def state_nbytes(state: InferenceState) -> int:
    """Bytes held by a recurrent state (every tensor of every layer's MambaState / KVCache)."""
    total = 0
    for layer in state.layers:
        if layer is not None:
            total += sum(t.numel() * t.element_size() for t in vars(layer).values() if torch.is_tensor(t))
    return total
