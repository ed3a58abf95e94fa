"""``dlm-align run RECIPE --nproc N``: run a recipe on several processes (and nodes) by starting the package's own
entry point again under torch's elastic launcher (``torchrun``) or ``accelerate launch``.

The launched command is ``dlm-align run RECIPE overrides`` without the launch flags; every process it starts reads
its rank from the environment the launcher sets, as when ``torchrun -m align.cli run ...`` is typed by hand.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

#: the launchers ``--launcher`` accepts
LAUNCHERS = ("torchrun", "accelerate")
#: the port of node 0's rendezvous when several nodes are given without --master-port (torchrun's default)
DEFAULT_MASTER_PORT = 29500
#: environment variables a launcher sets in the processes it starts
_LAUNCHED_ENV = ("LOCAL_RANK", "TORCHELASTIC_RUN_ID")


class LaunchError(ValueError):
    """An impossible combination of launch flags; the message names the flags."""


@dataclass(frozen=True)
class LaunchPlan:
    """Where ``dlm-align run`` runs: in this process, or under ``launcher`` with the given topology."""

    launcher: str = "torchrun"
    nproc: int | None = None
    nnodes: int = 1
    node_rank: int | None = None
    master_addr: str | None = None
    master_port: int | None = None
    config_file: str | None = None
    mixed_precision: str | None = None

    @property
    def in_process(self) -> bool:
        """True when the recipe runs in this process (one process on one node, no accelerate config)."""
        return self.launcher == "torchrun" and (self.nproc or 1) == 1 and self.nnodes == 1


def add_launch_arguments(p: argparse.ArgumentParser) -> None:
    """The launch flags of ``dlm-align run``."""
    g = p.add_argument_group("launching on several processes or nodes (torchrun by default; see docs/distributed.md)")
    g.add_argument("--nproc", type=int, default=None, metavar="N",
                   help="processes per node (one per GPU); default 1: run in this process. With N > 1 the command "
                   "starts itself again under `python -m torch.distributed.run --nproc_per_node N` (gloo on CPU)")
    g.add_argument("--nnodes", type=int, default=1, metavar="M", help="nodes (default 1); run the same command on "
                   "every node with its own --node-rank")
    g.add_argument("--node-rank", type=int, default=None, metavar="R", help="this node's rank, 0..M-1 (with --nnodes)")
    g.add_argument("--master-addr", default=None, metavar="HOST",
                   help="host name or address of node 0, reachable from every node (with --nnodes)")
    g.add_argument("--master-port", type=int, default=None, metavar="PORT",
                   help=f"free port on node 0 for the rendezvous (default: any free port on one node, "
                   f"{DEFAULT_MASTER_PORT} on several)")
    g.add_argument("--launcher", choices=LAUNCHERS, default="torchrun",
                   help="torchrun (default) or accelerate (`accelerate launch`, which reads --config_file)")
    g.add_argument("--mixed-precision", "--mixed_precision", dest="mixed_precision", default=None,
                   choices=("no", "fp16", "bf16"), help="override the accelerate config's mixed_precision (with "
                   "--launcher accelerate); the shipped configs say bf16, `no` trains in the model's dtype")
    g.add_argument("--config_file", "--config-file", dest="config_file", default=None, metavar="YAML",
                   help="accelerate's config (with --launcher accelerate), e.g. recipes/accelerate/zero3.yaml; "
                   "the shipped ones are found by that name from any directory")


def plan_from_args(args: argparse.Namespace) -> LaunchPlan:
    """The launch plan of parsed ``run`` arguments, checked.

    Raises:
        LaunchError: an impossible combination (``--nproc 0``, ``--node-rank`` without ``--nnodes``, ...).
    """
    plan = LaunchPlan(launcher=args.launcher, nproc=args.nproc, nnodes=args.nnodes, node_rank=args.node_rank,
                      master_addr=args.master_addr, master_port=args.master_port,
                      config_file=_config_file(args.config_file) if args.config_file else None,
                      mixed_precision=args.mixed_precision)
    check_plan(plan)
    return plan


def _config_file(name: str) -> str:
    """An accelerate config: the file itself, else the file shipped beside the recipes under that name."""
    from align.recipes import shipped_file

    if Path(name).is_file():
        return str(Path(name).resolve())
    shipped = shipped_file(name) or shipped_file(f"accelerate/{name}")
    if shipped is None:
        raise LaunchError(f"--config_file {name}: file does not exist (shipped: recipes/accelerate/ddp.yaml, "
                          f"zero2.yaml, zero3.yaml, fsdp2.yaml)")
    return str(shipped)


def check_plan(plan: LaunchPlan) -> None:
    """Reject impossible launch flag combinations with a message naming the flags.

    Raises:
        LaunchError: the first problem found.
    """
    if plan.nproc is not None and plan.nproc < 1:
        raise LaunchError(f"--nproc must be >= 1, got {plan.nproc}")
    if plan.nnodes < 1:
        raise LaunchError(f"--nnodes must be >= 1, got {plan.nnodes}")
    if plan.mixed_precision is not None and plan.launcher != "accelerate":
        raise LaunchError("--mixed-precision overrides accelerate's config: add --launcher accelerate (with torchrun "
                          "the recipe's bf16/fp16 keys set it)")
    if plan.config_file is not None and plan.launcher != "accelerate":
        raise LaunchError("--config_file is accelerate's config: add --launcher accelerate (torchrun takes none)")
    if plan.nnodes == 1:
        for flag, value in (("--node-rank", plan.node_rank), ("--master-addr", plan.master_addr)):
            if value is not None:
                raise LaunchError(f"{flag} needs --nnodes M with M > 1 (one node: leave it out)")
        if plan.in_process and plan.master_port is not None:
            raise LaunchError("--master-port needs --nproc N with N > 1 or --nnodes M with M > 1 (one process "
                              "runs without a rendezvous)")
    else:
        if plan.node_rank is None:
            raise LaunchError(f"--nnodes {plan.nnodes} needs --node-rank R (0..{plan.nnodes - 1}): this node's rank")
        if not 0 <= plan.node_rank < plan.nnodes:
            raise LaunchError(f"--node-rank must be in 0..{plan.nnodes - 1} for --nnodes {plan.nnodes}, "
                              f"got {plan.node_rank}")
        if not plan.master_addr:
            raise LaunchError(f"--nnodes {plan.nnodes} needs --master-addr HOST: the address of node 0")
    if plan.master_port is not None and not 1 <= plan.master_port <= 65535:
        raise LaunchError(f"--master-port must be in 1..65535, got {plan.master_port}")
    if not plan.in_process and any(k in os.environ for k in _LAUNCHED_ENV):
        raise LaunchError("this process was itself started by a launcher (LOCAL_RANK is set): leave out --nproc, "
                          "--nnodes and --launcher, or start `dlm-align run ... --nproc N` directly")


def launch_command(plan: LaunchPlan, run_args: list[str], *, verbose: bool = False) -> list[str]:
    """The command that runs ``dlm-align run`` + ``run_args`` on every process of ``plan`` on this node."""
    port = plan.master_port or (DEFAULT_MASTER_PORT if plan.nnodes > 1 else None)
    if plan.launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(plan.nproc or 1),
               "--nnodes", str(plan.nnodes)]
        if plan.nnodes > 1:
            cmd += ["--node_rank", str(plan.node_rank), "--master_addr", str(plan.master_addr),
                    "--master_port", str(port)]
        elif port is not None:
            cmd += ["--master_port", str(port)]
        else:
            cmd += ["--standalone"]                       # a local rendezvous on a free port
        cmd += ["--tee", "3"]                             # each line prefixed with its rank, e.g. [default1]:
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch"]
        if plan.config_file:
            cmd += ["--config_file", plan.config_file]
        if plan.mixed_precision is not None:
            cmd += ["--mixed_precision", plan.mixed_precision]
        if plan.nproc is not None:
            cmd += ["--num_processes", str(plan.nproc * plan.nnodes)]
        if plan.nnodes > 1:
            cmd += ["--num_machines", str(plan.nnodes), "--machine_rank", str(plan.node_rank),
                    "--main_process_ip", str(plan.master_addr), "--main_process_port", str(port)]
        elif port is not None:
            cmd += ["--main_process_port", str(port)]
    return [*cmd, "-m", "align.cli", *(["-v"] if verbose else []), "run", *run_args]


def run_args_of(args: argparse.Namespace) -> list[str]:
    """The arguments of ``dlm-align run`` each launched process gets: the recipe, the overrides and the restart
    flags, without the launch flags."""
    out = [args.recipe, *args.overrides]
    if args.restart:
        out.append("--restart")
    if args.restart_from:
        out += ["--restart-from", args.restart_from]
    return out


def launch(plan: LaunchPlan, run_args: list[str], *, verbose: bool = False) -> int:
    """Start the launcher, let its output stream through, and return its exit status.

    SIGTERM and SIGINT received here are passed on to the launcher, which passes them to every process.
    """
    cmd = launch_command(plan, run_args, verbose=verbose)
    print(f"launching: {' '.join(shlex.quote(c) for c in cmd)}", file=sys.stderr, flush=True)
    proc = subprocess.Popen(cmd)

    def forward(signum: int, _frame: object) -> None:
        if proc.poll() is None:
            proc.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        code = proc.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return 128 - code if code < 0 else code                   # killed by a signal: as a shell reports it
