"""``litft serve``: the entry point whose signature is the command line."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Optional

if TYPE_CHECKING:
    from litft.generate.engine import Engine

API_KEY_ENV = "LITFT_API_KEY"
DEFAULT_MAX_REQUEST_BYTES = 4 * 2**20  # 4 MiB: ~1M tokens of text, more than any context served here needs
CPU_KV_CACHE_GIB = 1.0  # the KV cache's default size on the CPU
GPU_KV_CACHE_FRACTION = 0.5  # on a GPU: this share of the memory free once the model is loaded


def serve(
    checkpoint: Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: Optional[str] = None,
    model_name: Optional[str] = None,
    max_batch_size: int = 32,
    max_queue: int = 256,
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    max_seq_length: Optional[int] = None,
    kv_cache_memory: Optional[float] = None,
    quantize: Optional[str] = None,
    precision: Optional[str] = None,
    device: str = "auto",
    compile: bool = False,
    shutdown_timeout: float = 30.0,
    log_level: Literal["debug", "info", "warning", "error"] = "info",
) -> None:
    """Serve a checkpoint over an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, /v1/models)
    with continuous batching. The line "litft serve: ... on http://..." is printed once a request is served at
    once (model loaded, KV cache allocated, engine warmed up); /health answers 200 from then on, and requests
    sent earlier wait until then.

    Args:
        checkpoint: checkpoint folder (litft, Hugging Face, or a fine-tune run's final/).
        host: address to listen on; the default 127.0.0.1 is reachable from this machine only (0.0.0.0 = all).
        port: TCP port (0 = any free port; the address is printed when the server listens).
        api_key: require "Authorization: Bearer <key>" on every route but /health (/v1/*, /metrics, /docs and
            /openapi.json included); default: the LITFT_API_KEY environment variable (prefer it: command lines
            are visible to other users), else no key. /health answers without a key and shows only the status.
        model_name: the model name clients must send; default the checkpoint folder's name (no local path is
            ever shown to clients).
        max_batch_size: the most requests that decode together (rows of the KV cache, allocated at start), if
            --kv_cache_memory holds that many rows of --max_seq_length tokens (else as many as it holds; the ready
            line says how many). A decode step computes only the rows in use (rounded up to a power of two), so a
            large value costs a lone request no speed.
        max_queue: the most requests waiting for a free row; more get HTTP 503.
        max_request_bytes: the largest request body accepted (default 4 MiB); a larger one gets HTTP 413 before
            it is read.
        max_seq_length: longest prompt + completion per request (KV cache slots per row); default the model's
            context, or as many tokens as --kv_cache_memory holds when that is less.
        kv_cache_memory: GiB for the KV cache (in the model's dtype); default 1 GiB on the CPU, on a GPU half of
            the memory free once the model is loaded. It holds kv_cache_memory / (2 x layers x kv heads x head
            size x dtype bytes) tokens: e.g. 23,301 for SmolLM2-135M in float32 with the default 1 GiB, i.e. two
            requests of its whole 8,192-token context.
        quantize: quantized inference, e.g. bnb.nf4 or bnb.int8.
        precision: bf16-true, 16-true or 32-true; default bf16 on GPU, 32-true on CPU.
        device: auto, cpu, cuda or cuda:N.
        compile: compile the decode step with torch.compile (CUDA graphs on GPU).
        shutdown_timeout: on SIGTERM/Ctrl-C, seconds to let running requests finish; then they end with
            finish_reason "abort" and the process exits (status 0).
        log_level: uvicorn's log level (info logs every request).
    """
    import signal

    import uvicorn

    from litft.api import LLM
    from litft.serve.app import create_app

    if not 0 <= port <= 65535:
        raise ValueError(f"port={port} is invalid: expected 0..65535")
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size={max_batch_size} is invalid: expected an integer >= 1")
    if max_queue < 0:
        raise ValueError(f"max_queue={max_queue} is invalid: expected an integer >= 0")
    if kv_cache_memory is not None and not kv_cache_memory > 0:
        raise ValueError(f"kv_cache_memory={kv_cache_memory} is invalid: expected GiB > 0")
    if max_request_bytes < 1:
        raise ValueError(f"max_request_bytes={max_request_bytes} is invalid: expected an integer >= 1")
    if shutdown_timeout < 0:
        raise ValueError(f"shutdown_timeout={shutdown_timeout} is invalid: expected seconds >= 0")
    api_key = api_key or os.environ.get(API_KEY_ENV) or None
    sock = _listen(host, port)  # before loading: a busy port fails fast
    try:
        llm = LLM.load(checkpoint, device=device, precision=precision, quantize=quantize, compile=compile,
                       max_seq_length=max_seq_length)
        name = model_name or Path(checkpoint).resolve().name or "model"
        engine = llm.engine
        budget = _kv_cache_budget(engine, kv_cache_memory)
        if max_seq_length is None:  # the model's context, or what the budget holds when that is less
            engine.max_seq_length = max(2, min(engine.max_seq_length, budget // engine.kv_cache_bytes_per_token))
        rows = engine.kv_cache_rows(budget, max_batch_size)
        app = create_app(llm, name, api_key=api_key, max_batch_size=rows, max_queue=max_queue,
                         max_request_bytes=max_request_bytes)
        scheduler = app.state.scheduler
        cache_tokens = rows * engine.max_seq_length
        dtype = str(llm.model.embed.weight.dtype).removeprefix("torch.")
        fewer = (f" (fewer than --max_batch_size {max_batch_size}: lower --max_seq_length or raise --kv_cache_memory "
                 f"for more)" if rows < max_batch_size else "")

        class Server(uvicorn.Server):
            def handle_exit(self, sig: int, frame: object) -> None:
                # SIGTERM/SIGINT: uvicorn stops listening and waits for open requests; the scheduler ends what is
                # still generating after shutdown_timeout with finish_reason "abort" (a clean, truncated answer)
                scheduler.drain(shutdown_timeout)
                super().handle_exit(sig, frame)

            async def startup(self, sockets: Optional[list] = None) -> None:
                # the app's startup allocated the KV cache and warmed up: print the ready line once the server
                # accepts connections, i.e. when a request is served at once
                await super().startup(sockets=sockets)
                if self.started:
                    actual_host, actual_port = sock.getsockname()[:2]
                    shown = f"[{actual_host}]" if ":" in actual_host else actual_host
                    exposed = "" if _is_loopback(actual_host) else " (reachable from other machines)"
                    print(f"litft serve: {name} on http://{shown}:{actual_port}/v1{exposed}, {rows} concurrent "
                          f"requests of up to {engine.max_seq_length} tokens{fewer}, KV cache of {cache_tokens} "
                          f"tokens ({cache_tokens * engine.kv_cache_bytes_per_token / 2**30:.2f} GiB, {dtype}), "
                          f"device={llm.device}" + ("" if api_key else ", no API key"), file=sys.stderr, flush=True)

        # uvicorn's own timeout (cancel the request tasks outright) is only a backstop
        config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=shutdown_timeout + 10,
                                lifespan="on")
        server = Server(config)
        # uvicorn handles SIGTERM/SIGINT while it runs (drain, then shut down) and re-raises the signal once it has
        # stopped; answer that re-raise with a no-op so that a graceful stop exits with status 0
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: None)
        server.run(sockets=[sock])
    finally:
        sock.close()
    if not server.started:
        raise RuntimeError("the server failed to start (see the log above)")


def _kv_cache_budget(engine: "Engine", kv_cache_memory: Optional[float]) -> int:
    """Bytes for the KV cache: ``kv_cache_memory`` GiB, else the device's default (see :func:`serve`)."""
    import torch

    if kv_cache_memory is not None:
        return int(kv_cache_memory * 2**30)
    if engine.device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(engine.device)
        return int(free * GPU_KV_CACHE_FRACTION)
    return int(CPU_KV_CACHE_GIB * 2**30)


def _listen(host: str, port: int) -> "socket.socket":
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise ValueError(f"host={host!r} is invalid: {e}") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock


def _is_loopback(host: str) -> bool:
    import ipaddress

    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
