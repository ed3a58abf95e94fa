"""LLaDA's reference ``generate``, re-implemented from its description (``docs/concepts.md`` §5).

This is the baseline that :func:`align.sampling.generate` is tested and benchmarked against, so it
deliberately keeps the reference's costs: logits for the whole sequence at every step, a float64
copy of the logits for Gumbel-max at ``T > 0``, a full-vocabulary softmax over every position, and
a Python loop over rows for the top-k. Behaviour kept on purpose, quirks included:

* ``x0 = argmax(exp(logits) / (−log U)^T)`` with float64 ``U`` (equivalent to Gumbel-max on
  ``logits / T``); at ``T = 0`` the logits themselves, not a copy, are used;
* ``confidence_eos_eot_inf`` writes ``−∞`` into the EOS column of the *noisy* logits and the EOT
  column of the logits; since the noisy logits are the logits themselves only at ``T = 0``, EOS
  confidence is suppressed only at ``T = 0``;
* unconditional CFG rows mask every non-mask token of the initial sequence (prompt and padding).

The only deliberate difference: randomness comes from an explicit ``torch.Generator``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def add_gumbel_noise(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> torch.Tensor:
    """Reference Gumbel-max transform: ``exp(logits) / (−log U)^T`` in float64 (``logits`` at T = 0)."""
    if temperature == 0:
        return logits
    logits = logits.to(torch.float64)
    noise = torch.rand(logits.shape, dtype=torch.float64, generator=generator,
                       device=generator.device if generator is not None else logits.device).to(logits.device)
    gumbel_noise = (-torch.log(noise)) ** temperature
    return logits.exp() / gumbel_noise


def get_num_transfer_tokens(block_mask_index: torch.Tensor, steps: int) -> torch.Tensor:
    """Tokens to unmask per row and step: ``m // s`` each, one more in the first ``m % s`` steps."""
    mask_num = block_mask_index.sum(dim=1, keepdim=True)
    base = mask_num // steps
    remainder = mask_num % steps
    num = torch.zeros(mask_num.size(0), steps, device=block_mask_index.device, dtype=torch.int64) + base
    for i in range(mask_num.size(0)):
        num[i, : remainder[i]] += 1
    return num


@torch.no_grad()
def reference_generate(
    model,
    prompt: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    steps: int = 128,
    gen_length: int = 128,
    block_length: int = 128,
    temperature: float = 0.0,
    cfg_scale: float = 0.0,
    remasking: str = "low_confidence",
    mask_id: int = 126336,
    logits_eos_inf: bool = False,
    confidence_eos_eot_inf: bool = False,
    eos_token_id: int = 126081,
    eot_token_id: int = 126348,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Reference semi-autoregressive masked-diffusion sampling; returns ``[B, P + gen_length]``.

    Args mirror LLaDA's ``generate`` (``eos_token_id``/``eot_token_id`` replace its hard-coded
    126081/126348; ``generator`` replaces the global RNG). ``model(x, attention_mask=...)`` must
    return an object with ``.logits``. ``remasking``: ``"low_confidence"`` or ``"random"``.
    """
    B, P = prompt.shape
    x = torch.full((B, P + gen_length), mask_id, dtype=torch.long, device=prompt.device)
    x[:, :P] = prompt.clone()
    if attention_mask is not None:
        attention_mask = torch.cat(
            [attention_mask, torch.ones((B, gen_length), dtype=attention_mask.dtype, device=prompt.device)], dim=-1
        )
    prompt_index = x != mask_id

    if gen_length % block_length:
        raise ValueError("gen_length must be a multiple of block_length")
    num_blocks = gen_length // block_length
    if steps % num_blocks:
        raise ValueError("steps must be a multiple of the number of blocks")
    steps = steps // num_blocks

    for num_block in range(num_blocks):
        start, end = P + num_block * block_length, P + (num_block + 1) * block_length
        block_mask_index = x[:, start:end] == mask_id
        num_transfer_tokens = get_num_transfer_tokens(block_mask_index, steps)
        for i in range(steps):
            mask_index = x == mask_id
            if cfg_scale > 0.0:
                un_x = x.clone()
                un_x[prompt_index] = mask_id
                x_ = torch.cat([x, un_x], dim=0)
                attention_mask_ = None if attention_mask is None else torch.cat([attention_mask, attention_mask])
                logits = model(x_, attention_mask=attention_mask_).logits
                logits, un_logits = torch.chunk(logits, 2, dim=0)
                logits = un_logits + (cfg_scale + 1) * (logits - un_logits)
            else:
                logits = model(x, attention_mask=attention_mask).logits

            if logits_eos_inf:
                logits[:, :, eos_token_id] = -torch.inf

            logits_with_noise = add_gumbel_noise(logits, temperature, generator)
            x0 = torch.argmax(logits_with_noise, dim=-1)

            if confidence_eos_eot_inf:
                # the reference's chained assignment: EOS into the noisy copy, EOT into the logits
                logits_with_noise[:, :, eos_token_id] = logits[:, :, eot_token_id] = -torch.inf

            if remasking == "low_confidence":
                p = F.softmax(logits, dim=-1)
                x0_p = torch.squeeze(torch.gather(p, dim=-1, index=torch.unsqueeze(x0, -1)), -1)
            elif remasking == "random":
                x0_p = torch.rand(x0.shape, generator=generator,
                                  device=generator.device if generator is not None else x0.device).to(x0.device)
            else:
                raise NotImplementedError(remasking)

            x0_p[:, end:] = -torch.inf
            x0 = torch.where(mask_index, x0, x)
            confidence = torch.where(mask_index, x0_p, -torch.inf)

            transfer_index = torch.zeros_like(x0, dtype=torch.bool)
            for j in range(confidence.shape[0]):
                _, select_index = torch.topk(confidence[j], k=int(num_transfer_tokens[j, i]))
                transfer_index[j, select_index] = True
            x[transfer_index] = x0[transfer_index]
    return x
