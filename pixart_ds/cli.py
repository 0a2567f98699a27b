"""`pixart-ds <verb>`: parse arguments and dispatch to pixart_ds.commands.<verb>.main(args). No logic of its own.

A verb's module is imported only when that verb runs, so `pixart-ds --help` is fast and a verb's heavy dependencies
(deepspeed, streaming, transformers) load only when needed.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from pixart_ds.config import ConfigError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pixart-ds", description="Train PixArt-alpha with DeepSpeed, Streaming and Slurm.")
    # The `deepspeed` launcher passes --local_rank=N before the verb; the rank itself is read from the environment
    # (pixart_ds.dist), so the flag is accepted and ignored.
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="verb", metavar="VERB", required=True)

    s = sub.add_parser("train", help="train from a recipe (deepspeed / torchrun / srun / single process)",
                       description="Train from a recipe. Every recipe key: `pixart-ds keys` (docs/recipe.md).")
    s.add_argument("recipe")
    s.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.lr=1e-4")
    s.add_argument("--allow-config-change", action="store_true",
                   help="resume even if the recipe changed since the checkpoint was written")
    s.set_defaults(command="train")

    s = sub.add_parser("demo", help="embedded dataset -> stage 1 -> stage 2 -> samples + alignment score")
    s.add_argument("--out", default="runs/demo")
    s.add_argument("--small", action="store_true", help="a reduced size for CI")
    s.add_argument("--ranks", type=int, default=2, help="data-parallel ranks (CPU processes or GPUs)")
    s.add_argument("--vae", default=None,
                   help="an AutoencoderKL folder (default: the one fitted to the embedded dataset, shipped in "
                        "pixart_ds/data/assets/synthetic_vae)")
    s.set_defaults(command="demo")

    s = sub.add_parser("sample", help="generate images from a checkpoint")
    s.add_argument("--ckpt", required=True, help="run directory, checkpoint folder or weights file")
    s.add_argument("--prompt", action="append", default=[])
    s.add_argument("--prompts-file")
    s.add_argument("--sampler", default="dpm-solver", choices=["dpm-solver", "ddim", "ddpm"])
    s.add_argument("--steps", type=int, default=20)
    s.add_argument("--guidance", type=float, default=4.5)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--resolution", type=int, default=None)
    s.add_argument("--aspect-ratio", default=None, help="e.g. 16:9 (multi-scale models)")
    s.add_argument("--out", required=True)
    s.add_argument("--vae", default=None)
    s.add_argument("--text-encoder", default=None)
    s.add_argument("--raw", action="store_true", help="use the raw weights instead of the EMA")
    s.add_argument("--device", default=None)
    s.add_argument("--uncond", default="auto", choices=["auto", "null", "empty"],
                   help='unconditional input for guidance: the null caption (null), T5 of "" (empty, as diffusers), '
                        'or auto = null when the checkpoint has one')
    s.set_defaults(command="sample")

    s = sub.add_parser("export", help="write a diffusers PixArtAlphaPipeline folder")
    s.add_argument("--ckpt", required=True)
    s.add_argument("--to", dest="fmt", choices=["diffusers"], default="diffusers")
    s.add_argument("out")
    s.add_argument("--vae", default=None, help="default: the VAE the checkpoint names (run config, pipeline folder)")
    s.add_argument("--text-encoder", default=None, help="default: the T5 the checkpoint names")
    s.add_argument("--raw", action="store_true")
    s.set_defaults(command="export")

    s = sub.add_parser("convert", help="convert checkpoints: official / diffusers / dit / ours")
    s.add_argument("--from", dest="src", required=True, choices=["official", "diffusers", "dit", "ours"])
    s.add_argument("--to", dest="dst", required=True, choices=["official", "diffusers", "ours"])
    s.add_argument("input")
    s.add_argument("output")
    s.add_argument("--reparam-t", type=int, default=500, help="DiT -> PixArt re-parameterization timestep")
    s.add_argument("--resolution", type=int, default=None, help="image resolution (sets the positional embedding)")
    s.add_argument("--model-json", default=None,
                   help="model config keys the input does not carry (a JSON file or an inline object, e.g. "
                        "'{\"num_heads\": 6}'); for --from dit, the DiT's architecture keys and the new model's")
    s.add_argument("--weights", default="auto", choices=["auto", "ema", "raw"],
                   help="which weight set of an official/DiT .pth that holds several (auto = the EMA where present)")
    s.set_defaults(command="convert")

    s = sub.add_parser("model-info", help="parameter counts with a per-component breakdown")
    s.add_argument("--preset", default="PixArt-XL/2")
    s.add_argument("--adaln", default="single", choices=["single", "block"])
    s.add_argument("--condition", default="text", choices=["text", "class"])
    s.add_argument("--multi-scale", action="store_true")
    s.add_argument("--json", action="store_true")
    s.set_defaults(command="model_info")

    s = sub.add_parser("data", help="convert a raw dataset to MDS shards")
    dsub = s.add_subparsers(dest="kind", required=True)
    for kind in ("imagenet", "sam", "journeydb", "folder", "synthetic"):
        d = dsub.add_parser(kind)
        if kind in ("sam", "journeydb"):
            d.add_argument("root", nargs="+", metavar="INPUT",
                           help="the downloaded archives (files, directories of them, quoted globs, or list files "
                                "of archive paths), read in place; or one directory of extracted images")
        elif kind != "synthetic":
            d.add_argument("root")
        d.add_argument("--out", required=True)
        d.add_argument("--workers", type=int, default=None)
        d.add_argument("--shard-size-limit", type=int, default=1 << 26)
        if kind == "sam":
            d.add_argument("--captions", default=None,
                           help="LLaVA captions keyed by image id: the paper's SA1B_caption.tar.gz (one sa_N.txt per "
                                "image), a directory tree of <id>.txt, or JSONL/CSV/JSON (without it captions stay "
                                "empty: the input for `pixart-ds caption`)")
        if kind == "journeydb":
            d.add_argument("--annotations", required=True, help="JourneyDB annotation JSONL (or its .tgz)")
            d.add_argument("--text", default="caption", choices=["caption", "prompt"],
                           help="caption = Task2.Caption (GPT-3.5), prompt = the Midjourney prompt")
        if kind == "folder":
            d.add_argument("--index", default=None, help="one JSONL/CSV of (path, caption) instead of sidecars")
        if kind == "synthetic":
            d.add_argument("--num-samples", type=int, default=1024)
            d.add_argument("--resolution", type=int, default=256)
            d.add_argument("--seed", type=int, default=0)
        d.set_defaults(command="data")

    s = sub.add_parser("features", help="raw MDS -> feature MDS (VAE posterior + T5 tokens)")
    s.add_argument("--in", dest="inp", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--vae", required=True)
    s.add_argument("--text-encoder", default=None)
    s.add_argument("--resolution", type=int, default=256, choices=[256, 512, 1024] + [32, 64, 128])
    s.add_argument("--multi-scale", action="store_true")
    s.add_argument("--batch-size", type=int, default=16)
    s.add_argument("--class-labels", action="store_true", help="stage 1: latents + class label, no text")
    s.set_defaults(command="features")

    s = sub.add_parser("caption", help="re-caption a raw MDS with LLaVA")
    s.add_argument("--in", dest="inp", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--model", required=True)
    s.add_argument("--prompt", default="Describe this image and its style in a very detailed manner")
    s.add_argument("--batch-size", type=int, default=8)
    s.add_argument("--max-new-tokens", type=int, default=256)
    s.set_defaults(command="caption")

    s = sub.add_parser("caption-stats", help="the paper's Table-1 concept-density statistics")
    s.add_argument("file")
    s.add_argument("--compare", default=None)
    s.add_argument("--json", default=None, help="also write the statistics as JSON here")
    s.set_defaults(command="caption_stats")

    s = sub.add_parser("keys", help="every recipe key with its default and description")
    s.add_argument("--markdown", action="store_true", help="as the markdown table of docs/recipe.md")
    s.add_argument("--grep", default=None, help="only keys containing this text, e.g. train. or lr")
    s.set_defaults(command="keys")

    s = sub.add_parser("fit-vae", help="fit the demo's small VAE to the embedded dataset")
    s.add_argument("--out", required=True)
    s.add_argument("--steps", type=int, default=4000)
    s.add_argument("--batch-size", type=int, default=64)
    s.add_argument("--num-images", type=int, default=20000)
    s.add_argument("--workers", type=int, default=None, help="processes rendering the images (default: all cores)")
    s.set_defaults(command="fit_vae")

    s = sub.add_parser("eval", help="FID / KID / CLIP score / alignment of a checkpoint on a prompt set",
                       description="Generate images for a prompt set from a checkpoint and score them: FID and KID "
                                   "against a reference, CLIP score, and the embedded dataset's pixel judge.")
    s.add_argument("--ckpt", required=True, help="run directory (EMA weights), 'ours' folder or diffusers folder")
    s.add_argument("--prompts", required=True, help="one caption per line (.txt) or JSON lines with a caption field")
    s.add_argument("--out", required=True, help="output folder: eval.json, eval.md, grid.png, images/, features/")
    s.add_argument("--reference", default=None,
                   help="reference images for FID/KID: an image folder, raw MDS shards, or cached statistics (.npz)")
    s.add_argument("--inception", default=None, help="Inception-v3 weights file (torch-fidelity's .pth format)")
    s.add_argument("--clip", default=None, help="a local CLIP folder (transformers CLIPModel + CLIPProcessor)")
    s.add_argument("--num-images", type=int, default=None, help="default: one per prompt; prompts repeat beyond")
    s.add_argument("--sampler", default="dpm-solver", choices=["dpm-solver", "ddim", "ddpm"])
    s.add_argument("--steps", type=int, default=20, help="paper: DPM-Solver++ 20 steps")
    s.add_argument("--guidance", type=float, default=4.5, help="paper: 4.5")
    s.add_argument("--seed", type=int, default=0, help="image i is seeded with seed + i")
    s.add_argument("--resolution", type=int, default=None, help="default: the checkpoint's training resolution")
    s.add_argument("--batch-size", type=int, default=16)
    s.add_argument("--shard-size", type=int, default=256, help="images per resumable shard")
    s.add_argument("--vae", default=None)
    s.add_argument("--text-encoder", default=None)
    s.add_argument("--raw", action="store_true", help="the optimizer's weights instead of the EMA")
    s.add_argument("--uncond", default="auto", choices=["auto", "null", "empty"])
    s.add_argument("--reference-images", type=int, default=None, help="use the first N reference images")
    s.add_argument("--reference-resize", action="store_true",
                   help="resize (shorter side, bicubic) and center-crop reference images of another size")
    s.add_argument("--cache-dir", default=None,
                   help="where reference statistics are cached (default ~/.cache/pixart_ds/eval)")
    s.add_argument("--kid-subsets", type=int, default=100)
    s.add_argument("--kid-subset-size", type=int, default=1000)
    s.add_argument("--judge", default="auto", choices=["auto", "on", "off"],
                   help="the embedded dataset's pixel judge (auto: when every prompt is one of its captions)")
    s.add_argument("--no-images", action="store_true", help="do not keep the generated PNGs")
    s.add_argument("--grid-images", type=int, default=64)
    s.add_argument("--device", default=None)
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(command="eval")

    s = sub.add_parser("ckpt", help="checkpoint tools")
    csub = s.add_subparsers(dest="ckpt_verb", required=True)
    c = csub.add_parser("export", help="consolidated EMA (or raw) weights as safetensors")
    c.add_argument("run_dir")
    c.add_argument("out")
    c.add_argument("--raw", action="store_true")
    c.set_defaults(command="ckpt")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        # heavy: the verb's module pulls in torch, deepspeed, streaming or transformers (see the module docstring)
        rc = importlib.import_module(f"pixart_ds.commands.{args.command}").main(args)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        # One line naming the bad file/key/value; tracebacks only for bugs.
        print(f"pixart-ds {args.verb}: error: {e}", file=sys.stderr)
        return 2
    return int(rc) if isinstance(rc, int) else 0


if __name__ == "__main__":
    sys.exit(main())
