"""`causvid eval`: shapes-bench on a checkpoint (student or teacher) or on the ground truth."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from causvid.checkpoint import atomic_write_json
from causvid.errors import UserError
from causvid.eval.shapes_bench import contact_sheet, default_prompt_set, format_table, run_bench


if TYPE_CHECKING:
    from causvid.eval.reconstruction import ReconstructionError


def autoencoder_round_trip(autoencoder, errors: ReconstructionError):
    """uint8 video -> its reconstruction through `autoencoder`; adds each video's error to `errors`."""
    import torch

    from causvid.frames import clip_to_tensor, to_uint8

    @torch.no_grad()
    def reconstruct(frames, case=None, seed=None):
        device = next(autoencoder.parameters()).device
        video = clip_to_tensor(frames)[None].to(device)
        reconstruction = autoencoder.decode(autoencoder.encode(video))
        errors.add(reconstruction, video)
        return to_uint8(reconstruction)

    return reconstruct


def _folder_reconstruction(args: argparse.Namespace) -> None:
    """Reconstruction PSNR of an autoencoder on a folder of one's own videos (one JSON record)."""
    import torch

    from causvid.data.video_folder import VideoFolderDataset
    from causvid.eval.reconstruction import ReconstructionError
    from causvid.models.autoencoder import VideoAutoencoder

    autoencoder = VideoAutoencoder.from_pretrained(args.autoencoder).eval()
    clips = VideoFolderDataset(args.folder, num_frames=args.frames, height=args.height, width=args.width, fps=args.fps)
    errors = ReconstructionError()
    seen = set()
    with torch.no_grad():
        for index in range(min(args.max_clips, len(clips))):
            item = clips[index]
            if item["index"] in seen:  # an unreadable clip stands in for the next one: count that one once
                continue
            seen.add(item["index"])
            video = item["video"][None]
            errors.add(autoencoder.decode(autoencoder.encode(video)), video)
    report = errors.report()
    record = {"autoencoder": str(args.autoencoder), "folder": str(args.folder), "clips": report["clips"],
              "psnr_db": report["psnr_db"], "clip_psnr_db_range": report["clip_psnr_db_range"],
              "first_frame_psnr_db": report["first_frame_psnr_db"], "later_frames_psnr_db": report["later_frames_psnr_db"]}
    if args.output is not None:
        atomic_write_json(args.output, record)
    print(json.dumps(record))


def _eval(args: argparse.Namespace) -> None:
    if args.from_noise_level is not None and not args.teacher:
        raise UserError("--from-noise-level needs --teacher")
    if args.folder is not None:
        if args.autoencoder is None:
            raise UserError("--folder measures an autoencoder: give --autoencoder DIR")
        return _folder_reconstruction(args)
    cases = default_prompt_set(num_seen=args.num_seen, num_pairs=args.num_pairs, restrict=dict(args.restrict or ()))
    if args.word_probe:
        return _word_probe(args, cases)
    generate, transform, height, width = None, None, 64, 64
    if args.autoencoder is not None:
        from causvid.eval.reconstruction import ReconstructionError
        from causvid.models.autoencoder import VideoAutoencoder

        errors = ReconstructionError()
        transform = autoencoder_round_trip(VideoAutoencoder.from_pretrained(args.autoencoder).eval(), errors)
    elif not args.ground_truth:
        from causvid.pipeline import load_pipeline

        pipe = load_pipeline(args.checkpoint, args.device)
        height, width = pipe.config.height, pipe.config.width

        def sample(prompt: str, seed: int, num_frames: int, **start):
            return pipe.generate(prompt, num_frames, seed, steps=args.steps, mode="teacher" if args.teacher else "student",
                                 guidance_scale=args.guidance_scale, **start)

        if args.from_noise_level is None:
            generate = sample
        else:
            # Ground truth noised to the level, then the rest of the teacher's schedule.
            def transform(frames, case, seed):
                return sample(case.prompt, seed, len(frames), video=frames, noise_level=args.from_noise_level)

    sheet_videos, sheet_labels = [], []

    def keep_for_sheet(case, seed, frames) -> None:
        if seed == args.seeds[0] and len(sheet_videos) < args.sheet_rows:
            sheet_videos.append(frames)
            sheet_labels.append(f"[{case.split}] {case.prompt}")

    report = run_bench(generate, cases, args.frames, args.seeds, height, width, on_video=keep_for_sheet,
                       transform=transform)
    if args.autoencoder is not None:
        report["source"] = "autoencoder round trip"
        report["model"] = {"autoencoder": str(args.autoencoder), "sampler": "ground truth through the autoencoder"}
        from causvid.eval.reconstruction import format_regions

        reconstruction = errors.report()
        report["autoencoder_psnr_db"] = reconstruction["psnr_db"]
        report["autoencoder_clip_psnr_db_range"] = reconstruction["clip_psnr_db_range"]
        report["autoencoder_error_by_edge_distance"] = reconstruction["by_edge_distance"]
        report["autoencoder_first_frame_psnr_db"] = reconstruction["first_frame_psnr_db"]
        report["autoencoder_later_frames_psnr_db"] = reconstruction["later_frames_psnr_db"]
        print(format_regions(reconstruction))
        print(f"autoencoder reconstruction PSNR: {reconstruction['psnr_db']:.2f} dB over {reconstruction['clips']} clips")
    else:
        report["model"] = {
            "checkpoint": "ground truth" if args.ground_truth else str(args.checkpoint or "shipped"),
            "sampler": "ground truth" if args.ground_truth else ("teacher" if args.teacher else "student"),
            "steps": args.steps,
        }
        if args.from_noise_level is not None:
            report["source"] = "ground truth partly denoised"
            report["model"]["from_noise_level"] = args.from_noise_level
    print(format_table(report))
    if args.output:
        atomic_write_json(args.output, report)
        print(f"wrote {args.output}")
    if args.sheet:
        contact_sheet(sheet_videos, sheet_labels, args.sheet)
        print(f"wrote {args.sheet}")
    if args.json:
        print(json.dumps(report["splits"]))


