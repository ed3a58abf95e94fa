"""Diffusion GRPO on ``transformers.Trainer``: rollouts, rewards, group advantages, clipped updates.

One optimizer step (its micro-batches of prompts are fetched together by :meth:`get_batch_samples`):

1. every ``μ = num_iterations`` steps, for each micro-batch, sample ``G`` completions per prompt with the
   rollout engine (:func:`align.sampling.generate`, generator seeded from ``(seed, cycle, g)``, where
   ``g = micro · world_size + rank`` is the micro-batch's index in the optimizer step's global batch), score
   them with the reward functions (TRL's calling convention and data forms, failures isolated by
   :class:`align.rewards.RewardRunner`) and compute group advantages. As in TRL, the data loader yields each
   step's prompts ``μ`` times in a row (:mod:`align.trainers.grpo_buffer`), so the rollouts of the first pass
   serve the other ``μ − 1`` and every prompt is used;
2. draw one mask plan per inner iteration ``k < μ`` (seeded from ``(seed, cycle, g, k)``) and,
   without gradients, score it under the rollout policy (``old``) and the reference;
3. score iteration ``k``'s plan under the current policy with gradients and minimise ``loss_type``'s objective
   (``−min(ρA, clip(ρ, 1−ε, 1+ε_high)A) + β·k3`` for grpo) with its normalisation (:mod:`.grpo_math`). At
   ``k = 0`` the old scores are the current ones detached, so ``ρ = 1`` exactly.

Without a KL term (``β = 0``) completions with ``A_i = 0`` (groups whose rewards are all equal) are left out
of the likelihood passes: they add nothing to the loss, and aggregation still counts them.

Metrics (TRL's names where the meaning is the same: ``reward``, ``rewards/<fn>/mean``, ``completions/*``,
``clip_ratio/*``, ``kl``, ...; plus advantages, rollout time share and tokens/s; ``docs/grpo.md``) go to the
Trainer's loggers; samples of completions to ``<output_dir>/completions.jsonl``.

Across processes (``docs/distributed.md``): each rank samples, scores and normalises whole groups of its own
prompts, so advantages never mix ranks; a micro-batch's random streams depend on its place ``g`` in the global
batch, not on the layout, so ``N`` processes draw the rollouts and masks of one process with ``N`` times the
accumulation steps. Logged metrics are the mean over every rank's micro-batches and ``completions.jsonl`` holds
every rank's samples (both gathered at each logging step). Under ZeRO-3 and FSDP2 the rollout and its old and
reference scores run on whole weights gathered once per rollout (:mod:`align.trainers.whole_weights`).
"""

from __future__ import annotations

import copy
import json
import logging
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import DistributedType
from transformers import Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from align.likelihood import LikelihoodEstimate, draw_masks, score_plan
from align.rng import make_generator
from align.trainers.checkpoints import CompleteMarker, StagedCheckpoints
from align.trainers.grpo_buffer import load_rollouts, repeated_window_sampler, save_rollouts
from align.trainers.grpo_config import GRPOOptions
from align.trainers.grpo_loss import policy_loss
from align.trainers.grpo_math import RATIO_FREE, WINDOW_NORMALIZED, group_advantages
from align.trainers.grpo_metrics import rollout_metrics, window_means
from align.trainers.grpo_rollout import Sampled, completion_loss_mask, sample_and_score
from align.trainers.guards import install_guard
from align.trainers.hints import all_wrong_groups, hint_ids, reference_tokens, splice
from align.trainers.shim import ForwardShim, base_model
from align.trainers.whole_weights import whole_weights

logger = logging.getLogger(__name__)


@dataclass
class Rollout:
    """One micro-batch of rollouts and everything the μ inner iterations need."""

    prompt_ids: torch.Tensor         # [N/G, P] the micro-batch's prompts (CPU), to check the reused passes
    input_ids: torch.Tensor          # [N, P + L] prompt (left padded) + completion
    attention_mask: torch.Tensor     # [N, P + L]
    completion_mask: torch.Tensor    # [N, L] completion positions in the loss
    advantages: torch.Tensor         # [N]
    plans: list[Any]                 # one MaskPlan per inner iteration
    old: list[LikelihoodEstimate | None]
    ref: list[LikelihoodEstimate | None]
    prompt_len: int


