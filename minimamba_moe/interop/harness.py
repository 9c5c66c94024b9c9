"""This project's models in EleutherAI's lm-evaluation-harness (``lm_eval``), under the model name ``minimamba``.

    python -m minimamba_moe.interop.harness --model minimamba --model_args pretrained=out/ --tasks hellaswag,piqa
    python -m minimamba_moe.interop.harness --model minimamba --model_args pretrained=Zyphra/BlackMamba-1.5B \\
        --tasks hellaswag,piqa,winogrande,lambada_openai,arc_easy,arc_challenge,openbookqa --device cuda --batch_size 16

The command registers ``MinimambaLM`` with the harness, then hands every argument to the harness's own
command line (``lm_eval.__main__.cli_evaluate``): ``--tasks``, ``--num_fewshot``, ``--limit``,
``--batch_size``, ``--device``, ``--output_path``, ``--log_samples``, ``--include_path`` and the rest
work as the harness documents them. (lm-eval's own ``lm_eval`` command cannot find a model from another
package: its registry holds only its own models.) From Python, the harness's documented route for an
external model::

    import lm_eval
    from minimamba_moe.interop.harness import MinimambaLM
    results = lm_eval.simple_evaluate(model=MinimambaLM(pretrained="out/"), tasks=["hellaswag"])

``model_args``: ``pretrained`` (a checkpoint folder of this project, a BlackMamba hub id such as
Zyphra/BlackMamba-1.5B, fetched as sample.py --zyphra does, or a pytorch_model.bin with ``tokenizer``),
``dtype`` (auto: bfloat16 on a GPU, float32 on the CPU; or float32, bfloat16, float16), ``tokenizer``
(default: the checkpoint's), ``activation`` (geglu, swiglu: the released weights' experts),
``backend`` (reference, fast, auto: default the checkpoint's), ``max_length``, ``max_gen_toks``;
``device`` and ``batch_size`` come from the harness's options (device default: cuda when there is one).

How each request type is computed:

- ``loglikelihood`` (context, continuation): the harness's own token split
  (``TemplateLM._encode_pair``: encode context + continuation, the context's tokens first), then one
  forward per batch of ``batch_size`` requests, sorted longest first and padded on the right. Padding
  after a sequence cannot change its earlier positions (every layer is causal, and MoE layers route
  each token alone at inference), so each continuation's log-probabilities are read off that one
  forward: the sum over its tokens, and whether each was the argmax. No token is recomputed.
- ``loglikelihood_rolling`` (a whole document): a Mamba/MoE model's state carries all of the past, so
  the document is not cut into rolling windows: it is fed in chunks of ``max_length`` tokens with the
  state carried from chunk to chunk (several documents per batch), every token conditioned on every
  token before it, from the prefix token on. ``max_length`` is the checkpoint's ``max_seq_len`` (2048
  for BlackMamba, the length it was trained on): here it only bounds the memory of one forward, not
  what a token sees. Models with attention layers (the Transformer baselines) have a KV cache of
  ``max_seq_len`` positions, so for them ``max_length`` is a hard limit: rolling windows as the
  harness's own models use, and contexts cut on the left to fit.
- ``generate_until``: prefill, then ``Model.step`` one token at a time (``generate_tokens``, as
  sample.py), greedy unless the task's ``do_sample`` is true, until the end-of-text token, one of the
  task's ``until`` strings (the text is cut before it) or ``max_gen_toks`` tokens.

The empty context of a request is the end-of-text token (a newline for the byte tokenizer, as sample.py).
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from tqdm import tqdm

from minimamba_moe.config import ConfigError
from minimamba_moe.generate import generate_tokens
from minimamba_moe.model import Model
from minimamba_moe.run.checkpoint import CheckpointError
from minimamba_moe.run.memory import MemoryCheckError
from minimamba_moe.run.tokenizer import TokenizerError, load_tokenizer
from minimamba_moe.interop.convert import DEFAULT_ACTIVATION
from minimamba_moe.interop.hub import SettingError, load_pretrained, pick_batch_size, pick_device, pick_dtype

try:
    import lm_eval.models  # noqa: F401  the harness's own model names first, then ours beside them
    from lm_eval import utils as lm_utils
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.models.utils import Collator
except ImportError:
    TemplateLM = object  # the class below still defines; using it says what to install
    register_model = None

NAME = "minimamba"
NEEDS_EXTRA = "needs lm-evaluation-harness: pip install 'minimamba-moe[eval]' (lm-eval 0.4.13 or later)"
MAX_GEN_TOKS = 256  # the harness's default for its own models


class HarnessArgumentError(ValueError):
    """A model_args value this adapter cannot use; the message says which and why."""


class MinimambaLM(TemplateLM):
    """A minimamba-moe ``Model`` as an lm-evaluation-harness LM (see the module docstring)."""

    def __init__(self, pretrained: str | Model = "out", device=None, dtype="auto", batch_size=1,
                 max_batch_size=None, tokenizer=None, activation: str = DEFAULT_ACTIVATION, backend=None,
                 max_length=None, max_gen_toks: int = MAX_GEN_TOKS, **unknown):
        if register_model is None:
            raise ImportError(f"The {NAME} model {NEEDS_EXTRA}.")
        super().__init__()
        if unknown:
            raise HarnessArgumentError(f"Unknown model_args for {NAME}: {', '.join(sorted(unknown))} (known: "
                                       "pretrained, dtype, tokenizer, activation, backend, max_length, max_gen_toks).")
        self._device = pick_device(device)
        self._batch_size = pick_batch_size(batch_size)
        if isinstance(pretrained, Model):  # an instance built in Python: its tokenizer must be named
            if tokenizer is None:
                raise HarnessArgumentError("pretrained=<a Model instance> needs tokenizer= (a spec or a tokenizer).")
            self.model = pretrained.to(self._device).eval()
            self.tok = load_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer
            self.name = type(pretrained).__name__
        else:
            self.model, self.tok = load_pretrained(str(pretrained), self._device,
                                                   pick_dtype(dtype, self._device), tokenizer, activation)
            self.name = str(pretrained)
        if backend:
            self.model.set_backend(backend)
        config = self.model.config
        self.windowed = "attention" in config.layer_kinds  # a KV cache of max_seq_len: a hard limit
        self._max_length = int(max_length or config.max_seq_len)
        self._max_gen_toks = int(max_gen_toks)
        if self._max_length < 1 or self._max_gen_toks < 1:
            raise HarnessArgumentError(f"max_length={max_length}, max_gen_toks={max_gen_toks}: expected positive "
                                       "numbers of tokens.")
        if self.windowed and self._max_length > config.max_seq_len:
            raise HarnessArgumentError(f"max_length={max_length}: this model has attention layers, whose cache holds "
                                       f"max_seq_len={config.max_seq_len} positions at most.")

    # --- what the harness asks of a model --------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        eot = self.tok.eot_token
        return eot if eot is not None else self.tok.encode("\n")[0]  # the byte tokenizer has none: newline

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tok, "name", type(self.tok).__name__))

    def tok_encode(self, string: str, add_special_tokens=None, **kwargs) -> list[int]:
        return self.tok.encode(string)

    def tok_decode(self, tokens) -> str:
        return self.tok.decode(list(tokens))

    def get_model_info(self) -> dict:
        n = self.model.count_params()
        return {"model_name": self.name, "preset": self.model.config.name, "params_total": n.total,
                "params_active": n.active, "dtype": str(next(self.model.parameters()).dtype)}

    # --- scoring ----------------------------------------------------------------------------------------
    def _forward(self, rows: list[list[int]], state=None) -> torch.Tensor:
        """Token rows, padded on the right -> logits (b, l, vocab) of one forward."""
        width = max(len(r) for r in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.long, device=self._device)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        return self.model(ids, state=state).logits

    @torch.no_grad()
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """((context, continuation), context tokens, continuation tokens) -> (sum of log-probs, all greedy)."""
        order = Collator(requests, sort_fn=lambda r: (-len(r[1] + r[2]), tuple(r[1] + r[2])))
        results = []
        bar = tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0, desc="minimamba loglikelihood")
        for batch in order.get_batched(n=self._batch_size):
            rows = []
            for _, ctx, cont in batch:
                whole = ctx + cont
                if self.windowed:  # the attention cache's limit: keep the last max_length inputs
                    whole = whole[-(self._max_length + 1):]
                rows.append(whole[:-1])  # position t predicts token t + 1
            logits = self._forward(rows)
            for i, (request, _, cont) in enumerate(batch):
                n, c = len(rows[i]), len(cont)
                target = torch.tensor(cont, dtype=torch.long, device=self._device)
                logp = F.log_softmax(logits[i, n - c:n].float(), dim=-1)  # (c, vocab): only the positions scored
                answer = (float(logp.gather(-1, target[:, None]).sum()), bool((logp.argmax(-1) == target).all()))
                results.append(answer)
                if request is not None:
                    self.cache_hook.add_partial("loglikelihood", request, answer)
                bar.update(1)
        bar.close()
        return order.get_original(results)

    @torch.no_grad()
    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """The log-likelihood of each whole document, every token conditioned on all before it."""
        docs = [self.tok_encode(r.args[0]) for r in requests]
        if self.windowed:
            return self._rolling_windows(requests, docs, disable_tqdm)
        order = sorted(range(len(docs)), key=lambda i: -len(docs[i]))
        totals = [0.0] * len(docs)
        bar = tqdm(total=len(docs), disable=disable_tqdm or self.rank != 0, desc="minimamba loglikelihood_rolling")
        for start in range(0, len(order), self._batch_size):
            batch = [i for i in order[start:start + self._batch_size] if docs[i]]
            if batch:
                rows = [[self.prefix_token_id] + docs[i] for i in batch]
                state = self.model.init_state(len(batch))
                width = max(len(r) for r in rows) - 1
                for lo in range(0, width, self._max_length):  # chunks, the state carried: no window, no overlap
                    hi = min(lo + self._max_length, width)
                    logits = self._forward([r[lo:hi] for r in rows], state)
                    for j, (i, r) in enumerate(zip(batch, rows)):
                        m = min(hi, len(r) - 1) - lo  # this chunk's positions that predict a token of r
                        if m > 0:
                            target = torch.tensor(r[lo + 1:lo + 1 + m], dtype=torch.long, device=self._device)
                            logp = F.log_softmax(logits[j, :m].float(), dim=-1)
                            totals[i] += float(logp.gather(-1, target[:, None]).sum())
            bar.update(min(self._batch_size, len(order) - start))
        bar.close()
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", (request.args[0],), total)
        return totals

    def _rolling_windows(self, requests, docs, disable_tqdm) -> list[float]:
        """The harness's rolling windows of max_length tokens, for models with attention layers."""
        windows, owner = [], []
        for i, doc in enumerate(docs):
            for pair in lm_utils.get_rolling_token_windows(doc, self.prefix_token_id, self._max_length, 1):
                ctx, cont = lm_utils.make_disjoint_window(pair)
                windows.append((None, ctx, cont))
                owner.append(i)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(docs)
        for i, (ll, _) in zip(owner, scores):
            totals[i] += ll
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", (request.args[0],), total)
        return totals

    # --- generation ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Prefill + Model.step per request, stopped at end-of-text, an ``until`` string or max_gen_toks."""
        out = []
        for request in tqdm(requests, disable=disable_tqdm or self.rank != 0, desc="minimamba generate_until"):
            context, gen_kwargs = request.args
            text = self._generate(context, dict(gen_kwargs or {}))
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
            out.append(text)
        return out

    def _generate(self, context: str, kw: dict) -> str:
        until = kw.pop("until", None)
        until = [until] if isinstance(until, str) else list(until or [])
        max_new = int(kw.pop("max_gen_toks", self._max_gen_toks))
        temperature = float(kw.pop("temperature", 0.0)) if kw.pop("do_sample", False) else 0.0
        top_k, top_p = kw.pop("top_k", None), kw.pop("top_p", None)
        ids = self.tok_encode(context) or [self.prefix_token_id]
        if self.windowed:
            max_new = min(max_new, self._max_length)
            ids = ids[-(self._max_length - max_new + 1):]
        prompt = torch.tensor([ids], dtype=torch.long, device=self._device)
        new: list[int] = []
        for token in generate_tokens(self.model, prompt, max_new, temperature, top_k or None,
                                     top_p if top_p and top_p < 1 else None, vocab_size=self.tok.vocab_size):
            t = int(token[0])
            if t == self.tok.eot_token:
                break
            new.append(t)
            if until and any(s in self.tok.decode(new) for s in until if s):
                break
        text = self.tok.decode(new)
        for s in until:
            if s:
                text = text.split(s)[0]
        return text


if register_model is not None:
    register_model(NAME)(MinimambaLM)

ERRORS = (CheckpointError, TokenizerError, MemoryCheckError, ConfigError, HarnessArgumentError, SettingError)  # one line each


def main(argv: list[str] | None = None) -> int:
    """Register ``minimamba``, then run lm-eval's own command line on ``argv``."""
    prog = "python -m minimamba_moe.interop.harness"
    if register_model is None:
        print(f"{prog}: error: this command {NEEDS_EXTRA}.", file=sys.stderr)
        return 1
    from lm_eval.__main__ import cli_evaluate

    saved = sys.argv
    sys.argv = [prog, *(sys.argv[1:] if argv is None else argv)]  # cli_evaluate parses sys.argv
    try:
        cli_evaluate()
    except ERRORS as e:
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"{prog}: error: {message}", file=sys.stderr)
        return 1
    finally:
        sys.argv = saved
    return 0


if __name__ == "__main__":
    sys.exit(main())
