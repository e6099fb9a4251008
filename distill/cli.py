"""`causvid distill ...`: the distillation stages, registered through the `causvid.commands` entry point.

    ode-pairs   teacher ODE trajectories at the student's levels (stage 1)
    ode-init    causal student regressed onto them (stage 2)
    dmd         asymmetric DMD, CausVid or Self-Forcing student input (stage 3)
    compare     shapes-bench of several checkpoints: the ablation table
    drift       shapes-bench per segment of long streams
    memory      memory per GPU of DMD at Wan2.1-1.3B's size, sharded over N GPUs
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from causvid.cli import add_checkpoint_args, add_training_args, run_training
from causvid.errors import UserError


def _train(objective: str):
    def run(args: argparse.Namespace) -> None:
        from distill.dmd import DMDObjective
        from distill.ode_init import OdeInitObjective

        run_training(args, objective, {"ode_init": OdeInitObjective, "dmd": DMDObjective})

    return run


def _ode_pairs(args: argparse.Namespace) -> None:
    import torch
    from accelerate import PartialState

    from causvid.pipeline import load_pipeline
    from distill.ode_pairs import OdePairsConfig, generate_ode_pairs

    config = OdePairsConfig.from_yaml(
        args.config, teacher=args.teacher, out=args.out, num=args.num, batch=args.batch, shard_size=args.shard_size,
        num_frames=args.frames, steps=args.steps, guidance_scale=args.guidance_scale, seed=args.seed,
        height=args.height, width=args.width,
    )
    # PartialState spans several CPU processes only when told it runs on CPU (unlike Accelerator,
    # it ignores ACCELERATE_USE_CPU), and it is a singleton: the first call decides.
    state = PartialState(cpu=args.device == "cpu" or not torch.cuda.is_available())
    device = args.device or state.device
    size = {k: v for k, v in (("height", config.height), ("width", config.width)) if v is not None}
    pipe = load_pipeline(config.teacher, device, dtype=torch.float32, **size)
    written = generate_ode_pairs(config, pipe, resume=args.resume)
    print(f"wrote {len(written)} shards to {config.out}")


def _cases(args: argparse.Namespace):
    from causvid.eval.shapes_bench import default_prompt_set

    return default_prompt_set(num_seen=args.num_seen, num_pairs=args.num_pairs)[: args.max_cases]


def _labelled(items: list[str]) -> dict[str, Path]:
    runs = {}
    for item in items:
        label, _, path = item.rpartition("=")
        runs[label or Path(path).parent.name or path] = Path(path)
    return runs


def _compare(args: argparse.Namespace) -> None:
    from causvid.eval.shapes_bench import format_table
    from distill.compare import ablation_table, compare, summary

    if not args.checkpoints and args.teacher is None:
        raise UserError("nothing to compare: give checkpoints (LABEL=DIR) and/or --teacher DIR")
    reports = compare(_labelled(args.checkpoints), _cases(args), args.seeds, args.frames, args.device,
                      args.teacher, args.ground_truth, [None, *args.teacher_steps])
    for label, report in reports.items():
        print(f"== {label}\n{format_table(report)}\n", file=sys.stderr)
    print(ablation_table(reports), file=sys.stderr)
    if args.out is not None:
        args.out.write_text(json.dumps(reports, indent=2))
    print(json.dumps({label: summary(report) for label, report in reports.items()}, indent=2))


def _drift(args: argparse.Namespace) -> None:
    from causvid.pipeline import load_pipeline
    from distill.compare import drift, drift_table, summary

    pipe = load_pipeline(args.checkpoint, args.device)
    report = drift(pipe, _cases(args), args.seeds, args.frames, args.segment_frames, args.steps)
    print(drift_table(report), file=sys.stderr)
    if args.out is not None:
        args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps({s["start_frame"]: summary(s) for s in report["segments"]}, indent=2))


def _memory(args: argparse.Namespace) -> None:
    from distill.memory import dmd_memory

    if any(n < 1 for n in args.gpus):
        raise UserError(f"--gpus must be positive, got {args.gpus}")
    record = json.dumps(dmd_memory(args.gpus), indent=2)
    if args.out is not None:
        args.out.write_text(record + "\n")
    print(record)


def _add_bench_args(parser: argparse.ArgumentParser, frames: int, seeds: list[int], num_seen: int, num_pairs: int) -> None:
    parser.add_argument("--frames", type=int, default=frames, help="pixel frames per video")
    parser.add_argument("--seeds", type=int, nargs="+", default=seeds, help="noise seeds per prompt")
    parser.add_argument("--num-seen", type=int, default=num_seen, help="seen single-object prompts (plus all held-out ones)")
    parser.add_argument("--num-pairs", type=int, default=num_pairs, help="seen two-object prompts")
    parser.add_argument("--max-cases", type=int, default=None, help="only the first N prompts (quick runs)")
    parser.add_argument("--out", type=Path, default=None, help="write the full JSON report here")


def register(subparsers) -> None:
    distill = subparsers.add_parser("distill", help="distil the teacher into the causal student (ODE init, DMD)")
    stages = distill.add_subparsers(dest="stage", required=True)

    pairs = stages.add_parser("ode-pairs", help="teacher ODE trajectories at the student's noise levels")
    pairs.add_argument("--config", type=Path, default=None, help="YAML with OdePairsConfig fields (flags override)")
    pairs.add_argument("--teacher", default=None, help="teacher pipeline directory")
    pairs.add_argument("--out", default=None, help="output directory of shards")
    pairs.add_argument("--num", type=int, default=None, help="number of trajectories")
    pairs.add_argument("--batch", type=int, default=None, help="trajectories per teacher forward")
    pairs.add_argument("--shard-size", type=int, default=None, help="trajectories per shard file")
    pairs.add_argument("--frames", type=int, default=None, help="pixel frames per clip (1 + 4k)")
    pairs.add_argument("--steps", type=int, default=None, help="Euler steps (default: the pipeline's teacher_steps)")
    pairs.add_argument("--guidance-scale", type=float, default=None, help="CFG scale (default: the pipeline's)")
    pairs.add_argument("--seed", type=int, default=None, help="prompt and noise seed (default: the config's, else 0)")
    pairs.add_argument("--height", type=int, default=None, help="frame height (default: the teacher pipeline's)")
    pairs.add_argument("--width", type=int, default=None, help="frame width (default: the teacher pipeline's)")
    pairs.add_argument("--device", default=None, help="default: this accelerate process's device")
    pairs.add_argument("--resume", action="store_true", help="complete an existing output, skipping finished shards")
    pairs.set_defaults(func=_ode_pairs)

    for name, objective, text in (("ode-init", "ode_init", "causal student regressed onto teacher ODE endpoints"),
                                  ("dmd", "dmd", "asymmetric DMD (CausVid or Self-Forcing student input)")):
        stage = stages.add_parser(name, help=text)
        add_training_args(stage)
        stage.set_defaults(func=_train(objective))

    comparison = stages.add_parser("compare", help="shapes-bench of checkpoints' students: the ablation table (JSON)")
    comparison.add_argument("checkpoints", nargs="*", help="LABEL=DIR (or DIR) pipeline directories")
    comparison.add_argument("--teacher", type=Path, default=None, help="also score this pipeline's teacher (CFG)")
    comparison.add_argument("--teacher-steps", type=int, nargs="*", default=[],
                            help="with --teacher: also score it at these step counts (e.g. 4: undistilled few-step)")
    comparison.add_argument("--ground-truth", action="store_true", help="also score rendered clips (the ceiling)")
    _add_bench_args(comparison, frames=33, seeds=[0, 1, 2, 3], num_seen=16, num_pairs=2)
    comparison.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    comparison.set_defaults(func=_compare)

    drifting = stages.add_parser("drift", help="shapes-bench per segment of long streams (JSON)")
    _add_bench_args(drifting, frames=2048, seeds=[0], num_seen=4, num_pairs=0)
    drifting.add_argument("--segment-frames", type=int, default=32, help="frames per scored segment")
    drifting.add_argument("--steps", type=int, default=None, help="student steps per block")
    add_checkpoint_args(drifting)
    drifting.set_defaults(func=_drift)

    memory = stages.add_parser("memory", help="memory per GPU of DMD at Wan2.1-1.3B's size, sharded (JSON)")
    memory.add_argument("--gpus", type=int, nargs="+", default=[8, 64], help="GPU counts to size for")
    memory.add_argument("--out", type=Path, default=None, help="also write the JSON record here")
    memory.set_defaults(func=_memory)
