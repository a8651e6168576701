"""The cost model of SPEC 4.1: the latency of a forward step by operating point and batch size.

It is read from two ``prism bench`` runs on one export (``--mode decode``: one new token per sequence
over a KV cache of ``--seq-len``; ``--mode prefill``: whole prompts of ``--seq-len`` tokens), and keeps,
per operating point, the median step time at every measured batch and the point's held-out perplexity.
Between measured batches the time is interpolated linearly; beyond them it is extrapolated along the
first or last measured segment (a step has a fixed part and a part that grows with the batch), never to
less per row than the nearest measurement (``interpolate``). Prefill is
indexed by prompt tokens (batch x seq-len), so a batch of prompts of any lengths is priced by its total.

Optionally (``engine``) it also holds what the serving executor itself costs by cache width: decode
steps over padded, growing caches and the KV copies as rows join and leave (``calibrate.py``); the
simulator charges those where they are present.

Saved as JSON, with the export (``DIR/prism/cost_model.json``) or anywhere (``--cost-model FILE``).
"""

from __future__ import annotations

import bisect
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from prism_cli.errors import PrismError
from prism_cli.io import read_json, write_json
from prism_cli.operating_points import OperatingPoint

#: Where a cost model is saved inside an export (next to the gate neurons).
COST_MODEL_FILE = "prism/cost_model.json"
FORMAT = "prism-cost-model"
FORMAT_VERSION = 1
#: The longest time a cost model may give one step or copy (ms; about 11.6 days). Longer is no measurement, and
#: the simulator's sums of such times overflow to infinity and NaN (every time 1e308 gave NaN metrics).
MAX_MS = 1e9


def interpolate(table: dict[int, float], x: float) -> float:
    """Piecewise-linear ``table[x]`` over the measured keys, extended along the first/last segment.

    Outside the keys the extension is bounded by what a step costs: below the first key no less per unit
    than there (fewer rows, tokens or columns never make each one cheaper, so ``C(x) >= C(k0) x / k0``,
    which stays positive where the first segment would reach 0 ms); above the last key no less than there.
    """
    keys = sorted(table)
    if len(keys) == 1:
        return table[keys[0]] * x / keys[0]  # one measurement: proportional (all cost grows with x)
    i = min(max(bisect.bisect_left(keys, x), 1), len(keys) - 1)
    x0, x1 = keys[i - 1], keys[i]
    y0, y1 = table[x0], table[x1]
    y = y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    if x < keys[0]:
        return max(y, table[keys[0]] * x / keys[0])
    if x > keys[-1]:
        return max(y, table[keys[-1]])
    return y


def _table_problem(table: dict[int, Any], needed: bool, positive: bool) -> str | None:
    """What is wrong with a table of milliseconds by batch, tokens or width (nested: by width, then rows),
    or None: a needed table has entries, keys start at 1, times are finite and > 0 (``positive``) or >= 0, and
    at most ``MAX_MS``."""
    if needed and not table:
        return " is empty"
    for key, value in table.items():
        if key < 1:
            return f" has key {key} (batches, tokens and widths start at 1)"
        if isinstance(value, dict):
            inner = _table_problem(value, needed, positive)
            if inner:
                return f"[{key}]{inner}"
        elif not (math.isfinite(value) and (value > 0 if positive else value >= 0) and value <= MAX_MS):
            return f"[{key}] is {value:g} ms (a time must be finite, {'> 0' if positive else '>= 0'} and at most {MAX_MS:g})"
    return None


def _bilinear(table: dict[int, dict[int, float]], width: float, rows: float) -> float:
    """``table[width][rows]``: linear in rows at each measured width, then linear in width."""
    return interpolate({w: interpolate(by_rows, rows) for w, by_rows in table.items()}, width)


