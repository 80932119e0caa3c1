"""``sfbatch emulator``: run the SiliconFlow emulator until Ctrl-C (or SIGTERM)."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, cast

from sfbatch.commands import add_command
from sfbatch.emulator.limits import Limits
from sfbatch.emulator.server import AccountBlock, Emulator, EmulatorConfig, FaultConfig

__all__ = ["config_from_args", "register", "run"]

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


@dataclass(frozen=True)
class _Flag:
    """A flag whose value is one :class:`EmulatorConfig` field, as given."""

    flag: str
    field: str
    type: Callable[[str], Any]
    default: Any
    help: str
    metavar: str | None = None


_AS_GIVEN: Final = (
    _Flag("--host", "host", str, "127.0.0.1", "address to bind (default %(default)s)"),
    _Flag("--port", "port", int, 8765, "port, 0 for any (default %(default)s)"),
    _Flag("--rpm", "rpm", int, None, "requests per minute per key and model"),
    _Flag("--ipm", "ipm", int, None, "images per minute per key and model"),
    _Flag("--rpd", "rpd", int, None, "requests per day per key and model"),
    _Flag("--ipd", "ipd", int, None, "images per day per key and model"),
    _Flag(
        "--retry-after",
        "retry_after_s",
        float,
        None,
        "send Retry-After on 429: this many seconds, or 0 for the computed wait",
        "SECONDS",
    ),
    _Flag(
        "--day-utc-offset",
        "day_utc_offset_h",
        float,
        8.0,
        "time zone of the IPD day (default UTC+%(default)s)",
        "HOURS",
    ),
    _Flag("--latency", "latency_s", float, 0.0, "mean inference time", "SECONDS"),
    _Flag(
        "--latency-jitter",
        "latency_jitter_s",
        float,
        0.0,
        "uniform ± jitter around --latency",
        "SECONDS",
    ),
    _Flag("--url-ttl", "url_ttl_s", float, 3600.0, "image URL lifetime", "SECONDS"),
    _Flag("--models-file", "models_file", Path, None, "TOML of extra or overriding model rules"),
)


def register(subparsers: Any) -> None:
    """Add the ``emulator`` subcommand to the ``sfbatch`` parser."""
    p = add_command(subparsers, "emulator", run)
    for f in _AS_GIVEN:
        p.add_argument(
            f.flag, dest=f.field, type=f.type, default=f.default, metavar=f.metavar, help=f.help
        )
    p.add_argument(
        "--key",
        action="append",
        metavar="KEY",
        help="an accepted API key (repeatable; default sk-emulator); --key '' accepts any",
    )
    p.add_argument(
        "--model-limit",
        action="append",
        default=[],
        metavar="MODEL:LIMIT=N[,...]",
        help="a model's own limits instead of --rpm/--ipm/--rpd/--ipd, e.g. "
        "'Qwen/Qwen-Image:ipm=60,rpm=10' (repeatable)",
    )
    p.add_argument(
        "--key-limit",
        action="append",
        default=[],
        metavar="KEY:LIMIT=N[,...]",
        help="a key's own limits instead of --rpm/--ipm/--rpd/--ipd (a model's own still "
        "win), e.g. 'sk-b:ipd=100' (repeatable)",
    )
    p.add_argument(
        "--profile",
        choices=("cn", "com"),
        default="cn",
        help="offer this endpoint's model list (default %(default)s: today's .cn list)",
    )
    p.add_argument(
        "--offer",
        action="append",
        metavar="MODEL",
        help="offer exactly these models instead of the profile's list (repeatable)",
    )
    p.add_argument(
        "--no-models-list",
        dest="models_endpoint",
        action="store_false",
        help="GET /v1/models answers 404, as an endpoint without the list",
    )
    p.add_argument(
        "--fault-403",
        action="append",
        default=[],
        metavar="KIND[:MODEL]",
        help="answer generations with a 403: balance, verification, or disabled:MODEL "
        "(30003 for that model; repeatable)",
    )
    p.add_argument(
        "--outage",
        action="store_true",
        help="start in an outage: API connections are closed at once (POST /_control "
        '{"outage": false} ends it)',
    )
    p.add_argument(
        "--image-px",
        type=int,
        default=64,
        metavar="PX",
        help="side of the square images served; 0 serves the requested size (default %(default)s)",
    )
    for flag in _FAULT_FLAGS:
        name = flag.removeprefix("fault_").replace("_", "-")
        p.add_argument(
            f"--fault-{name}",
            dest=flag,
            type=float,
            default=0.0,
            metavar="P",
            help=f"probability of the {name} fault",
        )
    p.add_argument(
        "--stall", type=float, default=30.0, metavar="SECONDS", help="stalled-image pause"
    )
    p.add_argument(
        "--seed", type=int, default=0, help="seed of server-picked seeds, latency, faults"
    )


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
        **{f.field: getattr(args, f.field) for f in _AS_GIVEN},
        api_keys=frozenset(k for k in keys if k),
        model_limits=dict(_named_limits("--model-limit", text) for text in args.model_limit),
        key_limits=dict(_named_limits("--key-limit", text) for text in args.key_limit),
        profile=args.profile,
        offer=tuple(args.offer) if args.offer else None,
        models_endpoint=args.models_endpoint,
        account_block=block,
        disabled_models=disabled,
        outage=args.outage,
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
