"""What the command line accepts: the `tcgraph` parser, built without importing torch.

Only the chosen command's options are added (`build_parser(argv)`); what they need from the
planner and config registries (plan options, plan names, configs, model names) comes from
`tcgraph.cli_table`. `tcgraph.cli` runs the commands.
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path

BACKEND_CHOICES = ["ort", "torch", "trt"]
PRECISIONS = ["fp32", "bf16", "fp16"]
PROGRESS_CHOICES = ["auto", "bars", "lines", "off"]
COMMANDS = {
    "transform": "plan, rewrite and export a model into an artifact folder",
    "sample": "sample images with an artifact folder",
    "inspect": "show the plan, schedule and variants of an artifact folder",
    "compare": "sample an artifact and its full reference from the same noise: quality, time, a grid",
    "export-triton": "write a Triton Inference Server model repository for an artifact",
    "serve": "serve an artifact with Triton Inference Server on localhost (Ctrl-C stops)",
}
# The commands that read an artifact folder (their first argument), checked before torch is imported.
ARTIFACT_COMMANDS = ("sample", "inspect", "compare", "export-triton", "serve")


class _Parser(argparse.ArgumentParser):
    """argparse, with "did you mean" for a misspelt option."""

    def error(self, message: str):
        from tcgraph.suggest import did_you_mean

        found = re.match(r"unrecognized arguments: (.*)", message)
        if found:
            flags = [a for a in found.group(1).split() if a.startswith("--")]
            known = [o for p in _parsers_of(self) for a in p._actions for o in a.option_strings]
            hints = [h for h in (did_you_mean(f.split("=")[0], known, n=1) for f in flags) if h]
            if hints:
                message += f" ({'; '.join(hints)})"
        super().error(message)


def _parsers_of(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """The parser and the subparsers it holds."""
    found = [parser]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            found.extend(action.choices.values())
    return found


def command_of(argv: list[str]) -> str | None:
    """The command word of a command line: its first argument that is not an option."""
    return next((a for a in argv if not a.startswith("-")), None)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser, with the options of the command that `argv` names (of every command when None)."""
    from tcgraph.version import __version__

    p = _Parser(prog="tcgraph", description="Compile-time caching for diffusion transformers.")
    p.add_argument("--version", action="version", version=f"tcgraph {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=argparse.ArgumentParser)
    chosen = command_of(argv) if argv is not None else None
    fill = {"transform": _add_transform, "sample": _add_sample, "inspect": _add_inspect, "compare": _add_compare,
            "export-triton": _add_serve_parsers, "serve": _add_serve_parsers}
    parsers = {name: sub.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".")
               for name, text in COMMANDS.items()}
    for name, parser in parsers.items():
        if argv is None or name == chosen:
            fill[name](parser, name)
    return p


def _add_progress(parser) -> None:
    parser.add_argument("--progress", choices=PROGRESS_CHOICES, default="auto",
                        help="auto (default): bars on a terminal, nothing otherwise; bars; lines: one line per "
                             "phase on stderr (what it did, in how long), for logs; off")


