"""`tcgraph transform | sample | inspect | compare | export-triton | serve` — see README.md for a tour.

The parser (`tcgraph.cli_parser`) is built without torch, and the names a user types (commands,
plans, models, artifact folders) are checked before torch is imported, with "did you mean" where
one is close: `--help`, `--version` and usage errors answer at once; torch is imported when a
command starts its work.
"""
from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path

from tcgraph.cli_parser import ARTIFACT_COMMANDS, COMMANDS, build_parser, command_of
from tcgraph.errors import EXIT_ERROR, EXIT_INTERRUPTED, TcgraphError, UsageError

EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what a shell reports for a command whose reader left

_build_parser = build_parser  # the name tests and scripts used


def _runner_options(args) -> dict:
    """The sample options that belong to one backend; naming them for another is an error."""
    chosen = {"share_weights": False if args.no_share_weights else None, "precision": args.precision,
              "cuda_graphs": False if args.no_cuda_graphs else None, "compile": True if args.compile else None}
    owner = {"share_weights": ("ort", "--no-share-weights"), "precision": ("torch", "--precision"),
             "cuda_graphs": ("torch", "--no-cuda-graphs"), "compile": ("torch", "--compile")}
    options = {}
    for key, value in chosen.items():
        if value is None:
            continue
        backend, flag = owner[key]
        if backend != args.backend:
            raise UsageError(f"{flag} is an option of the {backend} backend, not of {args.backend}; "
                               f"add --backend {backend} or drop {flag}")
        options[key] = value
    return options


def _install_signal_handlers() -> None:
    """Ctrl-C and `kill` (SIGTERM) both raise KeyboardInterrupt, from the first line of `main`
    on: temporary folders are removed, nothing half-written stays, and one line is printed."""
    import signal
    import threading

    def handler(signum, frame):
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():
        if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:  # a background job keeps ignoring it
            signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, handler)


def _import_heavy():
    """Import `tcgraph.api` (torch, numpy) with Ctrl-C and SIGTERM held until the imports finish.

    An interrupt that lands inside a third-party import can be swallowed there: torch catches a
    failed `import numpy` and goes on with a half-imported numpy, which later fails with an
    unrelated AttributeError, or the process dies of the signal after printing its message. So a
    signal that arrives now is remembered and raised as KeyboardInterrupt once the imports are done.
    """
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        from tcgraph import api

        return api
    held = []
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig, handler in previous.items():
        if handler not in (signal.SIG_IGN, signal.SIG_DFL, None):
            signal.signal(sig, lambda signum, frame: held.append(signum))
    try:
        from tcgraph import api
    finally:
        for sig, handler in previous.items():
            if handler is not None:
                signal.signal(sig, handler)
    if held:
        raise KeyboardInterrupt
    return api