@dataclass
class EngineCosts:
    """Milliseconds by cache width (columns, padding included) and rows, as the serving executor ran them
    (measured by ``prism_cli.serving.calibrate``)."""

    decode_ms: dict[str, dict[int, dict[int, float]]]  # point -> width -> rows -> one decode step
    prefill_ms: dict[str, dict[int, dict[int, float]]]  # point -> width -> rows -> prefilling prompts padded to width
    join_ms: dict[int, dict[int, float]]  # width -> rows after the join -> joining one new row
    keep_ms: dict[int, dict[int, float]]  # width -> rows before -> dropping one row (and trimming padding)
    #: The engine's own time per forward pass outside it and its KV copies: sampling, scheduling, each row's
    #: bookkeeping and the inputs of the next step (``calibrate.measure_step_overhead``); 0 where not measured.
    step_overhead_ms: float = 0.0

    def decode(self, point: OperatingPoint | str, rows: int, width: int) -> float | None:
        table = self.decode_ms.get(str(point))
        return None if table is None else _bilinear(table, width, rows)

    def prefill(self, point: OperatingPoint | str, rows: int, width: int) -> float | None:
        table = self.prefill_ms.get(str(point))
        return None if table is None else _bilinear(table, width, rows)

    def join(self, rows: int, width: int) -> float:
        return _bilinear(self.join_ms, width, rows)

    def keep(self, rows: int, width: int) -> float:
        return _bilinear(self.keep_ms, width, rows)

    def to_json(self) -> dict[str, Any]:
        def nested(t: dict[int, dict[int, float]]) -> dict[str, dict[str, float]]:
            return {str(w): {str(r): v for r, v in by.items()} for w, by in t.items()}

        return {"decode_ms": {p: nested(t) for p, t in self.decode_ms.items()},
                "prefill_ms": {p: nested(t) for p, t in self.prefill_ms.items()},
                "join_ms": nested(self.join_ms), "keep_ms": nested(self.keep_ms), "step_overhead_ms": self.step_overhead_ms}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> EngineCosts:
        def nested(t: dict[str, dict[str, float]]) -> dict[int, dict[int, float]]:
            return {int(w): {int(r): float(v) for r, v in by.items()} for w, by in t.items()}

        around = float(data.get("step_overhead_ms", 0.0))
        if not (math.isfinite(around) and 0.0 <= around <= MAX_MS):  # a negative or NaN time would run the simulator's clock backwards
            raise ValueError(f"step_overhead_ms must be a finite time >= 0 and at most {MAX_MS:g}, got {around}")
        return cls({p: nested(t) for p, t in data["decode_ms"].items()}, {p: nested(t) for p, t in data["prefill_ms"].items()},
                   nested(data["join_ms"]), nested(data["keep_ms"]), around)


@dataclass
class PointCost:
    point: str
    kind: str  # "elastic" or "original"
    perplexity: float | None
    decode_ms: dict[int, float]  # batch -> median ms of a decode step
    prefill_ms: dict[int, float]  # prompt tokens -> median ms of a prefill


