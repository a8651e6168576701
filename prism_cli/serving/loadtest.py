"""``make load-test``: ``prism serve`` under load from a real HTTP client, written to results/.

Starts ``prism serve`` in a subprocess on a free loopback port, measures the rate it sustains (a
closed loop of ``max_running`` clients for ``--calibrate`` seconds), then offers Poisson load at that
rate and at twice it for ``--duration`` seconds each. Every request carries a quality floor from the
mix. Checks: every request gets exactly one answer (200 or 503; none lost: no timeout or dropped
connection; none duplicated: every response id is new), excess load is answered with 503, and the
server's resident memory stays flat (sampled every second).

    python -m prism_cli.serving.loadtest DIR --out results/load_test
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

from prism_cli.report import ResultTable


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _one(client: httpx.AsyncClient, url: str, body: dict, stats: dict[str, Any]) -> None:
    stats["sent"] += 1
    try:
        r = await client.post(url, json=body, timeout=600)
    except httpx.HTTPError as exc:
        stats["lost"] += 1
        stats.setdefault("errors", []).append(type(exc).__name__)
        return
    if r.status_code == 200:
        rid = r.json()["id"]
        stats["duplicated"] += rid in stats["ids"]
        stats["ids"].add(rid)
        stats["ok"] += 1
    elif r.status_code == 503:
        stats["rejected"] += 1
        stats["retry_after"] &= r.headers.get("Retry-After") is not None
    else:
        stats["other"] += 1


def _stats() -> dict[str, Any]:
    return {"sent": 0, "ok": 0, "rejected": 0, "lost": 0, "other": 0, "duplicated": 0, "ids": set(), "retry_after": True}


async def _closed_loop(url: str, bodies: list[dict], clients: int, seconds: float) -> float:
    stats = _stats()
    end = time.perf_counter() + seconds
    async with httpx.AsyncClient() as client:
        async def worker(i: int) -> None:
            while time.perf_counter() < end:
                await _one(client, url, bodies[(i * 7919 + stats["sent"]) % len(bodies)], stats)

        start = time.perf_counter()
        await asyncio.gather(*(worker(i) for i in range(clients)))
        return stats["ok"] / (time.perf_counter() - start)


async def _open_loop(url: str, bodies: list[dict], rate: float, seconds: float, proc: psutil.Process, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    stats = _stats()
    rss: list[float] = []
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=None, max_keepalive_connections=64)) as client:
        tasks = []
        start = time.perf_counter()
        next_sample = start
        t = rng.expovariate(rate)
        while t < seconds:
            now = time.perf_counter() - start
            if now < t:
                await asyncio.sleep(min(t - now, 0.05))
            else:
                tasks.append(asyncio.ensure_future(_one(client, url, bodies[len(tasks) % len(bodies)], stats)))
                t += rng.expovariate(rate)
            if time.perf_counter() >= next_sample:
                rss.append(proc.memory_info().rss / 2**20)
                next_sample += 1.0
        await asyncio.gather(*tasks)
        rss.append(proc.memory_info().rss / 2**20)
    stats.pop("ids")
    return {**stats, "rate": rate, "seconds": seconds, "rss_mib_first": rss[0], "rss_mib_last": rss[-1], "rss_mib_max": max(rss)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("directory")
    ap.add_argument("--policy", default="prism")
    ap.add_argument("--floors", default="linear:2=0.5,linear:6=0.3,linear:8=0.2")
    ap.add_argument("--duration", type=float, default=60.0)
    ap.add_argument("--calibrate", type=float, default=20.0)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-running", type=int, default=32)
    ap.add_argument("--max-queue", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("results/load_test"))
    args = ap.parse_args(argv)

    from prism_cli.data import load_text

    port = _free_port()
    cmd = [sys.executable, "-m", "prism_cli", "serve", args.directory, "--port", str(port), "--policy", args.policy,
           "--max-running", str(args.max_running), "--max-queue", str(args.max_queue), "--served-model-name", "m"]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "PRISM_API_KEY": ""})
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(base + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None:
                raise SystemExit(f"prism serve exited: {server.stderr.read().decode()[-500:]}")
            time.sleep(0.2)
        text, _ = load_text("builtin:eval", "eval")
        paras = [p.strip() for p in text.split("\n\n") if len(p.strip()) > 40]
        rng = random.Random(args.seed)
        floors = [(f.split("=")[0], float(f.split("=")[1])) for f in args.floors.split(",")]
        bodies = [{"model": "m", "prompt": p[:400], "max_tokens": args.max_tokens, "temperature": 0,
                   "quality_floor": rng.choices([f for f, _ in floors], [w for _, w in floors])[0]}
                  for p in rng.sample(paras, min(500, len(paras)))]
        url = base + "/v1/completions"
        proc = psutil.Process(server.pid)
        sustained = asyncio.run(_closed_loop(url, bodies, args.max_running, args.calibrate))
        if sustained <= 0:
            raise SystemExit(f"no request was served in the {args.calibrate:g} s calibration: nothing to offer load at "
                             "(a longer --calibrate, or a look at the server)")
        phases = [asyncio.run(_open_loop(url, bodies, rate, args.duration, proc, args.seed + i))
                  for i, rate in enumerate((sustained, 2 * sustained))]
    finally:
        server.terminate()
        code = server.wait(120)
    table = ResultTable(f"prism serve load test ({args.policy}, {args.floors})",
                        ["phase", "offered req/s", "sent", "200", "503", "lost", "duplicated", "other", "RSS MiB first", "RSS MiB last",
                         "RSS MiB max"])
    for name, p in zip(("sustained rate", "twice it"), phases, strict=True):
        table.add(name, p["rate"], p["sent"], p["ok"], p["rejected"], p["lost"], p["duplicated"], p["other"], p["rss_mib_first"],
                  p["rss_mib_last"], p["rss_mib_max"])
    table.notes.append(f"sustained rate measured by {args.max_running} closed-loop clients for {args.calibrate:g} s: "
                       f"{sustained:.3f} req/s; {args.duration:g} s per phase; server exit code after SIGTERM: {code}")
    table.save(args.out, extra={"phases": phases, "sustained": sustained, "exit_code": code, "command": " ".join(sys.argv)})
    print(table.markdown())


if __name__ == "__main__":
    main()
