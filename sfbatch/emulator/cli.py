"""``sfbatch emulator``: run the SiliconFlow emulator until Ctrl-C (or SIGTERM)."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path
from typing import Final, cast

from sfbatch.commands import Command, flag, given
from sfbatch.emulator.limits import Limits
from sfbatch.emulator.server import AccountBlock, Emulator, EmulatorConfig, FaultConfig

__all__ = ["COMMANDS", "config_from_args", "run"]

_FAULT_FLAGS = {
    "fault_503": "p_503",
    "fault_504": "p_504",
    "fault_500": "p_500",
    "fault_reset": "p_reset",
    "fault_echo_key": "p_echo_key",
    "fault_truncated": "p_truncated_image",
    "fault_stalled": "p_stalled_image",
    "fault_expired": "p_expired_url",
    "fault_not_image": "p_not_image",
}


def _named_limits(flag: str, text: str) -> tuple[str, Limits]:
    """``NAME:ipm=60,rpm=10`` → ``("NAME", Limits(ipm=60, rpm=10))``."""
    subject, colon, spec = text.rpartition(":")
    values: dict[str, int] = {}
    for part in spec.split(","):
        name, eq, number = part.partition("=")
        name = name.strip().lower()
        if not eq or name not in ("rpm", "ipm", "rpd", "ipd"):
            raise ValueError(f"{flag} {text!r}: expected NAME:rpm|ipm|rpd|ipd=N[,...]")
        try:
            values[name] = int(number)
        except ValueError:
            raise ValueError(f"{flag} {text!r}: {number!r} is not a whole number") from None
    if not colon or not subject:
        raise ValueError(f"{flag} {text!r}: expected NAME:rpm|ipm|rpd|ipd=N[,...]")
    return subject, Limits(**values)


def _faults_403(kinds: list[str]) -> tuple[AccountBlock | None, frozenset[str]]:
    """``--fault-403`` values → (account block, disabled models)."""
    block: AccountBlock | None = None
    disabled: set[str] = set()
    for kind in kinds:
        name, _, model = kind.partition(":")
        if name == "disabled" and model:
            disabled.add(model)
        elif name in ("balance", "verification") and not model:
            block = cast(AccountBlock, name)
        else:
            raise ValueError(
                f"--fault-403 {kind!r}: expected balance, verification or disabled:MODEL"
            )
    return block, frozenset(disabled)


def config_from_args(args: argparse.Namespace) -> EmulatorConfig:
    """The :class:`EmulatorConfig` the flags describe."""
    keys = args.key if args.key is not None else ["sk-emulator"]
    block, disabled = _faults_403(args.fault_403)
    faults = FaultConfig(
        seed=args.seed,
        stall_s=args.stall,
        **{field: getattr(args, flag) for flag, field in _FAULT_FLAGS.items()},
    )
    return EmulatorConfig(
        **given(args, _FLAGS),
        api_keys=frozenset(k for k in keys if k),
        model_limits=dict(_named_limits("--model-limit", text) for text in args.model_limit),
        key_limits=dict(_named_limits("--key-limit", text) for text in args.key_limit),
        offer=tuple(args.offer) if args.offer else None,
        account_block=block,
        disabled_models=disabled,
        image_px=args.image_px or None,
        faults=faults,
        seed=args.seed,
    )


async def _serve(config: EmulatorConfig) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with Emulator(config) as emulator:
        shown = emulator.api_key if config.api_keys else "any"
        print(f"sfbatch emulator listening on {emulator.base_url} (key: {shown})", flush=True)
        await stop.wait()


def run(args: argparse.Namespace) -> int:
    """run a local SiliconFlow API emulator

    Serve POST /v1/images/generations, GET /v1/models, image URLs, GET /_stats and
    POST /_control, with limits, latency and faults.
    """
    # Serve until Ctrl-C or SIGTERM; exit 0 then, 2 on a bad flag.
    try:
        config = config_from_args(args)
    except ValueError as exc:
        print(f"sfbatch emulator: {exc}", file=sys.stderr)
        return 2
    try:
        asyncio.run(_serve(config))
    except OSError as exc:
        print(
            f"sfbatch emulator: cannot listen on {config.host}:{config.port}: {exc.strerror}",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:  # pragma: no cover - only before the signal handler is set
        pass
    return 0


_FLAGS: Final = (
    flag("--host", "address to bind (default %(default)s)", field="host", default="127.0.0.1"),
    flag("--port", "port, 0 for any (default %(default)s)", field="port", type=int, default=8765),
    flag(
        "--key",
        "an accepted API key (repeatable; default sk-emulator); --key '' accepts any",
        action="append",
        metavar="KEY",
    ),
    flag("--rpm", "requests per minute per key and model", field="rpm", type=int),
    flag("--ipm", "images per minute per key and model", field="ipm", type=int),
    flag("--rpd", "requests per day per key and model", field="rpd", type=int),
    flag("--ipd", "images per day per key and model", field="ipd", type=int),
    flag(
        "--model-limit",
        "a model's own limits instead of --rpm/--ipm/--rpd/--ipd, e.g. "
        "'Qwen/Qwen-Image:ipm=60,rpm=10' (repeatable)",
        action="append",
        default=[],
        metavar="MODEL:LIMIT=N[,...]",
    ),
    flag(
        "--key-limit",
        "a key's own limits instead of --rpm/--ipm/--rpd/--ipd (a model's own still "
        "win), e.g. 'sk-b:ipd=100' (repeatable)",
        action="append",
        default=[],
        metavar="KEY:LIMIT=N[,...]",
    ),
    flag(
        "--profile",
        "offer this endpoint's model list (default %(default)s: today's .cn list)",
        field="profile",
        choices=("cn", "com"),
        default="cn",
    ),
    flag(
        "--offer",
        "offer exactly these models instead of the profile's list (repeatable)",
        action="append",
        metavar="MODEL",
    ),
    flag(
        "--no-models-list",
        "GET /v1/models answers 404, as an endpoint without the list",
        field="models_endpoint",
        action="store_false",
    ),
    flag(
        "--fault-403",
        "answer generations with a 403: balance, verification, or disabled:MODEL "
        "(30003 for that model; repeatable)",
        action="append",
        default=[],
        metavar="KIND[:MODEL]",
    ),
    flag(
        "--outage",
        "start in an outage: API connections are closed at once (POST /_control "
        '{"outage": false} ends it)',
        field="outage",
        action="store_true",
    ),
    flag(
        "--retry-after",
        "send Retry-After on 429: this many seconds, or 0 for the computed wait",
        field="retry_after_s",
        type=float,
        metavar="SECONDS",
    ),
    flag(
        "--day-utc-offset",
        "time zone of the IPD day (default UTC+%(default)s)",
        field="day_utc_offset_h",
        type=float,
        default=8.0,
        metavar="HOURS",
    ),
    flag(
        "--latency",
        "mean inference time",
        field="latency_s",
        type=float,
        default=0.0,
        metavar="SECONDS",
    ),
    flag(
        "--latency-jitter",
        "uniform ± jitter around --latency",
        field="latency_jitter_s",
        type=float,
        default=0.0,
        metavar="SECONDS",
    ),
    flag(
        "--image-px",
        "side of the square images served; 0 serves the requested size (default %(default)s)",
        type=int,
        default=64,
        metavar="PX",
    ),
    flag(
        "--url-ttl",
        "image URL lifetime",
        field="url_ttl_s",
        type=float,
        default=3600.0,
        metavar="SECONDS",
    ),
    *(
        flag(
            f"--fault-{name}",
            f"probability of the {name} fault",
            dest=dest,
            type=float,
            default=0.0,
            metavar="P",
        )
        for dest, name in ((d, d.removeprefix("fault_").replace("_", "-")) for d in _FAULT_FLAGS)
    ),
    flag("--stall", "stalled-image pause", type=float, default=30.0, metavar="SECONDS"),
    flag("--seed", "seed of server-picked seeds, latency, faults", type=int, default=0),
    flag(
        "--models-file", "TOML of extra or overriding model rules", field="models_file", type=Path
    ),
)

COMMANDS: Final = (Command("emulator", run, _FLAGS),)