@dataclass
class CostModel:
    points: dict[str, PointCost]
    decode_seq_len: int
    prefill_seq_len: int
    machine: str
    sources: dict[str, str] = field(default_factory=dict)
    #: The serving executor's own decode and KV-copy costs by cache width (``EngineCosts``), when measured.
    engine: EngineCosts | None = None

    def has(self, point: OperatingPoint | str) -> bool:
        return str(point) in self.points

    def _get(self, point: OperatingPoint | str) -> PointCost:
        try:
            return self.points[str(point)]
        except KeyError:
            raise PrismError(f"the cost model has no timing of {point}; bench it (prism bench --points ...) and rebuild "
                             "the cost model") from None

    def decode(self, point: OperatingPoint | str, batch: int) -> float:
        """Milliseconds of one decode step of ``batch`` sequences at ``point``."""
        return interpolate(self._get(point).decode_ms, batch) if batch > 0 else 0.0

    def prefill(self, point: OperatingPoint | str, tokens: int) -> float:
        """Milliseconds of prefilling prompts of ``tokens`` tokens in all at ``point``."""
        return interpolate(self._get(point).prefill_ms, tokens) if tokens > 0 else 0.0

    def decode_mixed(self, points: list[OperatingPoint | str]) -> float:
        """A batch whose rows run at their own points: each row pays its point's share of a batch of that size.

        An approximation (no bench times a mixed batch): the mean of the uniform-batch costs over the rows.
        """
        n = len(points)
        return sum(self.decode(p, n) for p in points) / n if n else 0.0

    def prefill_mixed(self, points: list[OperatingPoint | str], tokens: list[int]) -> float:
        total = sum(tokens)
        return sum(self.prefill(p, total) * t for p, t in zip(points, tokens, strict=True)) / total if total else 0.0

    def perplexity(self, point: OperatingPoint | str) -> float | None:
        return self._get(point).perplexity

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["engine"] = self.engine.to_json() if self.engine is not None else None
        return {"format": FORMAT, "format_version": FORMAT_VERSION, **data}

    def save(self, path: Path) -> None:
        write_json(Path(path), self.to_json())

    @classmethod
    def load(cls, path: Path) -> CostModel:
        path = Path(path)
        data = read_json(path, "cost model", f"cost model {path} does not exist")
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise PrismError(f"{path} is not a prism cost model (build one with `prism schedule cost-model`)")
        if data.get("format_version") != FORMAT_VERSION:
            raise PrismError(f"{path} has cost-model version {data.get('format_version')}; this prism reads {FORMAT_VERSION}")
        try:
            points = {
                name: PointCost(p["point"], p["kind"], p["perplexity"], {int(b): float(v) for b, v in p["decode_ms"].items()},
                                {int(t): float(v) for t, v in p["prefill_ms"].items()})
                for name, p in data["points"].items()
            }
            engine = EngineCosts.from_json(data["engine"]) if data.get("engine") else None
            if not isinstance(data["machine"], str):
                raise TypeError(f"machine is {data['machine']!r}, not a name")
            model = cls(points, int(data["decode_seq_len"]), int(data["prefill_seq_len"]), data["machine"],
                        dict(data.get("sources", {})), engine)
        except KeyError as exc:
            raise PrismError(f"cost model {path} is malformed: it has no {exc} field; rebuild it") from None
        except (TypeError, ValueError, AttributeError) as exc:
            raise PrismError(f"cost model {path} is malformed ({type(exc).__name__}: {exc}); rebuild it") from None
        problem = model.problem()
        if problem:
            raise PrismError(f"cost model {path}: {problem}; rebuild it")
        return model

    def problem(self) -> str | None:
        """The first entry that cannot be used (its timings: see ``_table_problem``; its name, kind or
        perplexity), or None."""
        for name, p in self.points.items():
            if p.point != name:
                return f"points.{name} says it is {p.point!r}"
            if p.kind not in ("elastic", "original"):
                return f"points.{name}.kind is {p.kind!r} (elastic or original)"
            ppl = p.perplexity
            if ppl is not None and (isinstance(ppl, bool) or not isinstance(ppl, (int, float)) or not (math.isfinite(ppl) and ppl > 0)):
                return f"points.{name}.perplexity is {ppl!r} (a finite number > 0, or null where not measured)"
        for what, n in (("decode_seq_len", self.decode_seq_len), ("prefill_seq_len", self.prefill_seq_len)):
            if n < 1:
                return f"{what} is {n} (tokens, at least 1)"
        named = [(f"points.{name}.{kind}", getattr(p, kind), True, True)
                 for name, p in self.points.items() for kind in ("decode_ms", "prefill_ms")]
        if self.engine is not None:
            e = self.engine
            named += [(f"engine.{kind}.{point}", t, True, False)
                      for kind, by_point in (("decode_ms", e.decode_ms), ("prefill_ms", e.prefill_ms)) for point, t in by_point.items()]
            named += [("engine.join_ms", e.join_ms, False, False), ("engine.keep_ms", e.keep_ms, False, False)]
        for entry, table, needed, positive in named:
            problem = _table_problem(table, needed, positive)
            if problem:
                return f"{entry}{problem}"
        return None

    @classmethod
    def from_bench(cls, decode_json: Path, prefill_json: Path, directory: str | Path | None = None) -> CostModel:
        """Build from the ``bench.json`` of a ``--mode decode`` and of a ``--mode prefill`` run of one export;
        with ``directory``, both must have been measured on that export (``check_bench_export``)."""
        decode, prefill = _read_bench(decode_json, "decode"), _read_bench(prefill_json, "prefill")
        if directory is not None:
            for data, path in ((decode, decode_json), (prefill, prefill_json)):
                check_bench_export(data, path, directory)
        elif decode.get("target") != prefill.get("target"):
            raise PrismError(f"{decode_json} benchmarks {decode.get('target')} but {prefill_json} benchmarks "
                             f"{prefill.get('target')}: bench one export in both modes")
        prefill_points = {p["point"]: p for p in prefill["points"]}
        seq_len = int(prefill["settings"]["seq_len"])
        points: dict[str, PointCost] = {}
        for p in decode["points"]:
            if p["point"] not in prefill_points:
                continue
            q = prefill_points[p["point"]]
            points[p["point"]] = PointCost(
                p["point"], p["kind"], p.get("perplexity"),
                {int(b): float(lat["median_ms"]) for b, lat in p["latency"].items()},
                {int(b) * seq_len: float(lat["median_ms"]) for b, lat in q["latency"].items()},
            )
        if not points:
            raise PrismError(f"{decode_json} and {prefill_json} share no operating point")
        from prism_cli.environment import machine_label

        env = decode.get("environment") or {}
        machine = machine_label(env) if "gpu" in env or "processor" in env else "unknown machine"
        return cls(points, int(decode["settings"]["seq_len"]), seq_len, machine,
                   {"decode": str(decode_json), "prefill": str(prefill_json)})


