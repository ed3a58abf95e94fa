"""``DLMAlignLM``: a masked diffusion language model as an lm-evaluation-harness model.

* ``generate_until``: the rollout engine (:func:`align.sampling.generate`) with the sampler settings of
  ``model_args``; the completion ends at its first stop token, keeps at most ``max_gen_toks`` tokens and is cut
  at the first ``until`` string.
* ``loglikelihood``: the ELBO of the continuation given the context (:func:`align.likelihood.draw_elbo_masks`
  and :func:`align.likelihood.score_plan`, ``mc_num`` masked views); only continuation tokens are masked.
  ``is_greedy``: greedy decoding of exactly the continuation's positions (one token per step, most confident
  first, temperature 0) reproduces the continuation.
* ``loglikelihood_rolling``: the sum over lm-eval's disjoint rolling windows of each window's ELBO given the
  tokens before it, a lower bound on the log-likelihood of the whole text.

All randomness comes from explicit generators seeded by ``model_args.seed``: one stream for generation, and
for each scored sequence masks drawn from a seed derived from ``seed`` and its token ids, so a score does not
depend on the batch it was computed in.
"""

from __future__ import annotations

import logging
import zlib
from typing import Any

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm.auto import tqdm

from align.evaluate import stop_token_ids
from align.integrations.lm_eval.settings import HarnessModelArgs
from align.likelihood import MaskPlan, draw_elbo_masks, score_plan
from align.rng import derive_seed

logger = logging.getLogger(__name__)

#: Generation keywords of a task that are honoured; the sampler settings themselves come from ``model_args``.
HONOURED_GEN_KWARGS = ("until", "max_gen_toks")


def _left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.as_tensor(r, dtype=torch.long)
        mask[i, width - len(r):] = 1
    return ids, mask


def _stack_plans(plans: list[MaskPlan], pad_id: int) -> MaskPlan:
    """One plan from single-sequence plans of different lengths, left padded (padding never counts)."""
    width = max(p.input_ids.shape[1] for p in plans)

    def pad(t: torch.Tensor, value: Any) -> torch.Tensor:
        return torch.nn.functional.pad(t, (width - t.shape[1], 0), value=value)

    return MaskPlan(
        estimator=plans[0].estimator,
        input_ids=torch.cat([pad(p.input_ids, pad_id) for p in plans]),
        attention_mask=torch.cat([pad(p.attention_mask, False) for p in plans]),
        response_mask=torch.cat([pad(p.response_mask, False) for p in plans]),
        row_seq=torch.cat([torch.full_like(p.row_seq, b) for b, p in enumerate(plans)]),
        masked=torch.cat([pad(p.masked, False) for p in plans]),
        coef=torch.cat([pad(p.coef, 0.0) for p in plans]),
        t=torch.cat([p.t for p in plans]),
        num_samples=plans[0].num_samples,
    )


def _cut_at(text: str, until: list[str]) -> str:
    ends = [text.find(s) for s in until if s]
    ends = [e for e in ends if e >= 0]
    return text[: min(ends)] if ends else text


