"""``litft serve``: the entry point whose signature is the command line."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path
from typing import Literal, Optional

API_KEY_ENV = "LITFT_API_KEY"
DEFAULT_MAX_REQUEST_BYTES = 4 * 2**20  # 4 MiB: ~1M tokens of text, more than any context served here needs


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
    quantize: Optional[str] = None,
    precision: Optional[str] = None,
    device: str = "auto",
    compile: bool = False,
    shutdown_timeout: float = 30.0,
    log_level: Literal["debug", "info", "warning", "error"] = "info",
) -> None:
    """Serve a checkpoint over an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, /v1/models)
    with continuous batching.

    Args:
        checkpoint: checkpoint folder (litft, Hugging Face, or a fine-tune run's final/).
        host: address to listen on; the default 127.0.0.1 is reachable from this machine only (0.0.0.0 = all).
        port: TCP port (0 = any free port; the address is printed when the server listens).
        api_key: require "Authorization: Bearer <key>" on every route but /health (/v1/*, /metrics, /docs and
            /openapi.json included); default: the LITFT_API_KEY environment variable (prefer it: command lines
            are visible to other users), else no key. /health answers without a key and shows only the status.
        model_name: the model name clients must send; default the checkpoint folder's name (no local path is
            ever shown to clients).
        max_batch_size: the most requests that decode together (rows of the KV cache, allocated at start). A
            decode step computes only the rows in use (rounded up to a power of two), so a large value costs a lone
            request no speed, only memory.
        max_queue: the most requests waiting for a free row; more get HTTP 503.
        max_request_bytes: the largest request body accepted (default 4 MiB); a larger one gets HTTP 413 before
            it is read.
        max_seq_length: longest prompt + completion per request (KV cache slots per row); default the model's
            context.
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
        app = create_app(llm, name, api_key=api_key, max_batch_size=max_batch_size, max_queue=max_queue,
                         max_request_bytes=max_request_bytes)
        scheduler = app.state.scheduler

        class Server(uvicorn.Server):
            def handle_exit(self, sig: int, frame: object) -> None:
                # SIGTERM/SIGINT: uvicorn stops listening and waits for open requests; the scheduler ends what is
                # still generating after shutdown_timeout with finish_reason "abort" (a clean, truncated answer)
                scheduler.drain(shutdown_timeout)
                super().handle_exit(sig, frame)

        # uvicorn's own timeout (cancel the request tasks outright) is only a backstop
        config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=shutdown_timeout + 10,
                                lifespan="on")
        server = Server(config)
        actual_host, actual_port = sock.getsockname()[:2]
        shown = f"[{actual_host}]" if ":" in actual_host else actual_host
        exposed = "" if _is_loopback(actual_host) else " (reachable from other machines)"
        print(f"litft serve: {name} on http://{shown}:{actual_port}/v1{exposed}, max_batch_size={max_batch_size}, "
              f"max_seq_length={llm.engine.max_seq_length}, device={llm.device}"
              + ("" if api_key else ", no API key"), file=sys.stderr, flush=True)
        # uvicorn handles SIGTERM/SIGINT while it runs (drain, then shut down) and re-raises the signal once it has
        # stopped; answer that re-raise with a no-op so that a graceful stop exits with status 0
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: None)
        server.run(sockets=[sock])
    finally:
        sock.close()
    if not server.started:
        raise RuntimeError("the server failed to start (see the log above)")


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
