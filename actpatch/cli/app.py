"""The ``actpatch`` typer app: thin commands over actpatch.loading, actpatch.analyze/patch_model and
actpatch.manifest.  Exit codes: 0 ok, 1 failure, 2 usage error (see docs/cli.md)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import sys
import threading
import traceback
from collections.abc import Iterator
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from . import render
from .kind_options import kind_options

app = typer.Typer(
    name="actpatch",
    help="Cut the activation memory of PyTorch / Hugging Face training with inverted activations.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

EXIT_FAILURE = 1
EXIT_USAGE = 2


class DType(str, Enum):
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class Optimizer(str, Enum):
    adamw = "adamw"
    adamw_fused = "adamw-fused"
    adamw_8bit = "adamw-8bit"
    sgd = "sgd"
    none = "none"


class LossHead(str, Enum):
    eager = "eager"
    fused = "fused"


class UsageProblem(Exception):
    """A combination of arguments that cannot work (exit code 2)."""


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised as SIGINT raises KeyboardInterrupt (exit code 128 + the signal)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


_TERMINATING = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGHUP") if hasattr(signal, n))


@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """While a command runs, SIGTERM and SIGHUP unwind the stack like Ctrl-C, so clean-ups run (the
    partial --output directory is removed); the previous handlers are restored afterwards."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set them
        yield
        return

    def raise_terminated(signum: int, frame: Any) -> None:
        raise Terminated(signum)

    previous = {s: signal.signal(s, raise_terminated) for s in _TERMINATING}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _stderr() -> Console:
    return Console(stderr=True)


def show_progress(json_output: bool, stderr: Any = None) -> bool:
    """Spinners on stderr only for a person watching it: stderr a terminal, and no --json."""
    return not json_output and (stderr or sys.stderr).isatty()


def _status(err: Console, message: str, show: bool) -> contextlib.AbstractContextManager[Any]:
    """A spinner with ``message`` on ``err`` while the block runs, when ``show``."""
    return err.status(message) if show else contextlib.nullcontext()


def error_line(message: str) -> str:
    """The one line printed on stderr for an error."""
    return "actpatch: error: " + " ".join(str(message).split())


def exit_code_for(exc: BaseException) -> int:
    """2 for what the user typed (unknown model, bad option combination, existing --output), else 1."""
    from ..loading import ModelNotFoundError
    from ..manifest import OutputExistsError

    return (
        EXIT_USAGE if isinstance(exc, ModelNotFoundError | OutputExistsError | UsageProblem) else EXIT_FAILURE
    )


@contextlib.contextmanager
def _errors(debug: bool) -> Iterator[None]:
    """Turn any exception into one line on stderr and an exit code; ``debug`` adds the traceback."""
    try:
        with _terminate_as_interrupt():
            yield
    except (typer.Exit, typer.Abort):
        raise
    except Terminated as e:
        print(error_line(f"terminated ({signal.Signals(e.signum).name})"), file=sys.stderr)
        raise typer.Exit(128 + e.signum) from None
    except KeyboardInterrupt:
        print(error_line("interrupted"), file=sys.stderr)
        raise typer.Exit(130) from None
    except Exception as e:
        if debug:
            traceback.print_exc()
        from ..loading import ModelLoadError
        from ..manifest import ManifestError, OutputError
        from .verify import VerifyError

        known = (ModelLoadError, ManifestError, OutputError, VerifyError, UsageProblem)
        message = str(e) if isinstance(e, known) else f"unexpected {type(e).__name__}: {e}"
        if not debug and not isinstance(e, known):
            message += " (run with --debug for the traceback)"
        print(error_line(message), file=sys.stderr)
        raise typer.Exit(exit_code_for(e)) from None