def _read_bench(path: Path, mode: str) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        path = path / "bench.json"
    data = read_json(path, "bench results", f"{path} does not exist (give the bench.json of `prism bench --mode {mode}`)")
    try:
        got = data["settings"]["mode"]
        data["points"][0]["latency"]
    except (KeyError, IndexError, TypeError):
        raise PrismError(f"{path} is not the bench.json of a `prism bench` run with latency") from None
    if got != mode:
        raise PrismError(f"{path} was measured with --mode {got}; the {mode} costs need a `prism bench --mode {mode}` run")
    return data


def check_bench_export(bench: dict[str, Any], path: str | Path, directory: str | Path) -> None:
    """Refuse a bench that was not measured on the export at ``directory``.

    A bench records the folder it measured (``target``, as it was given). Where that folder exists it
    must be ``directory`` or a copy of it (the same ``prism`` section in its config.json). Where it does
    not (moved, or given relative to another folder), what the bench records of the export must fit it:
    every elastic point must be a point of the export (its policies, N and top-k), and ``original:k``
    counts N*k active sub-experts, which gives the bench's N."""
    from prism_cli.operating_points import parse_operating_point
    from prism_cli.runtime.elastic import export_meta

    meta = export_meta(directory)
    if meta is None:
        return  # not an export: the caller refuses it
    target = bench.get("target")
    where = f"{path} was measured on {target}, not on {directory}"
    recorded = Path(str(target)) if target else None
    if recorded is not None and recorded.is_dir():
        if recorded.resolve() == Path(directory).resolve():
            return
        if export_meta(recorded) != meta:
            raise PrismError(f"{where}: bench this export (prism bench {directory} --mode "
                             f"{bench['settings']['mode']}) and build its cost model from that")
        return  # a copy of this export
    n_sub, top_k, gate = int(meta["sub_experts"]), int(meta["source"]["top_k"]), meta.get("gate")
    points = [p for p in bench.get("points") or [] if isinstance(p, dict)]
    for p in points:  # original:k counts N*k active sub-experts: the bench's N
        name, active = str(p.get("point")), p.get("active")
        policy, _, raw = name.partition(":")
        if p.get("kind") != "original" or policy != "original" or not raw.isdigit() or int(raw) < 1:
            continue
        if isinstance(active, int | float) and not math.isclose(float(active), n_sub * int(raw)):
            raise PrismError(f"{where} (its {name} counts {active:g} active sub-experts: N={active / int(raw):g}; {directory} "
                             f"has N={n_sub}): bench this export and build its cost model from that")
    for p in points:
        name = str(p.get("point"))
        if p.get("kind") != "elastic":
            continue
        try:
            parse_operating_point(name, gate, n_sub, top_k)
        except PrismError:
            raise PrismError(f"{where} (its point {name} is not a point of {directory}: N={n_sub}, top-{top_k}, "
                             f"{gate} gate): bench this export and build its cost model from that") from None


def find_cost_model(directory: str | Path, explicit: str | Path | None) -> CostModel | None:
    """``explicit`` if given, else the one saved with the export, else None."""
    if explicit is not None:
        return CostModel.load(Path(explicit))
    saved = Path(directory) / COST_MODEL_FILE
    return CostModel.load(saved) if saved.exists() else None
