"""The `causvid` command line.

Subcommands come from the `causvid.commands` entry-point group (see setup.cfg): each entry
names a `register(subparsers)` function. The core registers `generate` and `info`; the
`distill` and `stream` packages register theirs the same way, so the core never imports them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator
from importlib.metadata import entry_points
from pathlib import Path

from causvid.errors import UserError
from causvid.pipeline import MODES


def add_checkpoint_args(parser: argparse.ArgumentParser) -> None:
    """--checkpoint and --device, shared by every command that loads a pipeline."""
    parser.add_argument("--checkpoint", type=Path, default=None, help="pipeline directory (default: the shipped one)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")


def _generate(args: argparse.Namespace) -> None:
    from tqdm import tqdm

    from causvid.pipeline import load_pipeline
    from causvid.text import check_prompt
    from causvid.video_io import VIDEO_SUFFIXES, write_video

    if args.output.suffix.lower() not in VIDEO_SUFFIXES:
        raise UserError(f"{args.output}: output must end in {', '.join(VIDEO_SUFFIXES)}")
    if not args.output.parent.is_dir():
        raise UserError(f"{args.output}: folder {args.output.parent} does not exist; create it first")
    prompt = check_prompt(args.prompt)
    size = {k: v for k, v in (("height", args.height), ("width", args.width)) if v is not None}
    student = args.mode == "student"
    pipe = load_pipeline(args.checkpoint, args.device, with_teacher=not student, **size)
    total = args.frames if student else (args.steps or pipe.config.teacher_steps)
    with tqdm(total=total, unit="frame" if student else "step", desc=args.mode) as bar:
        frames = pipe.generate(
            prompt, args.frames, args.seed, steps=args.steps, mode=args.mode,
            use_kv_cache=not args.no_kv_cache, guidance_scale=args.guidance_scale,
            progress=lambda done: bar.update(done - bar.n),
        )
    write_video(args.output, frames, pipe.config.fps)
    print(f"wrote {args.output}: {frames.shape[0]} frames, {frames.shape[2]}x{frames.shape[1]}")


def _info(args: argparse.Namespace) -> None:
    from causvid.pipeline import load_pipeline

    pipe = load_pipeline(args.checkpoint, args.device)

    def count(model) -> int | None:
        return None if model is None else sum(p.numel() for p in model.parameters())

    record = {
        "checkpoint": str(args.checkpoint or "shipped"),
        "device": str(pipe.device),
        "dtype": str(pipe.denoiser.transformer.dtype),
        "config": pipe.config.to_dict(),
        "parameters": {
            "transformer": count(pipe.denoiser),
            "teacher": count(pipe.teacher),
            "vin": count(pipe.parallel.vin) if pipe.parallel is not None else None,
            "vin_transformer": count(pipe.parallel.denoiser) if pipe.parallel is not None else None,
            "vae": count(pipe.autoencoder),
            "text_encoder": count(pipe.text_encoder.model),
        },
        "transformer": dict(pipe.denoiser.config),
        "vae": {k: v for k, v in dict(pipe.autoencoder.vae.config).items() if not k.startswith("latents_")},
    }
    print(json.dumps(record, indent=2, default=str))


def add_training_args(parser: argparse.ArgumentParser) -> None:
    """Arguments of every training command (core and distillation): config plus overrides."""
    parser.add_argument("--config", type=Path, required=True, help="YAML training config (configs/*.yaml)")
    parser.add_argument("--out-dir", default=None, help="override the config's out_dir")
    parser.add_argument("--max-steps", type=int, default=None, help="override the config's max_steps")
    parser.add_argument("--max-minutes", type=float, default=None, help="checkpoint and stop after this long")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 avoids thrashing on a busy machine)")
    parser.add_argument("--compile", action="store_true", default=None, help="torch.compile the trained modules")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in out_dir")


def load_training_config(args: argparse.Namespace):
    """The run's config, refusing to silently restart over an existing run."""
    from causvid.train import TrainConfig

    config = TrainConfig.from_yaml(
        args.config, out_dir=args.out_dir, max_steps=args.max_steps, max_minutes=args.max_minutes, threads=args.threads,
        compile=args.compile,
    )
    if (Path(config.out_dir) / "latest.json").exists() and not args.resume:
        raise UserError(f"{config.out_dir} already holds a run: pass --resume to continue it, or choose --out-dir")
    return config