@contextlib.contextmanager
def _quiet_libraries(debug: bool) -> Iterator[None]:
    """transformers' and huggingface_hub's warnings (the Hub's retries ...) and progress bars off while a
    command runs, so that stderr holds actpatch's own lines and an error stays one line; restored
    afterwards.  ``debug`` leaves them on."""
    if debug:
        yield
        return
    from huggingface_hub import utils as hub_utils
    from transformers.utils import logging as hf_logging

    levels = hf_logging.get_verbosity(), hub_utils.logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled(), not hub_utils.are_progress_bars_disabled()
    hf_logging.set_verbosity_error()
    hub_utils.logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    hub_utils.disable_progress_bars()
    try:
        yield
    finally:
        hf_logging.set_verbosity(levels[0])
        hub_utils.logging.set_verbosity(levels[1])
        if bars[0]:
            hf_logging.enable_progress_bar()
        if bars[1]:
            hub_utils.enable_progress_bars()


def _patterns(values: list[str] | None) -> list[str] | None:
    """Repeated options and comma-separated lists, flattened."""
    if not values:
        return None
    return [p.strip() for v in values for p in v.split(",") if p.strip()]


def _with(report: Any, **changes: Any) -> Any:
    if dataclasses.is_dataclass(report):
        return dataclasses.replace(report, **changes)
    for k, v in changes.items():
        setattr(report, k, v)
    return report


@app.command()
@kind_options
def convert(
    model: Annotated[
        str,
        typer.Argument(
            help="Local directory with config.json (weights optional), Hugging Face Hub id, "
            "or a built-in id (see `actpatch models`).",
            show_default=False,
        ),
    ],
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Config only: build on the meta device, read no weights.")
    ] = False,
    batch_size: Annotated[
        int | None,
        typer.Option(min=1, help="Batch size of the projection [default: 1].", show_default=False),
    ] = None,
    seq_len: Annotated[
        int | None,
        typer.Option(min=1, help="Sequence length of the projection [default: 512].", show_default=False),
    ] = None,
    dtype: Annotated[
        DType | None,
        typer.Option(
            case_sensitive=False,
            help="Training dtype (the projection's and the model's); default: the config's, else float32.",
            show_default=False,
        ),
    ] = None,
    include: Annotated[
        list[str] | None,
        typer.Option(
            "--include",
            help="Only module paths matching this fnmatch pattern (repeatable).",
            show_default=False,
        ),
    ] = None,
    exclude: Annotated[
        list[str] | None,
        typer.Option(
            "--exclude",
            help="Skip module paths matching this fnmatch pattern (repeatable).",
            show_default=False,
        ),
    ] = None,
    json_output: Annotated[
        bool, typer.Option("--json", help="Print only the report as JSON on stdout (PatchReport.to_dict()).")
    ] = False,
    all_sites: Annotated[
        bool, typer.Option("--all-sites", help="One table row per site, not per pattern of layers.")
    ] = False,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            help="Save the patched model (save_pretrained + actpatch_manifest.json) into this new directory.",
            show_default=False,
        ),
    ] = None,
    random_init: Annotated[
        bool,
        typer.Option(
            "--random-init",
            help="With --output and a MODEL without weights: save randomly initialised ones (else refused).",
        ),
    ] = False,
    verify: Annotated[
        bool,
        typer.Option("--verify", help="Compare one forward/backward on a random batch, patched vs original."),
    ] = False,
    options: dict[str, bool] | None = None,  # one --option/--no-option per site kind (@kind_options)
    trust_remote_code: Annotated[
        bool, typer.Option("--trust-remote-code", help="Allow code from the model's repository to run.")
    ] = False,
    gpu_memory: Annotated[
        float | None,
        typer.Option(
            "--gpu-memory",
            help="With --dry-run: the GPU's memory in GiB; adds the training memory and the largest batch at "
            "--seq-len (or, with --batch-size and no --seq-len, the longest sequence) that fits.",
            show_default=False,
        ),
    ] = None,
    optimizer: Annotated[
        Optimizer,
        typer.Option(case_sensitive=False, help="With --gpu-memory: the optimizer."),
    ] = Optimizer.adamw,
    mixed_precision: Annotated[
        bool,
        typer.Option(
            "--mixed-precision",
            help="With --gpu-memory: float32 weights, gradients and optimizer states, the forward under bf16 "
            "autocast (probed on meta with autocast's casts).",
        ),
    ] = False,
    loss: Annotated[
        LossHead,
        typer.Option(
            case_sensitive=False,
            help="With --gpu-memory: the loss head, eager (float32 logits) or fused (Liger-Kernel's fused "
            "linear cross entropy: no logits).",
        ),
    ] = LossHead.eager,
    lora_rank: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="With --gpu-memory: LoRA of this rank on the attention and MLP projections, base frozen.",
            show_default=False,
        ),
    ] = None,
    plot: Annotated[
        Path | None,
        typer.Option(
            "--plot",
            help="With --gpu-memory: draw the memory before and after into FILE.png or FILE.svg "
            "(pip install 'actpatch[plot]').",
            show_default=False,
        ),
    ] = None,
    debug: Annotated[bool, typer.Option("--debug", help="Show the traceback of an error.")] = False,
) -> None:
    """Find the activations of MODEL that can be inverted, patch them, and project the memory saved."""
    with _errors(debug), _quiet_libraries(debug):
        _convert(
            model,
            dry_run=dry_run,
            batch_size=batch_size,
            seq_len=seq_len,
            dtype=dtype.value if dtype else None,
            include=_patterns(include),
            exclude=_patterns(exclude),
            json_output=json_output,
            all_sites=all_sites,
            output=output,
            random_init=random_init,
            verify=verify,
            options=options or {},
            trust_remote_code=trust_remote_code,
            debug=debug,
            training=_training(gpu_memory, optimizer, lora_rank, plot, dry_run, mixed_precision, dtype, loss),
        )