def _add_transform(t, _name: str) -> None:
    from tcgraph.cli_table import TYPES, table

    spec = table()
    t.add_argument("--model", default="digits",
                   help=f"a pretrained model ({', '.join(repr(m) for m in spec['models'])}; default 'digits', the "
                        "embedded demo), a DiT checkpoint path (official layout; its config inferred or --config), "
                        "or a diffusers model or pipeline folder (" + ", ".join(spec["diffusers_classes"]) + ")")
    t.add_argument("--config", choices=spec["configs"], metavar="CONFIG", help="config of a checkpoint (inferred from its shapes when omitted): "
                        + ", ".join(spec["configs"]))
    t.add_argument("--plan", default="full", help=spec["plan_help"])
    t.add_argument("--out", type=Path, help="artifact folder (default: tcgraph-out/<model>-<plan>)")
    t.add_argument("--steps", type=int, default=50, help="DDIM steps (default 50)")
    t.add_argument("--resolution", type=int, help="latent side of a FLUX or SD3 folder, as inspect shows it (default: "
                   "its config's sample_size, else 128: 1024-pixel images)")
    t.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale, 1 = none (default 2; 1 for a model without guidance, FLUX.1-schnell)")
    t.add_argument("--eta", type=float, default=0.0, help="DDIM eta (default 0)")
    t.add_argument("--clip-x0", choices=("auto", "on", "off"), default="auto",
                   help="DDIM clips its x0 estimate to [-1, 1] at every step; auto (default): on for pixel-space "
                        "models such as the demo, off for latent models")
    t.add_argument("--scheduler", default="auto",
                   help="auto (default): a diffusers pipeline's own scheduler, else tcgraph's DDIM; ddim; or a "
                        "diffusers scheduler folder / scheduler_config.json (DDIM, DPM-Solver multistep, "
                        "flow-matching Euler)")
    t.add_argument("--batch", type=int, default=8, help="images per sampling run; graphs are static (default 8)")
    t.add_argument("--text-length", type=int,
                   help="text-conditioned models (PixArt): text tokens the graphs read, prompts padded to it "
                        "(default: the calibration embeddings' length, or the demo encoder's)")
    t.add_argument("--calibration-embeddings", type=Path,
                   help="text-conditioned models: prompt embeddings (safetensors: prompt_embeds, "
                        "prompt_attention_mask, negative_prompt_embeds, negative_prompt_attention_mask) that learned "
                        "planners calibrate on")
    t.add_argument("--force", action="store_true", help="replace an existing artifact folder")
    t.add_argument("--no-check", action="store_true", help="skip the numerical checks (rewritten graphs vs eager, ONNX vs graphs)")
    t.add_argument("--backend", choices=BACKEND_CHOICES, default="ort",
                   help="the backend you will sample with: ort (default) and torch need only the ONNX files and "
                        "torch programs every artifact has; trt also builds one TensorRT engine per variant "
                        "(needs TensorRT and an NVIDIA GPU)")
    t.add_argument("--precision", choices=PRECISIONS,
                   help="trt: TensorRT engine precision (default fp16)")
    t.add_argument("--strip-weights", action="store_true",
                   help="TensorRT: weight-stripped engines, refitted from weights.bin when loaded (no weight copy "
                        "per engine on disk)")
    _add_progress(t)
    group = t.add_argument_group("plan options (each applies to the planners its help names)")
    for option in spec["plan_options"]:
        kw = {"dest": option["dest"], "default": None, "help": option["help"]}
        if option["type"] is not None:
            kw["type"] = TYPES[option["type"]]
        if option["metavar"]:
            kw["metavar"] = option["metavar"]
        group.add_argument(option["flag"], **kw)


def _add_conditioning(s) -> None:
    """What `sample` and `compare` sample: classes or prompts, images per class, the seed, the backend."""
    s.add_argument("--classes", help="class ids, e.g. '0-9' or '1,3,5' (default: all)")
    from tcgraph.demos.vocabulary import describe_vocabulary

    s.add_argument("--prompt", action="append",
                   help="text-conditioned models with a text encoder (the digits-text and digits-flux demos; a "
                        "diffusers pipeline folder's text_encoder/ and tokenizer/): a prompt; repeat for several, one "
                        "grid row each. The demos know only these words (any other reads as nothing, with a warning): "
                        f"{describe_vocabulary()}")
    s.add_argument("--negative-prompt", default="", help="the prompt guidance steers away from (default empty)")
    s.add_argument("--text-encoder", type=Path, metavar="FOLDER",
                   help="with --prompt: the diffusers pipeline folder whose text encoders embed the prompts "
                        "(PixArt: T5; FLUX: CLIP + T5; SD3: two CLIPs + T5; the one the artifact was transformed "
                        "from; the demos need none)")
    s.add_argument("--embeddings", type=Path,
                   help="text-conditioned models: prompt embeddings (safetensors: prompt_embeds, "
                        "prompt_attention_mask and, for guidance, negative_prompt_embeds, "
                        "negative_prompt_attention_mask; FLUX and SD3: pooled_prompt_embeds and "
                        "negative_pooled_prompt_embeds in place of the masks), e.g. from a diffusers pipeline's "
                        "encode_prompt")
    s.add_argument("--per-class", type=int, default=4,
                   help="images per class (or prompt); one grid row per class (default 4)")
    s.add_argument("--seed", type=int, default=0, help="noise seed, 0..4294967295 (default 0)")
    s.add_argument("--backend", choices=BACKEND_CHOICES, default="ort",
                   help="ort (ONNX Runtime, the default), torch (the variant graphs in PyTorch; CUDA graphs on GPU) "
                        "or trt (TensorRT engines built by `transform --backend trt`)")
    s.add_argument("--device", choices=["cpu", "cuda"],
                   help="where to run (default: ort CUDA when onnxruntime-gpu can, else CPU; torch CPU; trt CUDA)")