def _stdout_gone() -> None:
    """The reader of stdout went away (`tcgraph inspect A --json | head -c 100`): point stdout
    at devnull so that the interpreter's final flush does not fail again (Python's recipe)."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def _show_warning(original):
    """tcgraph's own warnings (a prompt word the text demo does not know) as one line on stderr;
    any other as Python shows it."""

    def show(message, category, filename, lineno, file=None, line=None):
        if category.__module__.split(".")[0] == "tcgraph":
            print(f"tcgraph: warning: {message}", file=sys.stderr if file is None else file)
        else:
            original(message, category, filename, lineno, file, line)

    return show


def main(argv: list[str] | None = None) -> int:
    # Everything, the heavy imports (torch) and argument parsing included, runs inside the try:
    # a Ctrl-C in the first second is one line too, never a traceback.
    try:
        _install_signal_handlers()
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning(warnings.showwarning)
            return _run(argv)
    except TcgraphError as e:
        print(f"tcgraph: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("tcgraph: interrupted; nothing was left half-written", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        _stdout_gone()
        return EXIT_BROKEN_PIPE
    except OSError as e:  # a safety net: the places that write say more (tcgraph.files)
        from tcgraph.files import describe_os_error

        print(f"tcgraph: error: {describe_os_error(e)}", file=sys.stderr)
        return EXIT_ERROR


def _inspect_command(args) -> int:
    """`tcgraph inspect`: what `api.inspect` (and `api.inspect_pictures` with --out) return, without
    importing torch (the artifact's plan, manifest and ONNX graphs are read as data)."""
    from tcgraph.inspection import format_report, inspect_artifact, write_pictures
    from tcgraph.sampling import checks

    checks.path(args.artifact, "artifact")
    info = inspect_artifact(args.artifact, variant=args.variant, step=args.step)
    print(json.dumps(info, indent=1) if args.json else format_report(info))
    if args.out is not None:
        checks.path(args.out, "out_dir", "--out")
        written = write_pictures(args.artifact, args.out, variant=args.variant)
        print("\nwrote " + ", ".join(str(p) for p in written), file=sys.stderr if args.json else sys.stdout)
    sys.stdout.flush()
    return 0


def _run(argv: list[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    _check_command(argv)
    args = build_parser(argv).parse_args(argv)
    _check_names(args)  # before torch: a misspelt plan, model or folder is refused at once
    if args.command == "inspect":  # reads an artifact folder: no torch
        return _inspect_command(args)
    api = _import_heavy()
    if args.command == "transform":
        path = api.transform(args.model, args.plan, args.out, config=args.config, steps=args.steps,
                             guidance=args.guidance, eta=args.eta, batch=args.batch, force=args.force,
                             clip_x0={"auto": None, "on": True, "off": False}[args.clip_x0],
                             scheduler=args.scheduler, text_length=args.text_length,
                             calibration_text=args.calibration_embeddings, resolution=args.resolution,
                             check=not args.no_check, progress=_progress(args),
                             plan_options=_plan_options(args),
                             backend=args.backend, engine_options={
                                 k: v for k, v in (("precision", args.precision),
                                                   ("strip_weights", args.strip_weights)) if v})
        print(api.format_inspect(api.inspect(path, verify=False)))
        print(f"\nwrote {path}")
    elif args.command == "sample":
        _one_text_source(args)
        samples, labels = api.sample(args.artifact, classes=args.classes, per_class=args.per_class,
                                     text=args.embeddings, prompts=args.prompt, negative_prompt=args.negative_prompt,
                                     text_encoder=args.text_encoder,
                                     seed=args.seed, backend=args.backend, device=args.device, batch=args.batch,
                                     resolution=args.resolution, png=args.png, npy=args.npy,
                                     progress=_progress(args), runner_options=_runner_options(args),
                                     measured=(measured := {}))
        wrote = [str(args.png)] + ([str(args.npy)] if args.npy else [])
        print(f"sampled {len(labels)} images ({args.per_class} per class); wrote {', '.join(wrote)}")
        if measured:
            print(f"measured compute fraction {measured['fraction']:.3f} ({measured['computed_steps']} of "
                  f"{measured['steps']} steps computed, decided on the device)")
    elif args.command == "compare":
        from tcgraph import compare

        _one_text_source(args)
        result = compare.compare(args.artifact, args.reference, classes=args.classes, per_class=args.per_class,
                                 seed=args.seed, prompts=args.prompt, negative_prompt=args.negative_prompt,
                                 text=args.embeddings, text_encoder=args.text_encoder, backend=args.backend,
                                 device=args.device, repeats=args.repeats, png=args.png, progress=_progress(args))
        print(compare.to_json(result) if args.json else compare.format_compare(result))
    elif args.command in ("export-triton", "serve"):
        return _serve_command(args)
    sys.stdout.flush()  # a closed pipe shows here, inside the try, not at interpreter exit
    return 0


def _one_text_source(args) -> None:
    if args.prompt and args.embeddings:
        raise UsageError("give --prompt or --embeddings, not both")


def _progress(args):
    """What `--progress` asks for (auto: bars on a terminal, else nothing), the same for every command."""
    from tcgraph.progress import QUIET, Bars, Lines

    choice = getattr(args, "progress", "auto")
    if choice == "auto":
        return Bars() if sys.stderr.isatty() else QUIET
    return {"bars": Bars(), "lines": Lines(), "off": QUIET}[choice]


def _plan_options(args) -> dict:
    """The plan options given on the command line (`tcgraph.plan.plan_options`, read from the CLI table)."""
    from tcgraph.cli_table import table

    names = [o["dest"] for o in table()["plan_options"]]
    return {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}


#################################################################################
#                "Did you mean": names checked before torch is imported         #
#################################################################################


def _check_command(argv: list[str]) -> None:
    from tcgraph.suggest import did_you_mean

    word = command_of(argv)
    before = argv[:argv.index(word)] if word is not None else argv
    if word is not None and word not in COMMANDS and not any(a in ("-h", "--help", "--version") for a in before):
        hint = did_you_mean(word, COMMANDS)
        raise UsageError(f"unknown command {word!r}{f' ({hint})' if hint else ''}; commands: {', '.join(COMMANDS)} "
                         "(tcgraph --help says what each does)")


def _check_names(args) -> None:
    """Plan and model names and artifact folders, with "did you mean" where one is close."""
    from tcgraph.suggest import did_you_mean, did_you_mean_path

    if args.command == "transform":
        from tcgraph.cli_table import table

        spec = table()
        name = args.plan.split(":")[0]
        if name not in spec["planners"]:
            hint = did_you_mean(name, spec["planners"])
            raise UsageError(f"unknown plan {args.plan!r}{f' ({hint})' if hint else ''}; available: {spec['plan_help']}")
        given = [o for o in spec["plan_options"] if getattr(args, o["dest"], None) is not None]
        foreign = [o["flag"] for o in given if name not in o["planners"]]
        if foreign:
            own = [o["flag"] for o in spec["plan_options"] if name in o["planners"]]
            takes = f"its options are {', '.join(own)}" if own else "it takes no options"
            raise UsageError(f"{', '.join(foreign)} {'does' if len(foreign) == 1 else 'do'} not apply to plan "
                             f"{name!r}; {takes} (tcgraph transform --help says what each does)")
        model = args.model
        if model not in spec["models"] and not os.path.lexists(model):
            hints = "; ".join(h for h in (did_you_mean(model, spec["models"]), did_you_mean_path(model)) if h)
            config = (f"; {model!r} is a model config, not weights: give a checkpoint with --config {model}"
                      if model in spec["configs"] else "")
            raise TcgraphError(f"no pretrained model named {model!r} and no checkpoint file or diffusers folder at "
                               f"{model}{f' ({hints})' if hints else ''}; pretrained models: "
                               f"{', '.join(spec['models'])}; or give the path of a checkpoint (.safetensors, .pt, "
                               f".pth, .bin) or of a diffusers folder{config}")
    folders = []
    if args.command in ARTIFACT_COMMANDS:
        folders.append(args.artifact)
    if getattr(args, "reference", None) is not None:
        folders.append(args.reference)
    for folder in folders:
        _check_artifact_exists(folder, did_you_mean_path)


def _check_artifact_exists(folder: Path, did_you_mean_path) -> None:
    """A folder that does not exist, refused before torch (and with what exists close to it). A folder
    whose forced re-transform was killed mid-swap (`.<name>.old-*` beside it) is left to `load_artifact`,
    which puts it back."""
    from tcgraph.files import leftovers

    if os.path.lexists(folder) or leftovers(folder, "old"):
        return
    hint = did_you_mean_path(folder, folders_only=True)
    raise TcgraphError(f"{folder} is not a tcgraph artifact folder (it does not exist{'; ' + hint if hint else ''}); "
                       "pass the folder written by `tcgraph transform`, or run `tcgraph transform` to make one")


def _serve_command(args) -> int:
    from tcgraph.serve import launch

    options = {"name": args.name, "backend": args.backend, "device": args.device, "instances": args.instances,
               "max_queue_delay_us": args.max_queue_delay_us}
    if args.command == "serve":
        return launch.serve(args.artifact, port=args.port, **options)
    repo = launch.export_triton(args.artifact, args.repo, force=args.force,
                                dynamic_batching=not args.no_dynamic_batching, **options)
    print(f"wrote {repo}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
