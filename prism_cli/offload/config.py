"""What an offloaded model is given: a device-memory budget, a cache policy, a link (SPEC 4.3).

Sizes are written with a unit: ``4GB`` (10^9 bytes, as the unit says), ``4GiB`` (2^30), ``512MB``,
``512MiB``, ``64kB``... A budget may also be relative to the model:

* ``45%``: the non-expert weights, the reserve and 45 % of the routed experts' bytes;
* ``16GB@deepseek-v2-lite``: the budget that caches the same fraction of the experts as 16 GB does for
  DeepSeek-V2-Lite (``shapes.py``), so that a small model can be studied at a real model's budget.

The **reserve** is device memory kept out of the expert cache for everything that is neither a weight
nor a cached expert (KV cache, activations, logits): ``5%`` of the budget unless given (an absolute size
works too). The link is ``BANDWIDTH[,LATENCY]`` (``25GB/s,2us``): the default is PCIe 4.0 x16 as
measured for pinned host-to-device copies (about 25 GB/s) and 2 microseconds per copy call: the copy
engine's setup between back-to-back copies queued on one stream (the host's launch of each copy, a
few microseconds more, overlaps the transfers queued before it). A sub-expert is two copies (its
gate/up rows and its down columns), as is a whole expert.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from prism_cli.errors import PrismError, split_items

_UNITS = {
    "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_SIZE = re.compile(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([kKmMgGtT][iI]?[bB]|[bB])\s*")
_TIME = {"s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}
DEFAULT_RESERVE = "5%"
#: The largest size accepted (2^63 - 1 bytes, what int64 metadata holds): a larger one is a typo, and an
#: infinite one (``1e400GB``) could not even become a byte count.
MAX_SIZE = 2**63 - 1


def parse_size(text: str | int, what: str = "size") -> int:
    """Bytes from ``4GB`` / ``4GiB`` / ``512MB`` (an int is bytes already)."""
    if isinstance(text, int):
        if text < 0:
            raise PrismError(f"{what} must not be negative, got {text}")
        if text > MAX_SIZE:
            raise PrismError(f"{what} {text} is too large: at most {MAX_SIZE} bytes")
        return text
    m = _SIZE.fullmatch(str(text))
    if not m:
        raise PrismError(f"cannot read the {what} {text!r}: give a size with a unit, e.g. 4GB, 4GiB or 512MB")
    if m.group(2)[0].isupper() and m.group(2).endswith("b"):  # 25Gb is gigabits (all lowercase, 2gb, reads as bytes)
        raise PrismError(f"the {what} {str(text).strip()!r} is in bits (lowercase b); give bytes, e.g. "
                         f"{m.group(1)}{m.group(2)[0].upper()}{m.group(2)[1:-1]}B")
    value = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if not math.isfinite(value) or value > MAX_SIZE:
        raise PrismError(f"{what} {str(text).strip()!r} is too large: at most {format_size(MAX_SIZE)}")
    return round(value)  # 4.1GB is 4,100,000,000 bytes (int() made it one less)


def format_size(n: float) -> str:
    """``1.5e9`` -> ``1.5 GB`` (SI, three significant digits)."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.0f} B"


