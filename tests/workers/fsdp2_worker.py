"""Run by ``tests/test_distributed.py`` under ``torchrun --nproc_per_node 2`` (gloo, CPU): FSDP2 and the GRPO paths.

accelerate runs FSDP only on accelerators, so on a CPU the Trainer cannot be driven through it; this worker shards
the tiny LLaDA model with torch's ``fully_shard`` itself (one unit per block, then the root, as accelerate's
transformer-based wrap does) and checks what dlm-align adds on top:

* a rollout inside :func:`align.trainers.whole_weights.whole_weights` runs on whole weights with no collective per
  step: each rank samples its own prompts with ``eos_policy: stop`` (so ranks take different numbers of steps) and
  gets the tokens the unsharded model gives; the weights are sharded again afterwards;
* a rank whose weights drifted stops the run (:func:`align.pipeline.ranks.agreed_digest`);
* a GRPO policy loss scored through the sharded model's forward and back-propagated gives, after FSDP's gradient
  reduction, the gradient of one process with both ranks' micro-batches (loss averaged over them).

Writes ``{rank: {...}}`` facts as JSON to ``argv[1]`` (rank 0).
"""

from __future__ import annotations

import json
import sys
from typing import Any

import torch
import torch.distributed as dist

from align.build import build_model_and_tokenizer
from align.config.sections import ModelConfig
from align.likelihood import draw_masks, score_plan
from align.pipeline.ranks import RanksDisagree, agreed_digest
from align.rng import make_generator
from align.sampling import generate
from align.trainers.shim import ForwardShim
from align.trainers.whole_weights import fsdp2_modules, whole_weights

INIT = {"d_model": 32, "n_heads": 2, "n_kv_heads": 2, "n_layers": 2, "mlp_hidden_size": 64,
        "max_sequence_length": 128, "mask_token_id": 5, "eos_token_id": 0, "pad_token_id": 0}
EOS = 0


def _model() -> torch.nn.Module:
    return build_model_and_tokenizer(ModelConfig(init_config=dict(INIT), tokenizer="builtin:arithmetic"), seed=3)[0]


def _prompts(rank: int) -> torch.Tensor:
    return torch.randint(6, 20, (2, 6), generator=make_generator(11, rank))


def _rollout(model: torch.nn.Module, rank: int) -> Any:
    return generate(model, _prompts(rank), gen_length=16, steps=16, block_length=4, temperature=1.0,
                    eos_policy="stop", eos_token_id=EOS, generator=make_generator(5, rank))


def _loss(scorer: torch.nn.Module, seqs: torch.Tensor, rank: int) -> torch.Tensor:
    """A GRPO-shaped loss: one_step estimate of the completion, advantages ±1, mean over completions."""
    response = torch.zeros_like(seqs, dtype=torch.bool)
    response[:, 6:] = True
    plan = draw_masks(seqs, response, estimator="one_step", generator=make_generator(7, rank))
    est = score_plan(scorer, plan)
    A = torch.tensor([1.0, -1.0])
    return -(A * est.seq_logp).mean()


def main() -> None:
    out = sys.argv[1]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    from torch.distributed.fsdp import fully_shard

    ref = _model().eval()
    expected = [_rollout(ref, r).sequences for r in range(world)]
    seqs = [e.clone() for e in expected]
    # one process with both micro-batches, each loss divided by their number (gradient accumulation)
    for r in range(world):
        (_loss(ref, seqs[r], r) / world).backward()
    ref_grads = {n: p.grad.clone() for n, p in ref.named_parameters()}

    model = _model()
    for block in model.model.transformer.blocks:
        fully_shard(block)
    fully_shard(model)
    facts: dict[str, object] = {"fsdp_modules": len(fsdp2_modules(model))}
    local = {n: p.to_local().numel() for n, p in model.named_parameters()}
    full = {n: p.numel() for n, p in model.named_parameters()}
    model.eval()
    with torch.no_grad(), whole_weights(None, model):
        got = _rollout(model, rank)
    facts["rollout_equal"] = bool(torch.equal(got.sequences, expected[rank]))
    facts["rollout_forward_passes"] = int(got.nfe)
    facts["sharded_again"] = all(p.to_local().numel() == local[n] for n, p in model.named_parameters())
    facts["sharded_fraction"] = sum(local.values()) / sum(full.values())

    model.train()
    scorer = ForwardShim(model, model)
    _loss(scorer, seqs[rank], rank).backward()
    diffs = {}
    for n, p in model.named_parameters():
        g = p.grad.full_tensor()
        key = n.replace("_fsdp_wrapped_module.", "")
        diffs[key] = (g - ref_grads[key]).abs().max().item()
    facts["grad_max_abs_diff"] = max(diffs.values())
    facts["grad_max_abs"] = max(g.abs().max().item() for g in ref_grads.values())
    # a rank whose weights differ stops the run, naming the rank
    drifted = _model()
    if rank == 1:
        with torch.no_grad():
            drifted.model.transformer.blocks[0].q_proj.weight[0, 0] += 1e-3
    try:
        agreed_digest(drifted, "sft")
        facts["disagreement"] = None
    except RanksDisagree as exc:
        facts["disagreement"] = str(exc)
    facts["digest_agrees"] = agreed_digest(ref, "sft")
    every: list[object] = [None] * world
    dist.all_gather_object(every, facts)
    if rank == 0:
        with open(out, "w") as f:
            json.dump({str(r): v for r, v in enumerate(every)}, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
