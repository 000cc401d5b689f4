"""`qwenstack bench`'s flags turned into what a run needs: targets, load levels, checked values.

Kept out of the command line module so that the CLI only maps flags to this, and so the rules
(what a sweep looks like, how a base URL is normalised) sit beside the load generator they feed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

from qwenstack.bench.loadgen import Api, Load, Target


class OptionError(ValueError):
    """A flag value a run cannot use; `flag` names the flag when the message is about one."""

    def __init__(self, message: str, flag: str | None = None) -> None:
        super().__init__(message)
        self.flag = flag


@dataclass(frozen=True)
class RunOptions:
    """The raw flag values, as given."""

    url: str
    compare: str | None = None
    name: str | None = None
    compare_name: str | None = None
    api: str = "chat"
    concurrency: str | None = None
    rate: str | None = None
    max_concurrency: int | None = None
    num_prompts: int = 32
    rounds: int = 1
    warmup: int = 2
    timeout: float = 600.0
    header: tuple[str, ...] = ()
    api_key: str | None = None


@dataclass(frozen=True)
class RunConfig:
    targets: list[Target]  # the first, then --compare's
    loads: list[Load]
    api: Api
    by_rate: bool  # the sweep is over request rates rather than concurrency

    @property
    def load_label(self) -> str:
        return "request rate (req/s)" if self.by_rate else "concurrency"


def numbers(text: str | None, flag: str, kind: type[int | float]) -> list[float]:
    """A comma-separated sweep, e.g. `1,8,32`; `inf` allowed for rates."""
    if text is None:
        return []
    try:
        values: list[float] = [kind(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise OptionError(f"{text!r}: give numbers separated by commas", flag) from None
    if not values or any(v <= 0 for v in values):
        raise OptionError("give one or more numbers above 0", flag)
    return values


def target(url: str, name: str | None, headers: dict[str, str]) -> Target:
    if not url.startswith(("http://", "https://")):
        raise OptionError(f"{url!r}: give a base URL such as http://127.0.0.1:8000")
    url = url.rstrip("/").removesuffix("/v1")
    return Target(name or url.split("://", 1)[1], url, headers)


def _headers(header: tuple[str, ...], api_key: str | None) -> dict[str, str]:
    headers = {}
    for item in header:
        key, sep, value = item.partition(":")
        if not sep or not key.strip():
            raise OptionError(f"{item!r}: write it as 'name: value'", "--header")
        headers[key.strip()] = value.strip()
    if api_key:
        headers["authorization"] = f"Bearer {api_key}"
    return headers


def run_config(options: RunOptions) -> RunConfig:
    """Check the flags, in the order a user reads them, and build targets and load levels."""
    if options.api not in ("chat", "completions"):
        raise OptionError("use chat or completions", "--api")
    if options.concurrency and options.rate:
        raise OptionError("give --concurrency or --rate, not both")
    for flag, value in (("--num-prompts", options.num_prompts), ("--rounds", options.rounds),
                        ("--timeout", options.timeout)):
        if value <= 0:
            raise OptionError("must be above 0", flag)
    if options.warmup < 0:
        raise OptionError("must be 0 or more", "--warmup")
    headers = _headers(options.header, options.api_key)
    targets = [target(options.url, options.name, headers)]
    if options.compare:
        targets.append(target(options.compare, options.compare_name, headers))
    if len({t.name for t in targets}) < len(targets):
        raise OptionError("the two targets need different --name and --compare-name")
    if options.rate:
        loads = [Load(rate=r, max_concurrency=options.max_concurrency)
                 for r in numbers(options.rate, "--rate", float)]
    else:
        loads = [Load(concurrency=int(c))
                 for c in numbers(options.concurrency or "1", "--concurrency", int)]
    return RunConfig(targets, loads, cast(Api, options.api), by_rate=bool(options.rate))
