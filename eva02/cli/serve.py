"""`eva02 serve`: an HTTP inference server for one model, with dynamic micro-batching (eva02/serve/).

Checks in the usual order: the extra, the flags, the model name and checkpoint file, then the port
(bound, so a taken one fails before a model loads), then the model loads exactly as `eva02 predict`
loads it (headless models too: they serve embeddings). An EVA-02-CLIP name or alias (`eva02 list
clip`), or a CLIP file written by `save_clip`, serves the CLIP routes instead (the `clip` extra too);
`-m CLIP-NAME --checkpoint FILE` loads an open_clip, BAAI or eva02 CLIP file into that architecture.
The URL is printed once the port is bound, with its real number for `--port 0`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from eva02.cli import CliError
from eva02.cli.options import add_checkpoint, add_dtype, add_model, check_device, positive_int
from eva02.cli.predict import check_img_size, check_model_args, load_model_from_args
from eva02.extras import need

EXAMPLE = "eva02 serve -m eva02-tiny-p14_in21k-pre_3rdparty_in1k; curl -F file=@cat.jpg localhost:8000/v1/classify"


def _float_where(ok, words: str):
    """An argparse type: a number for which `ok(value)` holds, else an error saying it `words`."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expects a number, got '{text}'") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"{words}, got {text}")
        return value

    return parse


positive_float = _float_where(lambda v: v > 0, "must be more than 0")
non_negative_float = _float_where(lambda v: v >= 0, "must be 0 or more")


