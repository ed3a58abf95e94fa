"""VRPO on ``transformers.Trainer``: DPO-family preference optimization with ELBO estimates of the likelihoods.

A masked diffusion model has no tractable ``log π(y | x)``; VRPO (LLaDA 1.5) puts the ELBO estimate ``B̂`` in its
place in the DPO loss and lowers the variance of the preference score ``β h`` (``docs/concepts.md`` §4) with three
choices, all made when the mask plan of a batch is drawn:

* **optimal allocation**: the budget ``n`` (``num_samples``) is spent on ``n`` masking levels with one mask each;
* **stratified levels**: with ``sampler: l_stratified`` the ``n`` masked-token counts are spread ``L/n`` apart;
* **antithetic sharing**: the policy and the reference score the same plan, so the noise they have in common
  cancels in ``B̂_θ − B̂_ref`` (``share_masks``).

Each pair's draws come from a generator keyed by ``(seed, pair, step)``, drawn on the pair alone (chosen and
rejected, cut to their own width): a resumed run draws the same masks, and a pair's draws do not depend on the
pairs it is batched with. The reference (``reference``) is the model the stage starts from: the adapter disabled
under LoRA, a frozen copy otherwise, or its estimates precomputed in one pass over the pairs (then each pair keeps
the draws of key ``(seed, pair)`` for the whole run, so sharing stays exact).

Metrics (TRL's DPO names): ``rewards/chosen``, ``rewards/rejected``, ``rewards/accuracies``, ``rewards/margins``,
``logps/chosen``, ``logps/rejected`` (the ELBO estimates ``B̂_θ``), and ``preference/score_variance``, the
estimator variance of ``β h`` (:func:`~align.trainers.vrpo_math.score_variance`). With held-out pairs the stage
scores them before and after training and writes ``<stage>/preference_eval.json``.
"""

from __future__ import annotations

import copy
import json
import logging
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer

from align.data.preference import PAIR_COLUMNS
from align.likelihood import LikelihoodEstimate, MaskPlan, draw_elbo_masks, score_plan
from align.rng import make_generator
from align.stats import mcnemar_exact
from align.trainers.checkpoints import CompleteMarker, StagedCheckpoints
from align.trainers.grpo_metrics import window_means
from align.trainers.guards import install_guard
from align.trainers.shim import ForwardShim, base_model
from align.trainers.vrpo_config import VRPOOptions
from align.trainers.vrpo_math import combined_loss, score_variance, stack_plans

logger = logging.getLogger(__name__)

#: first part of every VRPO draw key after the seed ("VRPO" in ASCII), so its streams differ from other stages'.
_STREAM = 0x5652504F
#: draw keys of the precomputed-reference draws (fixed for the run) and of the held-out evaluation.
FIXED_DRAW, EVAL_DRAW = -1, -2