def _training(
    gpu_memory: float | None,
    optimizer: Optimizer,
    lora_rank: int | None,
    plot: Path | None,
    dry_run: bool,
    mixed: bool,
    dtype: DType | None,
    loss: LossHead,
) -> Any:
    """The --gpu-memory request, checked before any work (None without --gpu-memory)."""
    from .fit_command import TrainingRequest

    return TrainingRequest.checked(
        gpu_memory,
        optimizer.value,
        lora_rank,
        plot,
        dry_run,
        UsageProblem,
        mixed,
        dtype.value if dtype else None,
        loss.value,
    )


def _convert(
    name: str,
    *,
    dry_run: bool,
    batch_size: int,
    seq_len: int,
    dtype: str | None,
    include: list[str] | None,
    exclude: list[str] | None,
    json_output: bool,
    output: Path | None,
    verify: bool,
    trust_remote_code: bool,
    random_init: bool = False,
    options: dict[str, bool],
    debug: bool = False,
    all_sites: bool = False,
    training: Any = None,
) -> None:
    import torch

    import actpatch

    from .. import manifest

    if dry_run and output is not None:
        raise UsageProblem("--output needs weights; it cannot be used with --dry-run")
    if dry_run and verify:
        raise UsageProblem("--verify runs the model; it cannot be used with --dry-run")
    if output is not None:
        manifest.check_output_dir(output)
    err = _stderr()
    progress = show_progress(json_output)
    what = "config (meta device, no weights)" if dry_run else "model"
    with _status(err, f"Loading {what} of {name} ...", progress):
        torch_dtype = getattr(torch, dtype) if dtype else None
        if training is not None and training.mixed:
            torch_dtype = torch.float32  # the master weights; the probe runs under autocast's casts
        loaded = _load(name, dry_run, torch_dtype, trust_remote_code, random_init or output is None)
    for note in loaded.notes:
        err.print(f"[yellow]note:[/] {note}", highlight=False)
    torch_dtype = loaded.dtype
    model = loaded.model if training is None else training.prepare(loaded.model)
    shape = {
        "batch_size": batch_size or 1,
        "seq_len": seq_len or 512,
        "dtype": torch_dtype,
        "include": include,
        "exclude": exclude,
        **options,
    }

    check = None
    dtype_name = str(torch_dtype).removeprefix("torch.")
    at = f"batch {shape['batch_size']} × seq {shape['seq_len']}, {dtype_name}"
    probing = f"Probing {type(model).__name__} ({at}) ..."
    with _status(err, probing, progress):
        if dry_run:
            with training.probing(model) if training is not None else contextlib.nullcontext():
                report = actpatch.analyze(model, **shape)
        elif verify:
            from .verify import verify as run_verify

            check, report = run_verify(model, lambda m: actpatch.patch_model(m, **shape))
        else:
            report = actpatch.patch_model(model, **shape)
    report = _with(report, model=name, dry_run=dry_run)
    fit = None
    if training is not None:
        with _status(err, "Fitting a training step ...", progress):
            fit = training.fit(model, report, shape, seq_len=seq_len, batch_size=batch_size)
            training.draw(fit, f"{name}, {dtype_name}")

    failed = check is not None and not check.ok
    if output is not None and not failed:
        with _status(err, f"Saving the patched model to {output} ...", progress):
            manifest.save_patched(model, output, report, include=include, exclude=exclude)

    if json_output:
        data = report.to_dict()
        if check is not None:
            data["verify"] = check.to_dict()
        if output is not None and not failed:
            data["output"] = str(output)
        if fit is not None:
            data["fit"] = fit.to_dict()
        print(json.dumps(data, indent=2))
    else:
        out = Console()
        if not out.is_terminal and "COLUMNS" not in os.environ:
            out = Console(width=160)  # piped: do not fold module paths at 80 columns
        source = {"local": "local directory", "builtin": "built-in config", "hub": "Hugging Face Hub"}[
            loaded.source.kind
        ]
        weights = {
            "meta": "meta device, no weights read",
            "random": "random weights",
            "pretrained": "weights loaded",
        }[loaded.weights]
        header = f"{name}: {type(model).__name__} ({source}, {weights})"
        render.render_report(out, report, header=header, all_sites=all_sites)
        if fit is not None:
            from .fit_view import render_fit

            render_fit(out, fit, dtype_name)
        if check is not None:
            out.print(render.verify_text(check))
        if output is not None and not failed:
            out.print(
                f"saved to {output} (with {manifest.MANIFEST_NAME}); reload patched with "
                f"[bold]actpatch.load_patched({str(output)!r})[/]",
                highlight=False,
            )
    if failed:
        message = "--verify: the patched model differs from the original beyond tolerance"
        print(error_line(message + ("; nothing saved" if output is not None else "")), file=sys.stderr)
        raise typer.Exit(EXIT_FAILURE)


def _load(name: str, dry_run: bool, dtype: Any, trust_remote_code: bool, random_init: bool) -> Any:
    """loading.load_model; random weights only where allowed (--output saves them: --random-init)."""
    from .. import loading

    try:
        return loading.load_model(
            name, dry_run=dry_run, dtype=dtype, trust_remote_code=trust_remote_code, random_init=random_init
        )
    except loading.MissingWeightsError as e:
        raise UsageProblem(f"{e}; --output would save random weights: pass --random-init for that") from e


@app.command("models")
def models(
    json_output: Annotated[bool, typer.Option("--json", help="Print the list as JSON.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show the traceback of an error.")] = False,
) -> None:
    """List the built-in offline configs (usable as MODEL with no network)."""
    with _errors(debug):
        from .. import configs

        rows = [configs.describe(n) for n in configs.available()]
        if json_output:
            print(json.dumps(rows, indent=2))
        else:
            Console().print(render.models_table(rows))


__all__ = ["app", "error_line", "exit_code_for"]