def run_training(args: argparse.Namespace, objective: str, objectives: dict) -> None:
    """Train the `objective` that --config describes; every training command ends here."""
    from causvid.train import build_objective, train

    config = load_training_config(args)
    if config.objective != objective:
        raise UserError(f"{args.config} is a {config.objective!r} config, not {objective!r}")
    step = train(config, build_objective(config, objectives))
    print(f"stopped at step {step}; exported to {Path(config.out_dir) / 'export'}")


def _train(args: argparse.Namespace) -> None:
    from causvid.objectives import OBJECTIVES

    run_training(args, args.objective, OBJECTIVES)


def convert_checkpoint(source: Path, destination: Path, dtype_name: str) -> None:
    """Re-save a pipeline (or single model) directory in another dtype, e.g. bf16 for shipping."""
    import torch

    from causvid.checkpoint import CheckpointError, load_diffusers_model, read_json, save_diffusers_model
    from causvid.pipeline import load_pipeline

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype_name]
    if (source / "model_index.json").exists():
        load_pipeline(source, "cpu", torch.float32).save_pretrained(destination, dtype)
    else:
        from diffusers import AutoencoderKLWan, WanTransformer3DModel

        classes = {cls.__name__: cls for cls in (AutoencoderKLWan, WanTransformer3DModel)}
        name = read_json(source / "config.json").get("_class_name")
        if name not in classes:
            raise CheckpointError(f"{source / 'config.json'}: cannot convert a {name!r}")
        save_diffusers_model(load_diffusers_model(classes[name], source).to(dtype), destination)
    print(f"wrote {destination} ({dtype_name})")


def _convert(args: argparse.Namespace) -> None:
    if args.source_format == "pipeline":
        return convert_checkpoint(args.source, args.destination, args.dtype)
    import torch

    from causvid.convert import convert_download

    if args.base is None:
        raise UserError(f"--from {args.source_format} needs --base, the Wan2.1 diffusers directory (VAE, text encoder, config)")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    convert_download(args.source_format, args.source, args.destination, args.base, not args.no_ema, dtype, args.vae)
    print(f"wrote {args.destination} ({args.dtype})")


def _recipe(args: argparse.Namespace) -> None:
    from causvid.recipe import load_config_file, run_recipe

    flags = []
    if args.threads:
        flags += ["--threads", str(args.threads)]
    if args.max_minutes:
        flags += ["--max-minutes", str(args.max_minutes)]
    run_recipe(args.config, args.configs, flags, args.dry_run)
    if args.to is not None and not args.dry_run:
        convert_checkpoint(Path(load_config_file(args.config)["out_dir"]) / "export", args.to, args.dtype)


