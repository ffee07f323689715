"""One ``--option/--no-option`` flag per site kind with an option (:mod:`actpatch.kinds`), so a kind added
there needs no line here: ``@kind_options`` gives a command those flags, after its own, and passes their
values to it as one ``options`` dict (option -> bool), the flags standing where ``options`` stands."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Annotated, Any

import typer

from ..kinds import KINDS


def kind_options(command: Callable[..., Any]) -> Callable[..., Any]:
    flags = [
        inspect.Parameter(
            k.option,
            inspect.Parameter.KEYWORD_ONLY,
            default=k.default,
            annotation=Annotated[bool, typer.Option(f"--{k.option}/--no-{k.option}", help=k.help)],
        )
        for k in KINDS
        if k.option
    ]
    own = list(inspect.signature(command, eval_str=True).parameters.values())
    at = [p.name for p in own].index("options")

    @functools.wraps(command)
    def with_flags(*args: Any, **kwargs: Any) -> Any:
        options = {f.name: kwargs.pop(f.name, f.default) for f in flags}
        return command(*args, **kwargs, options=options)

    own = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) if p.default is not p.empty else p for p in own]
    params = own[:at] + flags + own[at + 1 :]
    with_flags.__signature__ = inspect.Signature(params)
    with_flags.__annotations__ = {p.name: p.annotation for p in params}
    return with_flags