class DiffusionVRPOTrainer(StagedCheckpoints, Trainer):
    """Preference optimization of a masked diffusion model on ELBO estimates (DPO, robust DPO, IPO, hinge, and their
    sums with likelihood on the chosen responses).

    Args:
        options: :class:`~align.trainers.vrpo_config.VRPOOptions`.
        seed: base seed of the mask draws.
        held_out: tokenised held-out pairs (:func:`~align.data.preference.tokenize_preferences`) scored before and
            after training, or None; a ``rejected_kind`` column adds accuracies per kind.
        *args, **kwargs: passed to ``Trainer``; ``train_dataset`` holds tokenised pairs with a ``pair_index`` column
            and batches come from :class:`~align.data.preference.PreferenceCollator`.
    """

    def __init__(self, *args: Any, options: VRPOOptions, seed: int = 0, held_out: Any = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        columns = getattr(self.train_dataset, "column_names", None) or []
        if "pair_index" not in columns:
            raise ValueError(f"the VRPO train dataset needs a 'pair_index' column (tokenize_preferences adds it); "
                             f"columns: {columns}")
        self.options = options
        self.vrpo_seed = int(seed)
        self.held_out = held_out
        self.loss_is_scaled_for_ga = False           # compute_loss returns a per-micro-batch mean
        self.ref_model = None
        if options.reference == "model" and not hasattr(self.model, "disable_adapter"):
            self.ref_model = copy.deepcopy(base_model(self.model)).eval().requires_grad_(False)
        self._ref_rows: torch.Tensor | None = None   # [N, 2, n] precomputed reference rows per pair
        self._eval_ref: torch.Tensor | None = None   # [M, 2] reference estimates of the held-out pairs
        self._metrics: dict[str, list[float]] = defaultdict(list)
        self.guard = install_guard(self, options.max_nonfinite_steps)
        self.add_callback(CompleteMarker())

    # ------------------------------------------------------------------------------------------ draws
    def pair_plan(self, inputs: dict[str, torch.Tensor], draw: int, which: int, num_samples: int) -> MaskPlan:
        """The mask plan of a batch of pairs: each pair's draws from ``make_generator(seed, VRPO, pair, draw,
        which)``, made on the pair alone and padded to the batch width (``which``: 0 policy, 1 an independent
        reference plan)."""
        ids, att, resp = inputs["input_ids"], inputs["attention_mask"].bool(), inputs["response_mask"].bool()
        widths = att.view(-1, 2, att.shape[1]).sum(-1).amax(-1).tolist()
        plans = []
        for p, (pair, width) in enumerate(zip(inputs["pair_index"].tolist(), widths, strict=True)):
            rows = slice(2 * p, 2 * p + 2)
            gen = make_generator(self.vrpo_seed, _STREAM, int(pair), draw, which)
            plans.append(draw_elbo_masks(ids[rows, :width], resp[rows, :width], attention_mask=att[rows, :width],
                                         generator=gen, sampler=self.options.sampler, num_samples=num_samples))
        return stack_plans(plans, ids, att, resp)

    def _policy(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.model)

    def _score_reference(self, plan: MaskPlan) -> LikelihoodEstimate:
        """The reference's estimate of ``plan``: the frozen copy, the policy with its adapter disabled, or (for
        precomputed estimates, before training) the policy itself."""
        if self.ref_model is not None:
            return score_plan(self.ref_model, plan)
        policy = self._policy()
        if hasattr(policy, "disable_adapter"):
            with policy.disable_adapter():
                return score_plan(base_model(policy), plan)
        if self.state.global_step > 0:
            raise RuntimeError("the policy itself can be the reference only before training starts")
        return score_plan(base_model(policy), plan)

    def _loader(self, dataset: Any) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(dataset.select_columns(list(PAIR_COLUMNS)), shuffle=False,
                                           batch_size=self.args.per_device_eval_batch_size,
                                           collate_fn=self.data_collator)

    # ------------------------------------------------------------------------------------------ reference
    @torch.no_grad()
    def precompute_reference(self) -> torch.Tensor:
        """Score every training pair under the reference once, on the draws of key ``(seed, pair)`` that training
        reuses for it; returns (and keeps) the ``[N, 2, n]`` row contributions."""
        o, ds = self.options, self.train_dataset
        table = torch.zeros(len(ds), 2, o.num_samples, dtype=torch.float32)
        for batch in self._loader(ds):
            batch = self._prepare_inputs(batch)
            plan = self.pair_plan(batch, FIXED_DRAW, 0 if o.share_masks else 1, o.num_samples)
            rows = self._score_reference(plan).row_logp.view(-1, 2, o.num_samples)
            table[batch["pair_index"].cpu()] = rows.float().cpu()
        logger.info("vrpo: reference estimates of %d pairs precomputed (%d views per sequence)", len(ds),
                    o.num_samples)
        self._ref_rows = table
        return table

    def _reference_rows(self, inputs: dict[str, torch.Tensor], plan: MaskPlan, draw: int) -> torch.Tensor:
        o = self.options
        if self._ref_rows is not None:
            return self._ref_rows[inputs["pair_index"].cpu()].to(plan.coef.device)
        with torch.no_grad():
            ref_plan = plan if o.share_masks else self.pair_plan(inputs, draw, 1, o.num_samples)
            return self._score_reference(ref_plan).row_logp.view(-1, 2, o.num_samples)

    # ------------------------------------------------------------------------------------------ loss
    def compute_loss(self, model: torch.nn.Module, inputs: dict[str, torch.Tensor], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> torch.Tensor | tuple[torch.Tensor, Any]:
        """Draw the batch's plan, score it under the policy (with gradients) and the reference, and return the mean
        preference loss of its pairs."""
        o = self.options
        if o.reference == "precomputed" and self._ref_rows is None:
            self.precompute_reference()
        draw = FIXED_DRAW if o.reference == "precomputed" else self.state.global_step
        plan = self.pair_plan(inputs, draw, 0, o.num_samples)
        base = base_model(self._policy())
        scorer = ForwardShim(model, base) if base is not model else model
        cur = score_plan(scorer, plan)
        cur_rows = cur.row_logp.view(-1, 2, o.num_samples)
        ref_rows = self._reference_rows(inputs, plan, draw)
        lengths = inputs["response_mask"].sum(-1).view(-1, 2)
        out = combined_loss(cur_rows.sum(-1), ref_rows.sum(-1), lengths, loss_types=o.loss_types, weights=o.weights,
                            beta=o.beta, label_smoothing=o.label_smoothing)
        self.guard.components.record({"vrpo/policy_elbo": cur_rows, "vrpo/reference_elbo": ref_rows,
                                      f"vrpo/{'+'.join(o.loss_types)}": out.losses})
        self._record(out.chosen_rewards, out.rejected_rewards, cur.seq_logp.detach().view(-1, 2),
                     score_variance(cur_rows.detach(), ref_rows, o.beta))
        loss = out.losses.mean()
        return (loss, {}) if return_outputs else loss

    def _record(self, chosen: torch.Tensor, rejected: torch.Tensor, logps: torch.Tensor,
                variance: torch.Tensor) -> None:
        gather = self.accelerator.gather
        chosen, rejected, logps = gather(chosen.float()), gather(rejected.float()), gather(logps.float())
        values = {"rewards/chosen": chosen.mean(), "rewards/rejected": rejected.mean(),
                  "rewards/accuracies": (chosen > rejected).float().mean(),
                  "rewards/margins": (chosen - rejected).mean(), "logps/chosen": logps[:, 0].mean(),
                  "logps/rejected": logps[:, 1].mean(),
                  "preference/score_variance": gather(variance.float()).nanmean()}
        for key, v in values.items():
            self._metrics[key].append(float(v))

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the averaged preference metrics at each logging step."""
        if "loss" in logs:
            logs.update(self.guard.log_fields())
            logs.update(window_means(self._metrics))
            self._metrics.clear()
        super().log(logs, start_time)

    # ------------------------------------------------------------------------------------------ held-out pairs
    @torch.no_grad()
    def evaluate_preferences(self) -> dict[str, Any] | None:
        """Score the held-out pairs with the current policy on fixed draws (key ``(seed, pair, EVAL_DRAW)``, budget
        ``eval_num_samples``); the reference's estimates are computed at the first call and kept.

        Returns ``accuracy`` (share of pairs with ``B̂_θ(y_w) > B̂_θ(y_l)``), ``reward_accuracy`` (share with a positive
        implicit reward margin ``β h``), mean margins, accuracies per ``rejected_kind``, and the per-pair flags.
        """
        if self.held_out is None:
            return None
        n = self.options.eval_num_samples
        policy = self._policy()
        was_training = policy.training
        policy.eval()
        cur, ref = [], []
        for batch in self._loader(self.held_out):
            batch = self._prepare_inputs(batch)
            plan = self.pair_plan(batch, EVAL_DRAW, 0, n)
            cur.append(score_plan(base_model(policy), plan).seq_logp.view(-1, 2).double().cpu())
            if self._eval_ref is None:
                ref.append(self._score_reference(plan).seq_logp.view(-1, 2).double().cpu())
        if was_training:
            policy.train()
        if self._eval_ref is None:
            self._eval_ref = torch.cat(ref)
        theta = torch.cat(cur)
        margin = theta[:, 0] - theta[:, 1]
        reward = self.options.beta * (margin - (self._eval_ref[:, 0] - self._eval_ref[:, 1]))
        ranked, rewarded = (margin > 0).tolist(), (reward > 0).tolist()
        result: dict[str, Any] = {"pairs": len(ranked), "accuracy": sum(ranked) / len(ranked),
                                  "reward_accuracy": sum(rewarded) / len(rewarded),
                                  "mean_margin": margin.mean().item(), "mean_reward_margin": reward.mean().item()}
        if "rejected_kind" in self.held_out.column_names:
            kinds = list(self.held_out["rejected_kind"])
            for kind in sorted(set(kinds)):
                hits = [r for r, k in zip(ranked, kinds, strict=True) if k == kind]
                result[f"accuracy/{kind}"] = sum(hits) / len(hits)
        result["ranked"] = ranked
        return result

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs: Any) -> Any:
        """``Trainer.train``, with the reference pass first (``reference: precomputed``) and the held-out pairs
        scored before and after (``<output_dir>/preference_eval.json``)."""
        if self.options.reference == "precomputed" and self._ref_rows is None:
            self.precompute_reference()
        before = self.evaluate_preferences()
        out = super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)
        after = self.evaluate_preferences()
        if before is not None and after is not None:
            self._write_preference_eval(before, after)
        return out

    def _write_preference_eval(self, before: dict[str, Any], after: dict[str, Any]) -> None:
        test = mcnemar_exact(before.pop("ranked"), after.pop("ranked"))
        o = self.options
        report = {"pairs": before["pairs"], "num_samples": o.eval_num_samples, "sampler": o.sampler,
                  "seed": self.vrpo_seed, "before": before, "after": after, "accuracy_after_vs_before": test}
        logger.info("vrpo held-out pairs (%d): preference accuracy %.3f -> %.3f (McNemar p = %.3g), reward accuracy "
                    "%.3f -> %.3f", before["pairs"], before["accuracy"], after["accuracy"], test["p_value"],
                    before["reward_accuracy"], after["reward_accuracy"])
        self.log({"eval_preference/accuracy": after["accuracy"], "eval_rewards/accuracies": after["reward_accuracy"],
                  "eval_rewards/margins": after["mean_reward_margin"]})
        if self.is_world_process_zero():
            path = Path(self.args.output_dir) / "preference_eval.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(report, indent=2) + "\n")
