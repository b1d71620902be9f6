"""Throughput of ``litft serve`` at 1, 8 and 32 concurrent clients, against a one-request-at-a-time baseline.

Starts the real server twice in the same run (``--max_batch_size 32``, then ``--max_batch_size 1`` = requests
served one after another), drives each with N client threads that send ``--requests_per_client`` completions
one after the other (greedy, ``ignore_eos``, so every request makes exactly ``--max_tokens`` tokens), and
prints generated tokens/s (sum of ``usage.completion_tokens`` / wall time), median latency and the speed-up,
as a Markdown table ready for ``bench/RESULTS.md``.

    python bench/serve_throughput.py --quick                         # CPU, the tiny model shipped with litft
    python bench/serve_throughput.py --checkpoint checkpoints/meta-llama/Llama-3.2-1B --device cuda
"""

from __future__ import annotations

import argparse
import datetime
import http.client
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "litft" / "assets" / "tiny" / "base"
HOST = "127.0.0.1"
MODEL = "bench"

TEXT = (
    "The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step. "
    "Return the number of items in the container. If the argument is a string, it is parsed as a decimal "
    "number. This function is called when the object is about to be destroyed. Raise an error if the file "
    "cannot be opened, and close it when the block ends. The default value is used when no other is given. "
)


class Server:
    """``python -m litft serve`` in a subprocess on a free loopback port."""

    def __init__(self, checkpoint: Path, max_batch_size: int, args: argparse.Namespace) -> None:
        cmd = [sys.executable, "-m", "litft", "serve", str(checkpoint), "--port", "0", "--model_name", MODEL,
               "--max_batch_size", str(max_batch_size), "--max_queue", "1024", "--log_level", "warning",
               "--device", args.device]
        for flag in ("precision", "max_seq_length", "quantize"):
            if getattr(args, flag) is not None:
                cmd += [f"--{flag}", str(getattr(args, flag))]
        if args.compile:
            cmd += ["--compile", "true"]
        env = {**os.environ, "LITFT_API_KEY": ""}
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                                     env=env)
        self.lines: list[str] = []
        self.port: Optional[int] = None
        self.banner = ""
        threading.Thread(target=self._read, daemon=True).start()
        deadline = time.monotonic() + 600
        while not self._healthy():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("the server did not start:\n" + "".join(self.lines))
            time.sleep(0.1)

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            if self.port is None and f"http://{HOST}:" in line:
                self.banner = line.strip()
                self.port = int(line.split(f"http://{HOST}:")[1].split("/")[0])

    def _healthy(self) -> bool:
        if self.port is None:
            return False
        try:
            return request(self.port, "GET", "/health")[0] == 200
        except OSError:
            return False

    def metrics(self) -> dict[str, Any]:
        return request(self.port, "GET", "/metrics")[1]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def request(port: int, method: str, path: str, body: Optional[dict] = None) -> tuple[int, Any]:
    conn = http.client.HTTPConnection(HOST, port, timeout=600)
    try:
        conn.request(method, path, body=None if body is None else json.dumps(body),
                     headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def prompts(count: int, chars: int) -> list[str]:
    """Different prompts of about ``chars`` characters (slices of a text at different offsets)."""
    text = TEXT * (chars // len(TEXT) + 2)
    return [text[(37 * i) % len(TEXT):(37 * i) % len(TEXT) + chars] for i in range(count)]


def run_level(server: Server, clients: int, args: argparse.Namespace) -> dict[str, float]:
    """``clients`` threads, each sending ``requests_per_client`` requests one after another."""
    texts = prompts(clients * args.requests_per_client, args.prompt_chars)
    tokens = [0] * clients
    latencies: list[float] = []
    errors: list[str] = []
    barrier = threading.Barrier(clients + 1)

    def client(i: int) -> None:
        barrier.wait()
        for k in range(args.requests_per_client):
            body = {"model": MODEL, "prompt": texts[i * args.requests_per_client + k], "max_tokens": args.max_tokens,
                    "temperature": 0, "ignore_eos": True}
            t0 = time.perf_counter()
            status, out = request(server.port, "POST", "/v1/completions", body)
            latencies.append(time.perf_counter() - t0)
            if status != 200:
                errors.append(f"{status}: {out}")
                return
            tokens[i] += out["usage"]["completion_tokens"]

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed, e.g. {errors[0]}")
    return {"tokens_per_sec": sum(tokens) / wall, "wall": wall, "tokens": sum(tokens),
            "p50_latency": statistics.median(latencies), "max_active_batch": server.metrics()["max_active_batch"]}


def device_name(device: str, banner: str) -> str:
    used = banner.split("device=")[-1].split(",")[0].strip() if "device=" in banner else device
    if used.startswith("cuda"):
        import torch

        return f"{torch.cuda.get_device_name(torch.device(used))} ({used})"
    cpu = platform.processor() or "CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU: {cpu}, {os.cpu_count()} cores"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=TINY, help="default: the tiny model shipped with litft")
    parser.add_argument("--quick", action="store_true", help="small run for CPU: 32 new tokens, 2 requests per client")
    parser.add_argument("--clients", default="1,8,32", help="concurrency levels, comma-separated")
    parser.add_argument("--max_batch_size", type=int, default=32)
    parser.add_argument("--max_tokens", type=int, default=None, help="tokens per request (default 128; quick 32)")
    parser.add_argument("--requests_per_client", type=int, default=None, help="default 4; quick 2")
    parser.add_argument("--prompt_chars", type=int, default=None, help="prompt length in characters (default 400; "
                                                                       "quick 64)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default=None)
    parser.add_argument("--quantize", default=None)
    parser.add_argument("--max_seq_length", type=int, default=None)
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args()
    args.max_tokens = args.max_tokens or (32 if args.quick else 128)
    args.requests_per_client = args.requests_per_client or (2 if args.quick else 4)
    args.prompt_chars = args.prompt_chars or (64 if args.quick else 400)
    levels = [int(c) for c in args.clients.split(",")]

    results: dict[str, list[dict[str, float]]] = {}
    banner = ""
    for label, batch in (("batched", args.max_batch_size), ("baseline", 1)):
        server = Server(args.checkpoint, batch, args)
        banner = banner or server.banner
        try:
            run_level(server, 1, argparse.Namespace(**{**vars(args), "requests_per_client": 1}))  # warm-up
            results[label] = []
            for clients in levels:
                r = run_level(server, clients, args)
                results[label].append(r)
                print(f"{label:8s} max_batch_size={batch:3d} clients={clients:3d}: {r['tokens_per_sec']:8.1f} tok/s "
                      f"(p50 latency {r['p50_latency']:.2f} s, max batch {r['max_active_batch']})",
                      file=sys.stderr, flush=True)
        finally:
            server.stop()

    command = "python bench/serve_throughput.py " + " ".join(sys.argv[1:])
    print(f"\n### `litft serve` throughput — {device_name(args.device, banner)}\n")
    print(f"- date: {datetime.date.today().isoformat()}; command: `{command.strip()}`")
    shown = args.checkpoint.resolve()
    shown = shown.relative_to(ROOT) if shown.is_relative_to(ROOT) else shown
    print(f"- checkpoint: `{shown}`; {args.requests_per_client} requests per client, "
          f"{args.max_tokens} new tokens each (greedy, ignore_eos), prompts of ~{args.prompt_chars} characters")
    print(f"- batched = continuous batching with `--max_batch_size {args.max_batch_size}`; baseline = "
          f"`--max_batch_size 1` (one request at a time), same run\n")
    print("| clients | batched tok/s | baseline tok/s | speed-up | batched p50 latency (s) | baseline p50 latency (s) "
          "| max rows decoded together |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for clients, b, s in zip(levels, results["batched"], results["baseline"]):
        print(f"| {clients} | {b['tokens_per_sec']:.1f} | {s['tokens_per_sec']:.1f} | "
              f"{b['tokens_per_sec'] / s['tokens_per_sec']:.2f}x | {b['p50_latency']:.2f} | {s['p50_latency']:.2f} | "
              f"{b['max_active_batch']} |")


if __name__ == "__main__":
    main()