class DLMAlignLM(TemplateLM):
    """A dlm-align denoiser (``builtin:``, directory or Hub id) for lm-evaluation-harness.

    Built by lm-eval from ``--model dlm-align --model_args key=value,...``; the keys are the fields of
    :class:`~align.integrations.lm_eval.settings.HarnessModelArgs`. lm-eval's ``--batch_size`` and ``--device``
    are used unless ``model_args`` names them too.
    """

    backend = "causal"  # lm-eval splits context and continuation from one encoding of their concatenation

    def __init__(self, **model_args: Any) -> None:
        super().__init__()
        self.settings = HarnessModelArgs.from_dict(model_args)
        from align.models import load_tokenizer, resolve_model
        from align.models.adapters import detect_denoiser_kind, load_denoiser
        from align.models.resolve import DTYPES

        s = self.settings
        self._device = self._pick_device(s.device)
        dtype = DTYPES[s.dtype] if s.dtype != "auto" else (
            torch.bfloat16 if self._device.type == "cuda" else torch.float32)
        resolved = resolve_model(s.pretrained)
        kind = detect_denoiser_kind(resolved.path, s.adapter)
        if s.cache is not None and kind not in (None, "llada"):
            raise ValueError(f"model_args.cache={s.cache!r}: the {kind} adapter of {s.pretrained} has no KV-context "
                             "support; use cache=none")
        self.tokenizer = load_tokenizer(s.tokenizer or resolved)
        self.model = load_denoiser(resolved, kind or s.adapter, dtype=dtype, device=self._device,
                                   tokenizer=self.tokenizer).eval()
        config_max = getattr(self.model.config, "max_sequence_length", None)
        self.max_length = int(s.max_length or config_max or 2048)
        if self.max_length <= s.gen_length:
            raise ValueError(f"model_args.gen_length={s.gen_length} leaves no room for a prompt within the model's "
                             f"{self.max_length} positions; lower gen_length or raise max_length")
        self._stops = stop_token_ids(self.tokenizer)
        self._pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eot_token_id
        self._generator = torch.Generator(device="cpu").manual_seed(s.seed)
        self._warned: set[str] = set()

    @staticmethod
    def _pick_device(name: str | None) -> torch.device:
        if name is None:
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        device = torch.device(name)
        if device.type == "cuda" and not torch.cuda.is_available():
            logger.warning("device %s requested but CUDA is not available: using the CPU", name)
            return torch.device("cpu")
        return device

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict[str, Any], additional_config: dict[str, Any] | None = None
                            ) -> DLMAlignLM:
        """lm-eval's constructor hook; keys given in ``model_args`` win over lm-eval's own (``batch_size``,
        ``device``), and ``max_batch_size`` is passed only when set."""
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in arg_dict}
        return cls(**arg_dict, **extra)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict[str, Any] | None = None
                               ) -> DLMAlignLM:
        """As :meth:`create_from_arg_obj`, from ``key=value,...``."""
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    # tokenization ---------------------------------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        """The tokenizer's EOS id."""
        return int(self.tokenizer.eos_token_id)

    @property
    def prefix_token_id(self) -> int:
        """The token an empty context is replaced by: BOS when the tokenizer has one, else EOS."""
        bos = self.tokenizer.bos_token_id
        return int(bos) if bos is not None else self.eot_token_id

    @property
    def tokenizer_name(self) -> str:
        """Name of the tokenizer (lm-eval keys its request cache by it)."""
        return str(getattr(self.tokenizer, "name_or_path", "") or self.settings.pretrained).replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        """Token ids of ``string`` (the tokenizer's own special-token default unless told)."""
        extra = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        return list(self.tokenizer(string, **extra).input_ids)

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The tokenizer's chat template applied to ``chat_history`` (lm-eval's ``--apply_chat_template``)."""
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    # log-likelihood -------------------------------------------------------------------------------------------

    def _fit(self, context: list[int], continuation: list[int]) -> list[int]:
        """The context cut from the left so that context + continuation fits in ``max_length``."""
        room = self.max_length - len(continuation)
        if room < 0:
            raise ValueError(f"a continuation of {len(continuation)} tokens does not fit in the model's "
                             f"{self.max_length} positions (model_args.max_length)")
        return context[len(context) - room:] if len(context) > room else context

    @torch.no_grad()
    def _elbo(self, pairs: list[tuple[list[int], list[int]]]) -> list[float]:
        """ELBO of each continuation given its context, ``batch_size`` sequences per scoring call."""
        s = self.settings
        out: list[float] = [0.0] * len(pairs)
        order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
        for start in range(0, len(order), s.batch_size):
            chunk = order[start:start + s.batch_size]
            plans = []
            for i in chunk:
                context, continuation = pairs[i]
                ids = torch.tensor([context + continuation], dtype=torch.long)
                resp = torch.zeros_like(ids, dtype=torch.bool)
                resp[0, len(context):] = True
                seed = derive_seed(s.seed, zlib.crc32(str(ids[0].tolist()).encode()), len(context))
                plans.append(draw_elbo_masks(ids, resp, generator=seed, sampler=s.elbo_sampler, num_samples=s.mc_num))
            plan = _stack_plans(plans, self._pad_id).to(self._device)
            est = score_plan(self.model, plan, micro_batch_size=s.mc_batch_size)
            for i, value in zip(chunk, est.seq_logp.double().cpu().tolist()):
                out[i] = float(value)
        return out

    @torch.no_grad()
    def _greedy(self, pairs: list[tuple[list[int], list[int]]]) -> list[bool]:
        """Whether greedy decoding of each continuation's positions (one token per step) reproduces it."""
        from align.sampling import generate

        out = [False] * len(pairs)
        by_length: dict[int, list[int]] = {}
        for i, (_, continuation) in enumerate(pairs):
            by_length.setdefault(len(continuation), []).append(i)
        for length, members in sorted(by_length.items()):
            for start in range(0, len(members), self.settings.batch_size):
                chunk = members[start:start + self.settings.batch_size]
                ids, mask = _left_pad([pairs[i][0] for i in chunk], self._pad_id)
                res = generate(self.model, ids.to(self._device), attention_mask=mask.to(self._device),
                               gen_length=length, steps=length, block_length=length, temperature=0.0,
                               remasking="low_confidence", generator=self._generator)
                target = torch.tensor([pairs[i][1] for i in chunk], dtype=torch.long)
                hits = (res.completion_ids.cpu() == target).all(dim=1).tolist()
                for i, hit in zip(chunk, hits):
                    out[i] = bool(hit)
        return out

    def _loglikelihood_tokens(self, requests: list[tuple[tuple[str, str], list[int], list[int]]],
                              disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        """``(ELBO, is_greedy)`` per ``((context, continuation), context_ids, continuation_ids)``."""
        pairs = [(self._fit(list(ctx), list(cont)), list(cont)) for _, ctx, cont in requests]
        scored = [i for i, (_, cont) in enumerate(pairs) if cont]
        values = [0.0] * len(pairs)
        greedy = [True] * len(pairs)  # an empty continuation is trivially reproduced, with log-likelihood 0
        for start in tqdm(range(0, len(scored), 64 * self.settings.batch_size), desc="dlm-align loglikelihood",
                          disable=disable_tqdm or not scored):
            part = scored[start:start + 64 * self.settings.batch_size]
            chunk_pairs = [pairs[i] for i in part]
            lls = self._elbo(chunk_pairs)
            hits = self._greedy(chunk_pairs) if self.settings.greedy_check == "decode" else [False] * len(part)
            for i, ll, hit in zip(part, lls, hits):
                values[i], greedy[i] = ll, hit
        results = list(zip(values, greedy))
        for (key, _, _), res in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", key, res)
        return results

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Per text: the sum over lm-eval's disjoint rolling windows (``max_length`` positions each) of the
        window's ELBO given the tokens before it; the first window is conditioned on :attr:`prefix_token_id`."""
        pairs: list[tuple[list[int], list[int]]] = []
        owner: list[int] = []
        for n, (text,) in enumerate(req.args for req in requests):
            windows = get_rolling_token_windows(self.tok_encode(text, add_special_tokens=False),
                                                self.prefix_token_id, self.max_length - 1, 1)
            for context, pred in map(make_disjoint_window, windows):
                pairs.append((self._fit(list(context), list(pred)), list(pred)))
                owner.append(n)
        totals = [0.0] * len(requests)
        scored = [i for i, (_, pred) in enumerate(pairs) if pred]
        for start in tqdm(range(0, len(scored), 64 * self.settings.batch_size), desc="dlm-align rolling",
                          disable=disable_tqdm or not scored):
            part = scored[start:start + 64 * self.settings.batch_size]
            for i, ll in zip(part, self._elbo([pairs[i] for i in part])):
                totals[owner[i]] += ll
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # generation -----------------------------------------------------------------------------------------------

    def _warn_once(self, key: str, message: str, *args: Any) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(message, *args)

    def _request_limits(self, gen_kwargs: dict[str, Any]) -> tuple[list[str], int]:
        """``until`` strings and the token budget of one request; other keywords are logged once and ignored."""
        kwargs = dict(gen_kwargs or {})
        until = kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        max_toks = kwargs.pop("max_gen_toks", None)
        budget = self.settings.gen_length if max_toks is None else min(int(max_toks), self.settings.gen_length)
        if max_toks is not None and int(max_toks) > self.settings.gen_length:
            self._warn_once("max_gen_toks", "a task asks for up to %s tokens but model_args.gen_length=%d decodes "
                            "only %d", max_toks, self.settings.gen_length, self.settings.gen_length)
        temp = kwargs.pop("temperature", None)
        do_sample = kwargs.pop("do_sample", None)
        asked = 0.0 if do_sample is False else temp
        if asked is not None and float(asked) != self.settings.temperature:
            self._warn_once("temperature", "a task asks for temperature %s; dlm-align samples with "
                            "model_args.temperature=%s", asked, self.settings.temperature)
        if kwargs:
            self._warn_once("gen_kwargs", "generation keywords %s are ignored (the sampler settings come from "
                            "model_args)", sorted(kwargs))
        return until, budget

    @torch.no_grad()
    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Decode each context with the rollout engine; cut at the first stop token, ``max_gen_toks`` tokens and
        the first ``until`` string."""
        from align.sampling import completion_lengths, generate

        s = self.settings
        kwargs = s.sampler_settings().generate_kwargs()
        prompts, limits = [], []
        for context, gen_kwargs in (req.args for req in requests):
            ids = self.tok_encode(context) or [self.prefix_token_id]
            prompts.append(ids[-(self.max_length - s.gen_length):])
            limits.append(self._request_limits(gen_kwargs))
        out = [""] * len(requests)
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        for start in tqdm(range(0, len(order), s.batch_size), desc="dlm-align generate_until",
                          disable=disable_tqdm):
            chunk = order[start:start + s.batch_size]
            ids, mask = _left_pad([prompts[i] for i in chunk], self._pad_id)
            res = generate(self.model, ids.to(self._device), attention_mask=mask.to(self._device), **kwargs,
                           generator=self._generator)
            comp = res.completion_ids.cpu()
            lengths = completion_lengths(comp, self._stops)[0].tolist()
            for row, i in enumerate(chunk):
                until, budget = limits[i]
                keep = comp[row, : min(int(lengths[row]), budget)].tolist()
                out[i] = _cut_at(self.tokenizer.decode(keep, skip_special_tokens=True), until)
        for req, text in zip(requests, out):
            self.cache_hook.add_partial("generate_until", req.args, text)
        return out