class DiffusionGRPOTrainer(StagedCheckpoints, Trainer):
    """GRPO-family trainer for masked diffusion models (diffu-GRPO, coupled-GRPO, ELBO-GRPO).

    Args:
        options: :class:`~align.trainers.grpo_config.GRPOOptions`.
        reward_runner: calls the reward functions; returns per-function rewards and the weighted total.
        stop_ids: EOS / end-of-turn ids that end a completion.
        seed: base seed of the rollout and mask streams.
        *args, **kwargs: passed to ``Trainer``; batches come from :class:`~align.data.collator.PromptCollator`.

    ``args.per_device_train_batch_size`` counts completions, as in TRL; the dataloader yields
    ``per_device_train_batch_size / num_generations`` prompts per micro-batch, and each is sampled
    ``num_generations`` times. The effective numbers are logged when the trainer is built. With
    ``num_iterations > 1`` the dataloader yields each optimizer step's prompts ``num_iterations`` times in a row
    (:class:`~align.trainers.grpo_buffer.RepeatedWindowSampler`).
    """

    def __init__(self, *args: Any, options: GRPOOptions, reward_runner: Any, stop_ids: list[int], seed: int = 0,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.options = options
        completions = self.args.per_device_train_batch_size
        if completions % options.num_generations:
            raise ValueError(f"per_device_train_batch_size ({completions}) counts completions and must be a multiple "
                             f"of num_generations ({options.num_generations})")
        # the dataloader yields prompts: per_device_train_batch_size / G of them per micro-batch
        self._train_batch_size = options.prompts_per_device(completions) * max(1, self.args.n_gpu)
        prompts_per_step = self.get_total_train_batch_size(self.args)
        logger.info("grpo batch: %d completions per device = %d prompt(s) x %d generations; %d prompt(s) and %d "
                    "completions per optimizer step (x%d accumulation, %d process(es))", completions,
                    self._train_batch_size, options.num_generations, prompts_per_step,
                    prompts_per_step * options.num_generations, self.args.gradient_accumulation_steps,
                    self.args.world_size)
        self.reward_runner = reward_runner
        if options.hint_column is not None and options.hint_reward not in (None, *reward_runner.names):
            raise ValueError(f"grpo.hint_reward {options.hint_reward!r} is not one of the stage's rewards "
                             f"{list(reward_runner.names)}")
        self.stop_ids = list(stop_ids)
        self.rl_seed = int(seed)
        self._buffer: dict[int, Rollout] = {}
        self._buffer_cycle = -1
        self._window_tokens: float | None = None     # dapo / cispo: completion tokens per process in the step
        self._micro_step: tuple[int, int] = (-1, 0)
        self._metrics: dict[str, list[float]] = defaultdict(list)
        self._samples: list[dict[str, Any]] = []
        self._time = {"rollout": 0.0, "total": 0.0, "tokens": 0.0}
        self._guard_cfg = options.loop_guard_config()
        self.ref_model = None
        if options.beta > 0 and not hasattr(self.model, "disable_adapter"):
            self.ref_model = copy.deepcopy(base_model(self.model)).eval().requires_grad_(False)
        self.guard = install_guard(self, options.max_nonfinite_steps)
        self.add_callback(CompleteMarker())

    # ------------------------------------------------------------------------------------------ batches
    def _get_train_sampler(self, train_dataset: Any = None) -> Any:
        """μ = 1: the Trainer's sampler. μ > 1: each optimizer step's prompts μ times in a row (as TRL)."""
        if self.options.num_iterations == 1:
            return super()._get_train_sampler(train_dataset)
        ds = self.train_dataset if train_dataset is None else train_dataset
        window = self._train_batch_size * self.args.gradient_accumulation_steps * max(1, self.args.world_size)
        return repeated_window_sampler(len(ds), window, self.options.num_iterations,
                                       seed=self.args.seed if self.args.data_seed is None else self.args.data_seed,
                                       strategy=str(getattr(self.args, "train_sampling_strategy", "random")))

    def get_batch_samples(self, epoch_iterator: Any, num_batches: int, device: Any) -> tuple[list, Any]:
        """Fetch one optimizer step's micro-batches and prepare their rollouts (sampled, or reused within a cycle)."""
        batches, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        if batches:
            self._prepare_window(batches)
        return batches, num_items

    def _prepare_window(self, batches: list[dict[str, Any]]) -> None:
        step, mu = self.state.global_step, self.options.num_iterations
        cycle, k = divmod(step, mu)
        if k and self._buffer_cycle == cycle and len(self._buffer) == len(batches):
            for j, b in enumerate(batches):
                if not torch.equal(b["prompt_ids"].cpu(), self._buffer[j].prompt_ids.cpu()):
                    raise RuntimeError(f"step {step} (inner iteration {k} of {mu}): micro-batch {j} is not the "
                                       "micro-batch the buffered rollouts were sampled for")
            return
        if k:
            logger.warning("step %d is inner iteration %d of %d, but no rollouts of this cycle are buffered (a "
                           "checkpoint saved without them); sampling new ones", step, k, mu)
        t0 = time.perf_counter()
        self._buffer = {j: self._rollout(self._prepare_inputs(b), cycle, j) for j, b in enumerate(batches)}
        self._buffer_cycle = cycle
        self._window_tokens = None
        if self.options.loss_type in WINDOW_NORMALIZED:
            local = torch.stack([ro.completion_mask.sum() for ro in self._buffer.values()]).sum().float()
            total = self.accelerator.reduce(local, reduction="sum")
            self._window_tokens = float(total) / self.accelerator.num_processes
        self._time["total"] += time.perf_counter() - t0

    # ------------------------------------------------------------------------------------------ rollouts
    def _micro_index(self) -> int:
        step = self.state.global_step
        last, micro = self._micro_step
        micro = micro + 1 if last == step else 0
        self._micro_step = (step, micro)
        return micro

    def _policy(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.model)

    def _ref_scores(self, plan: Any) -> LikelihoodEstimate | None:
        if self.options.beta <= 0:
            return None
        policy = self._policy()
        if self.ref_model is not None:
            return score_plan(self.ref_model, plan)
        with policy.disable_adapter():  # LoRA: the reference is the base model
            return score_plan(base_model(policy), plan)

    @torch.no_grad()
    def _rollout(self, inputs: dict[str, Any], cycle: int, micro: int) -> Rollout:
        o, G = self.options, self.options.num_generations
        t0 = time.perf_counter()
        policy = self._policy()
        was_training = policy.training
        policy.eval()
        g = micro * self.args.world_size + self.args.process_index     # place in the global batch
        ids = inputs["prompt_ids"].repeat_interleave(G, 0)
        att = inputs["prompt_mask"].repeat_interleave(G, 0)
        rows = inputs["rows"]
        with whole_weights(self.model_wrapped, self.model):   # ZeRO-3 / FSDP2: one gather per rollout
            guard = self._guard_cfg.build(self.stop_ids)
            sampled = self._sample(policy, ids, att, rows, make_generator(self.rl_seed, cycle, g, 0, 0), guard)
            if guard is not None:
                self._metrics["rollout/loop_guard_rows"].append(guard.stats["rows"] / len(ids))
            if o.hint_column is not None:
                sampled = self._hint(policy, sampled, ids, att, rows, make_generator(self.rl_seed, cycle, g, 0, -1))
            P, L = ids.shape[1], o.gen_length
            lengths, texts, per_fn, total = sampled.lengths, sampled.texts, sampled.per_function, sampled.total
            has_stop = lengths < L
            comp_mask = completion_loss_mask(lengths, L, eos_fill_in_loss=o.eos_fill_in_loss,
                                             mask_truncated=o.mask_truncated_completions) & ~sampled.given
            A = group_advantages(total.float(), G, scale_rewards=o.scale_rewards, baseline=o.baseline).to(ids.device)
            if o.negative_advantage_scale != 1.0:
                A = torch.where(A < 0, A * o.negative_advantage_scale, A)
            input_ids = sampled.sequences
            attention = torch.cat([att, torch.ones_like(comp_mask, dtype=att.dtype)], 1)
            response = torch.cat([torch.zeros_like(att, dtype=torch.bool), comp_mask], 1)
            mu, trajectory = o.num_iterations, {}
            if o.estimator == "trace":   # when each position was decoded; the prompt is never masked
                trajectory["commit_step"] = torch.cat([torch.full_like(att, -1, dtype=torch.long), sampled.commit_step],
                                                         1)
            # one plan per inner iteration; the trace plan is a function of the trajectory, so one serves all
            n_plans = 1 if o.estimator == "trace" else mu
            drawn = [draw_masks(input_ids, response, estimator=o.estimator, attention_mask=attention,
                                generator=make_generator(self.rl_seed, cycle, g, 0, 1 + k), **trajectory,
                                **o.estimator_args).to(input_ids.device) for k in range(n_plans)]
            if o.beta == 0:
                # A_i = 0 contributes nothing to the loss without a KL term: score only the completions with a
                # non-zero advantage (the others cost no forward pass); aggregation still counts every completion
                drawn = [p.restricted_to(A != 0) for p in drawn]
            # ratio-free objectives (spg, wd1) never read the old policy's scores
            old_iters = set() if o.loss_type in RATIO_FREE else {k % n_plans for k in range(1, mu)}
            old_by = {j: score_plan(base_model(policy), drawn[j]) for j in sorted(old_iters)}
            ref_by = [self._ref_scores(p) for p in drawn]
        plans = [drawn[k % n_plans] for k in range(mu)]
        old = [None] + [old_by.get(k % n_plans) for k in range(1, mu)]
        ref = [ref_by[k % n_plans] for k in range(mu)]
        if was_training:
            policy.train()
        dt = time.perf_counter() - t0
        self._time["rollout"] += dt
        self._time["tokens"] += float(len(ids) * L)
        prompts = [r["prompt"] for r in rows for _ in range(G)]
        columns = {k: [r[k] for r in rows for _ in range(G)] for k in rows[0] if k != "prompt"}
        self._log_rollout(sampled.names, per_fn, total, A, lengths, has_stop, prompts, texts, columns)
        return Rollout(inputs["prompt_ids"].cpu(), input_ids, attention, comp_mask, A, plans, old, ref, P)

    def _sample(self, policy: torch.nn.Module, ids: torch.Tensor, att: torch.Tensor, rows: list[dict[str, Any]],
                gen: torch.Generator, guard: Any = None, fixed: torch.Tensor | None = None) -> Sampled:
        return sample_and_score(base_model(policy), ids, att, rows, self.options.num_generations,
                                generate_kwargs=self.options.generate_kwargs(), stop_ids=self.stop_ids,
                                tokenizer=self.processing_class, reward_runner=self.reward_runner, generator=gen,
                                on_commit=guard, fixed=fixed)

    def _hint(self, policy: torch.nn.Module, s: Sampled, ids: torch.Tensor, att: torch.Tensor,
              rows: list[dict[str, Any]], gen: torch.Generator) -> Sampled:
        """IGPO-style hints (:mod:`align.trainers.hints`) for the groups whose completions are all wrong."""
        o, G = self.options, self.options.num_generations
        reward = o.hint_reward or s.names[0]
        groups = all_wrong_groups(s, reward, G).nonzero().flatten()
        self._metrics["hints/all_wrong_groups"].append(len(groups) / (len(ids) // G))
        if len(groups) == 0:
            return s
        picked = [rows[b] for b in groups.tolist()]
        refs = reference_tokens(picked, o.hint_column, self.processing_class)
        fixed = hint_ids(refs, o.gen_length, int(base_model(policy).mask_token_id), tuple(o.hint_ratio), gen)
        take = (groups[:, None] * G + torch.arange(G)).flatten().to(ids.device)
        hinted = self._sample(policy, ids[take], att[take], picked, gen, fixed=fixed.repeat_interleave(G, 0))
        s, replaced = splice(s, hinted, groups, reward, G, o.hint_replace)
        self._metrics["hints/replaced_completions"].append(replaced / len(ids))
        return s

    def _log_rollout(self, names: tuple[str, ...], per_fn: torch.Tensor, total: torch.Tensor, A: torch.Tensor,
                     lengths: torch.Tensor, has_stop: torch.Tensor, prompts: list[Any], texts: list[str],
                     columns: dict[str, list]) -> None:
        m = self._metrics
        for k, v in rollout_metrics(names, per_fn, total, A, lengths, has_stop, self.options.num_generations).items():
            m[k].append(v)
        for k, v in self.reward_runner.metrics(prefix="reward_errors/").items():
            if k.endswith(("/failed_samples", "/timeouts", "/error_rate", "stuck_calls")):
                m[k].append(float(v))
        n = min(self.options.log_completions, len(texts))
        for i in range(n):
            extra = {f"column/{k}": v[i] for k, v in columns.items() if isinstance(v[i], (str, int, float))}
            self._samples.append({**extra, "step": self.state.global_step,
                                  "prompt": prompts[i] if isinstance(prompts[i], str) else prompts[i][-1]["content"],
                                  "completion": texts[i], "reward": None if torch.isnan(total[i]) else float(total[i]),
                                  "advantage": float(A[i])})

    # ------------------------------------------------------------------------------------------ loss
    def _policy_loss(self, model: torch.nn.Module, ro: Rollout, k: int) -> torch.Tensor:
        scorer = ForwardShim(model, base_model(self._policy())) if base_model(self._policy()) is not model else model
        window = self._window_tokens if self.options.loss_type in WINDOW_NORMALIZED else None
        loss, metrics = policy_loss(self.options, scorer, ro, k, window_tokens=window, guard=self.guard)
        for key, v in metrics.items():
            self._metrics[key].append(v)
        return loss

    def training_step(self, model: torch.nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None
                      ) -> torch.Tensor:
        """One policy-gradient backward pass on this micro-batch's buffered rollouts (prepared by
        :meth:`get_batch_samples`)."""
        t0 = time.perf_counter()
        step, mu = self.state.global_step, self.options.num_iterations
        micro = self._micro_index()
        if micro not in self._buffer:   # called outside the Trainer's loop: roll this micro-batch out alone
            self._buffer[micro] = self._rollout(self._prepare_inputs(inputs), step // mu, micro)
            self._buffer_cycle, self._window_tokens = step // mu, None
        model.train()
        loss = self._policy_loss(model, self._buffer[micro], step % mu)
        if self.options.loss_type not in WINDOW_NORMALIZED:
            loss = loss / self.current_gradient_accumulation_steps
        kwargs: dict[str, Any] = {}
        if self.accelerator.distributed_type == DistributedType.DEEPSPEED:
            kwargs["scale_wrt_gas"] = False
        self.accelerator.backward(loss, **kwargs)
        self._time["total"] += time.perf_counter() - t0
        return loss.detach()

    def compute_loss(self, model: torch.nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> torch.Tensor:
        """Not used: :meth:`training_step` computes the loss from buffered rollouts."""
        raise NotImplementedError("DiffusionGRPOTrainer computes its loss in training_step")

    # ------------------------------------------------------------------------------------------ checkpoints
    def _save_checkpoint(self, model: torch.nn.Module, trial: Any) -> None:
        """Save the checkpoint and, between two inner iterations, the buffered rollouts the next steps reuse."""
        super()._save_checkpoint(model, trial)
        step, mu = self.state.global_step, self.options.num_iterations
        if mu > 1 and step % mu and self._buffer_cycle == step // mu:
            folder = Path(self._get_output_dir(trial=trial)) / f"{PREFIX_CHECKPOINT_DIR}-{step}"
            save_rollouts(folder, self.args.process_index, {"cycle": self._buffer_cycle, "buffer": self._buffer,
                                                            "window_tokens": self._window_tokens})

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs: Any) -> Any:
        """``Trainer.train``; a resumed run first reloads the rollouts buffered in its checkpoint (if any)."""
        path = get_last_checkpoint(self.args.output_dir) if resume_from_checkpoint is True else resume_from_checkpoint
        if isinstance(path, str):
            state = load_rollouts(path, self.args.process_index, self.args.device)
            if state is not None:
                self._buffer, self._buffer_cycle = state["buffer"], state["cycle"]
                self._window_tokens = state["window_tokens"]
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    # ------------------------------------------------------------------------------------------ logging
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the GRPO metrics, averaged over the logging window and every rank's micro-batches (and write every
        rank's sampled completions) at each logging step. Called on every rank."""
        if "loss" in logs:
            window = dict(self._metrics)
            if self._time["total"] > 0:
                window["rollout/time_share"] = [self._time["rollout"] / self._time["total"]]
            if self._time["rollout"] > 0:
                window["rollout/tokens_per_second"] = [self._time["tokens"] / self._time["rollout"]]
            gathered = self._gather_ranks((window, self._samples))
            merged: dict[str, list[float]] = defaultdict(list)
            for rank_window, _ in gathered:
                for key, vals in rank_window.items():
                    merged[key].extend(vals)
            logs.update(self.guard.log_fields())
            logs.update(window_means(merged))
            self._samples = [s for _, samples in gathered for s in samples]
            self._metrics.clear()
            self._time = {"rollout": 0.0, "total": 0.0, "tokens": 0.0}
            self._write_samples()
        super().log(logs, start_time)

    def _gather_ranks(self, obj: Any) -> list[Any]:
        """``obj`` of every rank, in rank order (``[obj]`` with one process)."""
        if self.args.world_size == 1:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.args.world_size
        dist.all_gather_object(out, obj)
        return out

    def _write_samples(self) -> None:
        if not self._samples or not self.is_world_process_zero():
            self._samples = []
            return
        path = Path(self.args.output_dir) / "completions.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            for s in self._samples:
                f.write(json.dumps(s, default=str) + "\n")
        if "wandb" in (self.args.report_to or []):
            import wandb

            if wandb.run is not None:
                cols = sorted({k for s in self._samples for k in s})
                wandb.log({"completions": wandb.Table(columns=cols, data=[[s.get(c) for c in cols]
                                                                           for s in self._samples])})
        self._samples = []

