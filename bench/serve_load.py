"""Load test of `transferkit serve`: the server in its own process on loopback, 32 concurrent
clients in this one, a bounded number of requests per round. Prints throughput, p50/p99 latency,
errors and the server's resident memory after each round (flat memory: no growth between rounds).

    python bench/serve_load.py --run runs/demo --images data/elpv/test
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

SRC = Path(__file__).resolve().parents[1] / "src"


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def round_(url: str, bodies: list[bytes], requests: int, clients: int) -> tuple[list[float], int, float]:
    """`requests` POSTs shared by `clients` concurrent clients: (latencies, errors, seconds)."""
    latencies, errors, counter = [], 0, iter(range(requests))

    async def client(http: httpx.AsyncClient):
        nonlocal errors
        for i in counter:
            start = time.perf_counter()
            try:
                response = await http.post(url, content=bodies[i % len(bodies)],
                                           headers={"content-type": "application/octet-stream"})
                errors += response.status_code != 200
            except httpx.HTTPError:
                errors += 1
            latencies.append(time.perf_counter() - start)

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(limits=limits, timeout=60) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        return latencies, errors, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=Path("runs/demo"))
    parser.add_argument("--images", type=Path, default=Path("data/elpv/test"))
    parser.add_argument("--engine", default="auto", help="auto, torch or onnx (as `serve --engine`).")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=600, help="Per round.")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    bodies = [p.read_bytes() for p in sorted(args.images.rglob("*.png"))[:200]]
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "transferkit.cli", "serve", str(args.run),
                               "--port", str(port), "--engine", args.engine],
                              env={**os.environ, "PYTHONPATH": str(SRC)})
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                health = httpx.get(base + "/health", timeout=1).json()
                break
            except httpx.TransportError:
                if server.poll() is not None:
                    sys.exit("the server did not start")
                time.sleep(0.2)
        asyncio.run(round_(base + "/predict", bodies, 2 * args.clients, args.clients))  # warm-up
        rows = [("after warm-up", None, None, None, None, rss_mib(server.pid))]
        for r in range(args.rounds):
            latencies, errors, seconds = asyncio.run(round_(base + "/predict", bodies, args.requests, args.clients))
            ms = np.percentile(np.array(latencies) * 1000, [50, 99])
            rows.append((f"round {r + 1}: {args.requests} requests", args.requests / seconds, ms[0], ms[1],
                         errors, rss_mib(server.pid)))
    finally:
        server.terminate()
        server.wait(30)
    print(f"\n{args.clients} concurrent clients, engine {health['engine']}, model {health['model_version']}, "
          f"{len(bodies)} distinct images ({args.images}), {os.cpu_count()} CPUs shared by server and clients\n")
    print("| round | requests/s | p50 latency (ms) | p99 latency (ms) | errors | server RSS (MiB) |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, rate, p50, p99, errors, rss in rows:
        cells = ["" if v is None else f"{v:.1f}" if isinstance(v, float) else str(v) for v in (rate, p50, p99, errors)]
        print(f"| {name} | " + " | ".join(cells) + f" | {rss:.0f} |")
    growth = rows[-1][-1] - rows[1][-1]
    print(f"\nRSS growth from round 1 to round {args.rounds}: {growth:+.0f} MiB")


if __name__ == "__main__":
    main()
