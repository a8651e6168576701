"""``prism serve``: an OpenAI-compatible HTTP server over an export, with per-request quality floors."""

from __future__ import annotations

import os
from pathlib import Path

import typer

from prism_cli.commands.common import CachePolicyOption, DeviceMemoryOption, check_seed
from prism_cli.console import console, err_console
from prism_cli.errors import PrismError

#: Finished requests and step records a server keeps (for inspection); its counters count them all.
SERVER_HISTORY = 1024


def serve(
    directory: str = typer.Argument(..., help="A prism export folder."),
    host: str = typer.Option("127.0.0.1", help="Address to bind (loopback by default; 0.0.0.0 exposes the server)."),
    port: int = typer.Option(8000, help="TCP port (0: any free port, printed at start)."),
    policy: str = typer.Option("prism", help="Scheduling policy: prism, fifo, fullbatch, static or mixed."),
    point: str = typer.Option(None, help="The static policy's point (default: the full model): requests without a quality_floor run at "
                              "it, floors above it are refused (400)."),
    api_key: str = typer.Option(None, "--api-key", help="Require 'Authorization: Bearer KEY' on /v1 (or set PRISM_API_KEY)."),
    served_model_name: str = typer.Option(None, "--served-model-name", help="Model name clients send (default: the folder name)."),
    max_batch: int = typer.Option(16, "--max-batch", help="Rows of one forward pass."),
    max_running: int = typer.Option(32, "--max-running", help="Requests holding a KV cache at once."),
    max_queue: int = typer.Option(64, "--max-queue", help="Requests waiting beyond those; more get 503 with Retry-After."),
    t_max: float = typer.Option(10.0, "--t-max", help="Seconds a request may wait before it forces a launch."),
    cost_model: Path = typer.Option(None, "--cost-model", help="Cost model JSON (default: DIR/prism/cost_model.json)."),
    seed: int = typer.Option(0, callback=check_seed, help="Seed of unseeded sampling."),
    device: str = typer.Option("cpu", help="cpu, cuda or cuda:N."),
    dtype: str = typer.Option("float32", help="float32, bfloat16 or float16."),
    device_memory: str = DeviceMemoryOption,
    cache_policy: str = CachePolicyOption,
) -> None:
    """Serve the export over HTTP (OpenAI API: /v1/completions, /v1/chat/completions, /v1/models; /health, /metrics)."""
    from prism_cli.offload.config import offload_config
    from prism_cli.runtime.elastic import read_export_meta
    from prism_cli.serving.costmodel import find_cost_model
    from prism_cli.serving.engine import Engine, Limits
    from prism_cli.serving.executor import ModelExecutor, load_served_model
    from prism_cli.serving.floors import Ladder, PointSpace
    from prism_cli.serving.policies import SCHEDULING_POLICIES
    from prism_cli.serving.server import API_KEY_ENV, ServerState, bind, is_loopback, serve_forever, url_of

    meta = read_export_meta(directory)
    for flag, value in (("--api-key", api_key), ("--served-model-name", served_model_name)):
        if value is not None and not value.strip():
            raise PrismError(f"{flag} is empty; leave it out for "
                             + ("no key" if flag == "--api-key" else "the folder name"))
    if point is not None and policy != "static":
        raise PrismError(f"--point is the static policy's point; the {policy} policy chooses its own: "
                         "leave --point out or use --policy static")
    static_point = None
    if point is not None:  # before the model loads
        try:
            static_point = PointSpace.of_export(meta).parse(point)
        except PrismError as exc:
            raise PrismError(f"--point {point}: {exc}") from None
    if not 0 <= port <= 65535:
        raise PrismError(f"--port must be between 0 and 65535, got {port}")
    if max_queue < 0:
        raise PrismError(f"--max-queue must be >= 0, got {max_queue}")
    limits = Limits(max_batch, max_running, t_max)
    limits.validate()
    offload = offload_config(device_memory, cache_policy, device=device)
    cls = SCHEDULING_POLICIES.get(policy)
    model = find_cost_model(directory, cost_model)
    if cls.plans_with_costs and model is None:
        raise PrismError(f"the {policy} policy plans with a cost model and {directory} has none: build it with "
                         "`prism schedule cost-model`, pass --cost-model, or serve with --policy fifo")
    full = PointSpace.of_export(meta).full()
    if cls.plans_with_costs and not model.has(full):  # a request without a floor runs the full model
        raise PrismError(f"the cost model has no timing of the full model ({full}), which requests without a "
                         "quality_floor run: bench it and rebuild the cost model")
    if api_key is None and os.environ.get(API_KEY_ENV) == "":  # set but empty: refused as --api-key "" is
        raise PrismError(f"{API_KEY_ENV} is set but empty; unset it for no key")
    key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)
    if key is not None and (key != key.strip() or not all(" " <= c <= "~" for c in key)):
        # Header values arrive as Latin-1 bytes with the ends stripped: such a key could never be sent right.
        raise PrismError(f"the API key ({'--api-key' if api_key else API_KEY_ENV}) must be printable ASCII with no "
                         "space at either end: an HTTP header cannot carry it as it is")
    sock = bind(host, port)  # before loading the model: a port in use fails at once
    served = load_served_model(directory, dtype=dtype, device=device, offload=offload)
    ladder = Ladder(served.space, model, max_batch)
    instance = cls(static_point or served.space.full()) if policy == "static" else cls()
    engine = Engine(ModelExecutor(served, seed=seed), instance, ladder, limits, model, history=SERVER_HISTORY)
    state = ServerState(engine, served.tokenizer, served.space, ladder, model, served_model_name or Path(directory).resolve().name,
                        served.context, key, max_queue, getattr(served.tokenizer, "chat_template", None))
    bound = sock.getsockname()
    if key is None and not is_loopback(bound[0]):
        err_console.print(f"warning: {url_of(bound)} is reachable from the network without authentication "
                          f"(set --api-key or {API_KEY_ENV})", highlight=False, soft_wrap=True)
    console.print(f"prism serve: {state.model_name} on {url_of(bound)} (policy {policy}"
                  f"{', API key required' if key else ''}); Ctrl-C or SIGTERM drains and stops", highlight=False,
                  soft_wrap=True)
    serve_forever(state, sock)