def _word_probe(args: argparse.Namespace, cases) -> None:
    from causvid.checkpoint import CheckpointError
    from causvid.eval.word_probe import format_probe, probe_words
    from causvid.pipeline import load_pipeline

    pipe = load_pipeline(args.checkpoint, args.device)
    denoiser = pipe.teacher if args.teacher else pipe.denoiser
    if denoiser is None:
        raise CheckpointError("this checkpoint has no teacher/ directory")
    report = probe_words(denoiser, pipe.text_encoder, pipe.autoencoder, cases, num_frames=args.frames,
                         height=pipe.config.height, width=pipe.config.width, causal=not args.teacher,
                         seed=args.seeds[0])
    report["model"] = {"checkpoint": str(args.checkpoint or "shipped"),
                       "denoiser": "teacher" if args.teacher else "student"}
    print(format_probe(report))
    if args.output:
        atomic_write_json(args.output, report)
        print(f"wrote {args.output}")


def restriction(text: str) -> tuple[str, list[str]]:
    """argparse type of --restrict: "motion=left,right" -> ("motion", ["left", "right"])."""
    attribute, sep, values = text.partition("=")
    if not sep or not attribute or not values:
        raise argparse.ArgumentTypeError(f"expected ATTRIBUTE=VALUE[,VALUE...], got {text!r}")
    return attribute, values.split(",")


def register(subparsers) -> None:
    from causvid.cli import add_checkpoint_args

    parser = subparsers.add_parser("eval", help="shapes-bench: colour, shape, motion, consistency, smoothness")
    add_checkpoint_args(parser)
    parser.add_argument("--teacher", action="store_true", help="evaluate the 50-step CFG teacher")
    parser.add_argument("--ground-truth", action="store_true", help="evaluate rendered shapes-world clips (the ceiling)")
    parser.add_argument("--autoencoder", type=Path, default=None,
                        help="evaluate this autoencoder directory: ground truth through encode+decode, plus PSNR")
    parser.add_argument("--folder", type=Path, default=None,
                        help="with --autoencoder: reconstruction PSNR on this folder of videos (captions.jsonl) "
                             "instead of shapes-bench")
    parser.add_argument("--fps", type=float, default=None, help="with --folder: resample clips to this rate")
    parser.add_argument("--height", type=int, default=64, help="with --folder: clip height")
    parser.add_argument("--width", type=int, default=64, help="with --folder: clip width")
    parser.add_argument("--max-clips", type=int, default=64, help="with --folder: clips measured")
    parser.add_argument("--from-noise-level", type=float, default=None, metavar="SIGMA",
                        help="with --teacher: start from each ground-truth clip noised to SIGMA in (0, 1] and run "
                             "the rest of the schedule, to see at which noise levels an attribute is lost")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default: the pipeline's)")
    parser.add_argument("--guidance-scale", type=float, default=None, help="teacher CFG scale (default: the pipeline's)")
    parser.add_argument("--frames", type=int, default=21, help="pixel frames per video")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3], help="noise seeds per prompt")
    parser.add_argument("--num-seen", type=int, default=16, help="seen single-object prompts in the set")
    parser.add_argument("--num-pairs", type=int, default=2, help="seen two-object prompts in the set")
    parser.add_argument("--restrict", type=restriction, action="append", default=None, metavar="ATTRIBUTE=V1,V2",
                        help="prompt only within a narrowed world, as a training config's data.restrict "
                             "(repeatable, e.g. --restrict colour=red --restrict motion=left,right,up,down)")
    parser.add_argument("-o", "--output", type=Path, default=None, help="write the full JSON report here")
    parser.add_argument("--sheet", type=Path, default=None, help="write a contact-sheet PNG here")
    parser.add_argument("--sheet-rows", type=int, default=8, help="videos on the contact sheet")
    parser.add_argument("--json", action="store_true", help="also print the split means as one JSON line")
    parser.add_argument("--word-probe", action="store_true",
                        help="instead of sampling, measure how much each caption word (colour, shape, size, motion, "
                             "direction, background) changes the denoiser's loss on ground-truth clips")
    parser.set_defaults(func=_eval)