def format_size_up(n: float) -> str:
    """``format_size`` rounded up, not to nearest: a minimum (``give at least ...``) printed at three
    significant digits is then never below what it stands for (15.26 MB -> ``15.3 MB``, 15.31 MB -> ``15.4 MB``),
    and the printed size, given back, is that many bytes."""
    nbytes = int(math.ceil(n))
    for scale in (10**12, 10**9, 10**6, 10**3):
        if nbytes >= scale:
            step = scale // 100  # the last printed digit of a value in [1, 10) of this unit...
            while nbytes >= step * 1000:  # ...of one in [10, 100) or [100, 1000)
                step *= 10
            return format_size(-(-nbytes // step) * step)
    return format_size(nbytes)


@dataclass(frozen=True)
class Budget:
    """A device-memory budget: absolute bytes, or a fraction of the routed experts to cache."""

    text: str
    nbytes: int | None = None
    expert_fraction: float | None = None  # "45%" or "16GB@shape": the cache holds this share of the experts

    def __str__(self) -> str:
        return self.text

    def label(self, nbytes: int) -> str:
        """``45% (1.2 MB)``: the budget as given and in bytes, the size once (a resolved budget's text has it)."""
        size = f"({format_size(nbytes)})"
        return self.text if self.text.endswith(size) else f"{self.text} {size}"


@dataclass(frozen=True)
class Reserve:
    """Device memory kept for the KV cache and activations: absolute, or a fraction of the budget."""

    nbytes: int | None = None
    fraction: float | None = None

    def of(self, budget_bytes: int) -> int:
        return self.nbytes if self.nbytes is not None else int(math.ceil(budget_bytes * (self.fraction or 0.0)))


def parse_reserve(text: str | int) -> Reserve:
    if isinstance(text, str) and text.strip().endswith("%"):
        frac = _percent(text, "--reserve")
        if frac >= 1:
            raise PrismError(f"--reserve {text} leaves nothing for the weights; give less than 100%")
        return Reserve(fraction=frac)
    return Reserve(nbytes=parse_size(text, "reserve"))


def _percent(text: str, what: str) -> float:
    try:
        value = float(text.strip()[:-1])
    except ValueError:
        raise PrismError(f"cannot read {what} {text!r}: give a percentage like 45%") from None
    if not 0 <= value <= 100:
        raise PrismError(f"{what} {text!r} must be between 0% and 100%")
    return value / 100


def parse_budget(text: str | int, reserve: Reserve | None = None) -> Budget:
    """``4GB`` / ``45%`` / ``16GB@deepseek-v2-lite`` (see the module docstring); ``reserve`` (default
    ``DEFAULT_RESERVE``) is what a ``SIZE@shape`` budget keeps out of the shape's cache, as the run will."""
    if isinstance(text, int):
        return Budget(str(text), nbytes=parse_size(text, "device memory"))
    spec = str(text).strip()
    if spec.endswith("%"):
        return Budget(spec, expert_fraction=_percent(spec, "--device-memory"))
    if "@" in spec:
        size, _, shape_name = spec.partition("@")
        from prism_cli.offload.shapes import SHAPES

        shape = SHAPES.get(shape_name.strip())
        nbytes = parse_size(size, "device memory")
        reserve = reserve or parse_reserve(DEFAULT_RESERVE)
        fraction = shape.cache_fraction(nbytes, reserve.fraction or 0.0, reserve.nbytes or 0)
        if fraction <= 0:
            need = shape.non_expert_bytes()
            raise PrismError(f"{size} leaves no room for experts at {shape.name}'s shapes (its non-expert weights alone are "
                             f"{format_size(need)})")
        return Budget(spec, expert_fraction=min(fraction, 1.0))
    nbytes = parse_size(spec, "device memory")
    if nbytes <= 0:
        raise PrismError(f"--device-memory must be positive, got {text!r}")
    return Budget(spec, nbytes=nbytes)


def parse_list(text: str, option: str, example: str) -> list[str]:
    """The items of a comma-separated option; an empty list or an empty item is refused."""
    items = split_items(text, option)
    if not items:
        raise PrismError(f"{option} needs at least one value, e.g. {example}")
    return items


def parse_budgets(text: str, reserve: Reserve | None = None) -> list[Budget]:
    """A comma-separated list of budgets (``16GB,24GB`` or ``30%,60%``)."""
    return [parse_budget(b, reserve) for b in parse_list(text, "--device-memory", "4GB or 30%,60%")]


@dataclass(frozen=True)
class LinkSpec:
    """The host-to-device link a simulated transfer is charged at: bytes/s and seconds per copy call."""

    bandwidth: float = 25e9
    latency: float = 2e-6

    def __str__(self) -> str:
        return f"{self.bandwidth / 1e9:g} GB/s, {self.latency * 1e6:g} us per copy"

    def seconds(self, nbytes: int, copies: int = 1) -> float:
        return copies * self.latency + nbytes / self.bandwidth


#: The longest latency per copy a link may have (one second: PCIe and NVLink take microseconds; a larger
#: value is a typo, and infinity made every timing NaN).
MAX_LINK_LATENCY_S = 1.0


def parse_link(text: str | None) -> LinkSpec:
    """``25GB/s,2us`` -> LinkSpec; the latency part is optional (default 2 us)."""
    if text is None:
        return LinkSpec()
    bw_text, _, lat_text = str(text).partition(",")
    m = re.fullmatch(r"\s*(.+?)\s*/\s*s\s*", bw_text)
    if not m:
        raise PrismError(f"cannot read the link {text!r}: give BANDWIDTH[,LATENCY], e.g. 25GB/s,5us")
    bandwidth = parse_size(m.group(1), "link bandwidth")
    latency = LinkSpec.latency
    if lat_text.strip():
        t = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*(s|ms|us|µs|ns)\s*", lat_text)
        if not t:
            raise PrismError(f"cannot read the link latency {lat_text.strip()!r}: give a time like 5us")
        latency = float(t.group(1)) * _TIME[t.group(2)]
        if not latency <= MAX_LINK_LATENCY_S:  # infinity gave NaN timings; a day per copy is no link
            raise PrismError(f"the link latency {lat_text.strip()!r} is too large: give at most {MAX_LINK_LATENCY_S:g} s per copy")
    if bandwidth <= 0:  # sizes are whole bytes: anything under 1 B/s reads as 0
        raise PrismError(f"the link bandwidth must be at least 1 B/s, got {text!r}")
    return LinkSpec(float(bandwidth), latency)


@dataclass
class OffloadConfig:
    """How to run a model whose routed experts live in host memory (``load_elastic(..., offload=...)``).

    ``device`` is where the non-expert weights and the cache live: ``cuda`` (real asynchronous copies
    from pinned host memory) or ``cpu`` (a *simulated* device: the same cache code, each copy charged
    at ``link``). ``pin`` is the share of the cache held by the sub-experts with the most activation
    mass (sub-expert 0 of every expert first: the partition orders them), never evicted.
    ``materialize`` (simulated device only) copies weights into a separate slot pool, as on a GPU;
    off by default, when cached sub-experts are read from their host copies in place (same results,
    no memcpy on the CPU, whose time would otherwise count as compute). ``stall_clock`` (simulated
    device only): the link's stalls advance its clock (``link.StallClock``) instead of holding the
    caller in real time; whoever times the model must then read ``controller.link.clock``.
    """

    device_memory: str | int | Budget
    policy: str = "lru"
    reserve: str | int = DEFAULT_RESERVE
    pin: float = 0.0
    link: str | LinkSpec | None = None
    device: str | None = None  # None: the device the model is loaded for (``load_elastic(device=...)``), else cpu
    materialize: bool = False
    stall_clock: bool = False
    budget: Budget = field(init=False)
    reserve_spec: Reserve = field(init=False)
    link_spec: LinkSpec = field(init=False)

    def __post_init__(self) -> None:
        from prism_cli.offload.cache import CACHE_POLICIES

        self.reserve_spec = parse_reserve(self.reserve)
        self.budget = (self.device_memory if isinstance(self.device_memory, Budget)
                       else parse_budget(self.device_memory, self.reserve_spec))
        self.link_spec = self.link if isinstance(self.link, LinkSpec) else parse_link(self.link)
        CACHE_POLICIES.get(self.policy)  # an unknown policy fails here, listing the known ones
        if not 0.0 <= self.pin < 1.0:
            raise PrismError(f"pin must be a fraction of the cache in [0, 1), got {self.pin}")

    @property
    def simulated(self) -> bool:
        return not (self.device or "cpu").startswith("cuda")

    def describe(self) -> str:
        link = f"simulated link {self.link_spec}" if self.simulated else "CUDA host-to-device copies"
        pin = f", {self.pin:.0%} pinned" if self.pin else ""
        return f"device memory {self.budget}, {self.policy} cache{pin}, {link}"


def offload_config(device_memory: str | None, cache_policy: str | None = None, **kwargs: object) -> OffloadConfig | None:
    """The config behind ``--device-memory`` / ``--cache-policy`` (None when no budget was given)."""
    if device_memory is None or str(device_memory).strip() == "":
        if cache_policy not in (None, "lru"):
            raise PrismError("--cache-policy needs --device-memory (the budget the cache lives in)")
        return None
    return OffloadConfig(device_memory, policy=cache_policy or "lru", **kwargs)