def _add_sample(s, _name: str) -> None:
    s.add_argument("artifact", type=Path)
    _add_conditioning(s)
    s.add_argument("--precision", choices=PRECISIONS,
                   help="torch backend precision (default fp32 on CPU, bf16 on CUDA); trt engines keep the "
                        "precision they were built with")
    s.add_argument("--no-cuda-graphs", action="store_true", help="torch backend: run the graphs eagerly on CUDA")
    s.add_argument("--compile", action="store_true", help="torch backend: torch.compile each variant first")
    s.add_argument("--batch", type=int, help="check that the artifact was built for this batch")
    s.add_argument("--resolution", type=int, help="check that the artifact was built for this resolution")
    s.add_argument("--png", type=Path, default=Path("samples.png"), help="PNG grid to write (default samples.png)")
    s.add_argument("--npy", type=Path, help="also write the raw samples as .npy")
    s.add_argument("--no-share-weights", action="store_true",
                   help="ONNX Runtime: one weight copy per variant session (faster matmuls, ~1 model of memory "
                        "per variant) instead of one shared copy")
    _add_progress(s)


def _add_inspect(i, _name: str) -> None:
    i.add_argument("artifact", type=Path)
    i.add_argument("--variant", help="focus on one variant: block view, node table, diff against the full graph")
    i.add_argument("--step", help="focus on the variant that this step runs")
    i.add_argument("--json", action="store_true", help="machine-readable output")
    i.add_argument("--out", type=Path, help="write pictures here: schedule heatmap PNG, token masks, variant DOT/SVG")


def _add_compare(c, _name: str) -> None:
    c.add_argument("artifact", type=Path)
    c.add_argument("--reference", type=Path, metavar="DIR",
                   help="the full plan of the same model with the same settings (`transform --plan full`); "
                        "default: built beside the artifact in .tcgraph-references/ and reused while it matches")
    _add_conditioning(c)
    c.add_argument("--repeats", type=int, default=1,
                   help="sampling runs of each, timed; the median counts (default 1)")
    c.add_argument("--png", type=Path, default=Path("compare.png"),
                   help="PNG grid to write: per class or prompt, the reference's images, the artifact's and their "
                        "difference (default compare.png)")
    c.add_argument("--json", action="store_true", help="machine-readable output")
    _add_progress(c)


def _add_serve_parsers(q, name: str) -> None:
    """`export-triton` and `serve` (tcgraph/serve; the serve extra)."""
    from tcgraph.serve.config import DEFAULT_QUEUE_DELAY_US

    q.add_argument("artifact", type=Path)
    if name == "export-triton":
        q.add_argument("repo", type=Path, help="the repository folder to write (new, or a tcgraph one with --force)")
    else:
        q.add_argument("--port", type=int, default=8000,
                       help="HTTP port; gRPC uses port+1, metrics port+2 (default 8000)")
    q.add_argument("--name", help="model name (default: the artifact folder's name)")
    q.add_argument("--backend", choices=BACKEND_CHOICES, default="ort", help="tcgraph backend of the model (default ort)")
    q.add_argument("--device", choices=["cpu", "cuda"], help="cuda: one instance group on the GPUs (KIND_GPU)")
    q.add_argument("--instances", type=int, default=1, help="model instances (per GPU with cuda; default 1)")
    q.add_argument("--max-queue-delay-us", type=int, default=DEFAULT_QUEUE_DELAY_US,
                   help=f"dynamic batcher's wait for a full batch (default {DEFAULT_QUEUE_DELAY_US})")
    if name == "export-triton":
        q.add_argument("--no-dynamic-batching", action="store_true", help="one request per model call")
        q.add_argument("--force", action="store_true", help="replace an existing tcgraph model repository")