def register(subparsers) -> None:
    """The core's own commands."""
    from causvid.convert import SOURCES

    convert = subparsers.add_parser(
        "convert", help="a pipeline directory from downloaded weights, or re-saved in another dtype")
    convert.add_argument("source", type=Path, help="pipeline or single-model directory, or a downloaded checkpoint file")
    convert.add_argument("destination", type=Path, help="pipeline directory to write")
    convert.add_argument("--from", dest="source_format", choices=["pipeline", *SOURCES], default="pipeline",
                         help="what SOURCE is: one of ours, original Wan2.1 transformer weights, or a released "
                              "CausVid or Self-Forcing student")
    convert.add_argument("--base", type=Path, default=None,
                         help="with a downloaded checkpoint: the Wan2.1 diffusers directory it builds on")
    convert.add_argument("--no-ema", action="store_true", help="Self-Forcing: take 'generator', not 'generator_ema'")
    convert.add_argument("--vae", type=Path, default=None,
                         help="Wan's original VAE file (Wan2.1_VAE.pth), converted instead of copying --base's VAE")
    convert.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16", help="weights' dtype")
    convert.set_defaults(func=_convert)

    recipe = subparsers.add_parser("recipe", help="rebuild an artifact: run a config after every run it reads from")
    recipe.add_argument("config", type=Path, help="the recipe's last step, e.g. configs/shapes/23_dmd.yaml")
    recipe.add_argument("--configs", type=Path, default=Path("configs"), help="where the steps' configs are found")
    recipe.add_argument("--dry-run", action="store_true", help="list the steps and whether each has finished")
    recipe.add_argument("--threads", type=int, default=None, help="torch CPU threads for every training step")
    recipe.add_argument("--max-minutes", type=float, default=None,
                        help="stop each training step after this long (rerun the recipe to resume)")
    recipe.add_argument("--to", type=Path, default=None, help="save the last step's export here, e.g. checkpoints/shapes")
    recipe.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16", help="dtype of --to")
    recipe.set_defaults(func=_recipe)

    train = subparsers.add_parser("train", help="train the autoencoder, the bidirectional teacher or the parallel model (vin)")
    train.add_argument("objective", choices=["autoencoder", "teacher", "vin"], help="what to train (the config must agree)")
    add_training_args(train)
    train.set_defaults(func=_train)

    gen = subparsers.add_parser("generate", help="text to video with the causal student (or the teacher, or in parallel)")
    gen.add_argument("prompt", help="what the video shows, e.g. 'a red circle moving right on a black background'")
    gen.add_argument("-o", "--output", type=Path, required=True, help="out.mp4, out.gif or out.npy")
    gen.add_argument("--frames", type=int, default=33, help="pixel frames to generate")
    gen.add_argument("--seed", type=int, default=0, help="noise seed")
    gen.add_argument("--height", type=int, default=None, help="frame height in pixels (default: the checkpoint's)")
    gen.add_argument("--width", type=int, default=None, help="frame width in pixels (default: the checkpoint's)")
    gen.add_argument("--steps", type=int, default=None, help="student steps (default 4) or teacher steps (default 50)")
    gen.add_argument("--mode", choices=MODES, default="student",
                     help="student: the causal student; teacher: the bidirectional teacher with CFG; parallel: a long "
                          "video as chunks denoised at once, guided by the Video Interface Network")
    gen.add_argument("--teacher", dest="mode", action="store_const", const="teacher", help="short for --mode teacher")
    gen.add_argument("--guidance-scale", type=float, default=None, help="teacher CFG scale (default: the pipeline's)")
    gen.add_argument("--no-kv-cache", action="store_true", help="recompute with the full block-causal mask")
    add_checkpoint_args(gen)
    gen.set_defaults(func=_generate)

    info = subparsers.add_parser("info", help="config, parameter counts and device of a checkpoint")
    add_checkpoint_args(info)
    info.set_defaults(func=_info)


class HelpFormatter(argparse.HelpFormatter):
    """Shows each option's default after its help, unless the help already states it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        unset = action.default is None or action.default is False or action.default == argparse.SUPPRESS
        shown = action.option_strings and not unset
        return f"{text} (default: %(default)s)" if shown and "default" not in text else text


def subcommand_parsers(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    """Every parser below `parser`, depth first."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                yield child
                yield from subcommand_parsers(child)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="causvid", description="Real-time streaming video generation.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    registered = {entry.name: entry for entry in entry_points(group="causvid.commands")}
    if "core" not in registered:
        register(subparsers)  # running from a source tree that was never pip-installed
    for entry in registered.values():
        entry.load()(subparsers)
    for child in subcommand_parsers(parser):
        child.formatter_class = HelpFormatter
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except UserError as error:  # anything else is a bug and keeps its traceback
        print(f"causvid {args.command}: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # the output went to a reader that stopped (`| head`): not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