def port_number(text: str) -> int:
    """argparse type: 0 (a free port) to 65535."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expects a port number, got '{text}'") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be 0 (any free port) to 65535, got {value}")
    return value


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "serve",
        help="HTTP inference server with micro-batching",
        description="Serve one model over HTTP: classify, features, explain, healthz, readyz, metrics; "
        "zero-shot and text/image embeddings for EVA-02-CLIP models (docs/serve.md).",
        epilog=f"example: {EXAMPLE}",
    )
    add_model(
        p, "zoo model name (see `eva02 list`; headless models serve /v1/features only) "
        "or EVA-02-CLIP name (`eva02 list clip`: zero-shot and embeddings)",
    )  # fmt: skip
    add_checkpoint(
        p,
        "weights to load into --model's architecture (any known format, CLIP: open_clip, BAAI or eva02); "
        "without --model, an eva02 checkpoint or CLIP file that embeds its config",
    )
    p.add_argument("--device", metavar="D", help="cpu, cuda or cuda:N (default: cuda when available)")
    add_dtype(p, "compute precision: fp32 (default), bf16 or fp16 autocast (fp16 needs --device cuda)")
    p.add_argument("--img-size", type=int, metavar="N", help="serve at this input size instead of the model's")
    p.add_argument(
        "--threads", type=positive_int, metavar="N", help="CPU threads for torch (default: the cores free now)"
    )
    g = p.add_argument_group("batching and limits")
    g.add_argument("--max-batch", type=positive_int, default=32, metavar="N", help="images per model call (32)")
    g.add_argument(
        "--max-wait-ms", type=non_negative_float, default=5.0, metavar="MS",
        help="how long a batch waits to fill after its first image (5)",
    )  # fmt: skip
    g.add_argument(
        "--max-queue", type=positive_int, metavar="N",
        help="requests held at once; more get 503 with Retry-After (default: 4 x --max-batch)",
    )  # fmt: skip
    g.add_argument("--max-upload-mb", type=positive_float, default=16.0, metavar="MB", help="largest upload (16)")
    g.add_argument("--timeout-s", type=positive_float, default=30.0, metavar="S", help="per-request limit (30)")
    g.add_argument("--decode-threads", type=positive_int, metavar="N", help="image decoding threads (default: up to 4)")
    g.add_argument(
        "--max-texts", type=positive_int, default=1024, metavar="N",
        help="CLIP: texts per /v1/embed/text request, labels x templates per zero-shot request (1024)",
    )  # fmt: skip
    g.add_argument(
        "--head-cache", type=positive_int, default=32, metavar="N",
        help="CLIP: zero-shot label sets whose classifier heads are kept (32)",
    )  # fmt: skip
    g = p.add_argument_group("network")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1; 0.0.0.0 for all)")
    g.add_argument("--port", type=port_number, default=8000, help="port (8000; 0 picks a free one)")
    g.add_argument("--access-log", action="store_true", help="log one line per request")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """The `serve` command: returns when the server has stopped."""
    for module in ("fastapi", "uvicorn", "python_multipart", "prometheus_client"):
        need(module, "serve", "eva02 serve")
    if args.img_size is not None and args.img_size < 1:
        raise CliError(f"--img-size must be a positive multiple of the model's patch size, got {args.img_size}")
    args.clip = is_clip(args)
    if args.clip:
        need("open_clip.tokenizer", "clip", "eva02 serve with an EVA-02-CLIP model")
        check_clip_args(args)
    else:
        check_model_args(args, need_head=False)
    from eva02.serve import server

    try:
        sock = server.bind_socket(args.host, args.port)
    except OSError as e:
        reason = e.strerror or str(e)
        raise CliError(
            f"cannot listen on {args.host} port {args.port}: {reason}; choose another --port (0: any)"
        ) from None
    try:
        return _serve(args, sock)
    finally:
        sock.close()


def _serve(args: argparse.Namespace, sock) -> int:
    from eva02.serve import ModelRunner, ServeSettings, create_app, server
    from eva02.threads import set_threads, usable_cores

    if args.clip:
        from eva02.serve.clip import ClipRunner

        clip, pre = load_clip_from_args(args)
    else:
        try:
            model, pre = load_model_from_args(args, need_head=False)  # also checks --img-size against the patch size
        except (CliError, ValueError) as e:
            raise clip_file_hint(args.checkpoint) or e from None
    set_threads(args.threads)
    settings = ServeSettings(
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        max_queue=args.max_queue or 4 * args.max_batch,
        max_upload_bytes=max(1, int(args.max_upload_mb * 2**20)),
        timeout_s=args.timeout_s,
        decode_threads=args.decode_threads or max(1, min(4, usable_cores())),
        max_texts=args.max_texts,
        head_cache=args.head_cache,
    )
    if args.clip:
        runner = ClipRunner(clip, pre, name=model_name(args), dtype=args.dtype)
    else:
        runner = ModelRunner(model, pre, name=model_name(args), dtype=args.dtype)
    app = create_app(runner, settings)
    print(f"eva02 serve: {runner.name} at {server.url_of(sock)} (GET /readyz is 200 once warmed up)",
          file=sys.stderr, flush=True)  # fmt: skip
    server.run(app, sock, access_log=args.access_log)
    return 0


def model_name(args: argparse.Namespace) -> str:
    """The zoo name of --model, else the name a checkpoint was saved with, else its file name."""
    if args.model is not None:
        from eva02.cli.options import zoo_entry
        from eva02.weights.zoo import find_clip

        return find_clip(args.model).name if args.clip else zoo_entry(args.model).name
    from eva02.weights.load import read_metadata

    return read_metadata(args.checkpoint).get("name") or Path(args.checkpoint).stem


# ------------------------------------------------------------------------------------- EVA-02-CLIP
def is_clip(args: argparse.Namespace) -> bool:
    """Whether the model to serve is an EVA-02-CLIP: a CLIP name or alias, or (without a name) a
    CLIP file written by `save_clip`. Other names and files are left to the classifier checks."""
    from eva02.weights.zoo import find_clip

    if args.model is not None:
        if find_clip(args.model) is not None:
            return True
        if "clip" in args.model.lower():  # no classifier name says CLIP: suggest the CLIP names
            from eva02.weights.zoo import resolve_clip

            try:
                resolve_clip(args.model)
            except ValueError as e:
                raise CliError(str(e)) from None
        return False
    if args.checkpoint is None or not Path(args.checkpoint).is_file():
        return False
    from eva02.weights.clip import clip_config_of
    from eva02.weights.files import NotACheckpointError

    try:
        return clip_config_of(args.checkpoint) is not None
    except NotACheckpointError:  # the classifier checks say what is wrong with it
        return False


def clip_file_hint(checkpoint: str | None) -> CliError | None:
    """For a CLIP file in another format (open_clip, BAAI) given without a CLIP name: an error that
    says to name it. Only read when loading it as a classifier failed."""
    if checkpoint is None:
        return None
    from eva02.weights.convert import detect_clip_format
    from eva02.weights.files import read_checkpoint

    try:
        fmt = detect_clip_format(read_checkpoint(checkpoint))
    except Exception:  # not a CLIP file either: the classifier's error stands
        return None
    return CliError(
        f"--checkpoint {checkpoint} is an EVA-02-CLIP checkpoint ({fmt} format): name its CLIP model, "
        f"e.g. -m EVA02-CLIP-B-16 --checkpoint {checkpoint} (`eva02 list clip` shows the names)"
    )


def check_clip_args(args: argparse.Namespace) -> None:
    """--checkpoint, --device, --dtype and --img-size of a CLIP model, before anything loads."""
    from eva02.weights.zoo import find_clip

    if args.checkpoint is not None and not Path(args.checkpoint).is_file():
        raise CliError(f"--checkpoint file '{args.checkpoint}' does not exist")
    if args.model is not None and args.img_size is not None:
        check_img_size(args.img_size, find_clip(args.model).cfg.vision.patch_size)
    check_device(args.device, args.dtype)


def load_clip_from_args(args: argparse.Namespace):
    """(Eva02Clip, image preprocessing) from --model / --checkpoint / --device / --img-size."""
    from dataclasses import replace

    from eva02.inference import resolve_device
    from eva02.weights.clip import get_clip
    from eva02.weights.zoo import Preprocess, find_clip

    entry = find_clip(args.model) if args.model is not None else None
    pretrained = args.checkpoint if args.checkpoint is not None else True  # a name alone: its released weights
    try:
        clip = get_clip(entry, pretrained=pretrained, device=resolve_device(args.device))
    except (OSError, RuntimeError) as e:  # download, file or state-dict problems
        raise CliError(f"cannot load the CLIP model: {' '.join(str(e).split())}") from None
    pre = entry.preprocess if entry is not None else Preprocess(img_size=clip.cfg.vision.img_size)
    if args.img_size is not None:
        check_img_size(args.img_size, clip.cfg.vision.patch_size)
        pre = replace(pre, img_size=args.img_size)
    return clip, pre
