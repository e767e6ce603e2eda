"""Concurrent chat requests through `llama-lora serve`, against the same requests one after another.

    python bench/serve_load.py [MODEL_OR_RUN_DIR] [--clients 16] [--tokens 64] [--out results.json]

Starts `llama-lora serve` on a loopback port (one process, as a user runs it), then sends `--clients` streamed
chat requests with the official `openai` client, each asking for exactly `--tokens` greedy tokens (the demo
prompts' topics differ; `max_tokens` with no early stop is forced by a stop token the model never reaches
being absent: requests that end early are counted as they are), first one after another, then all at once.
Reports for each side: the wall time, completion tokens per second, the median and 95th-percentile time to
first token, and the CPU seconds the clients (this process) and the server used meanwhile (on one machine
they share its cores). The ratio concurrent/serial of tokens per second is the figure issue 29 asks for (>= 8x, p95
time to first token under 5 s).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOPICS = [
    "a robot",
    "the sea",
    "a cat",
    "bread",
    "winter",
    "a city",
    "music",
    "trees",
    "the moon",
    "a river",
    "tea",
    "a dog",
    "snow",
    "a train",
    "books",
    "the sun",
    "clouds",
    "a bridge",
    "rain",
    "a garden",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(model: str, port: int, precision: str):
    import requests

    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "llama_lora", "serve", model, "--port", str(port), "--precision", precision],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit("the server exited")
        try:
            if requests.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).ok:
                return proc
        except requests.ConnectionError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit("the server was not ready in 300 s")


def ask(client, model: str, topic: str, tokens: int) -> tuple[float, float, int]:
    """(time to first token, total time, completion tokens) of one streamed request."""
    start = time.monotonic()
    first, count = None, 0
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": f"Write a long story about {topic}."}],
        temperature=0,
        max_tokens=tokens,
        stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content and first is None:
            first = time.monotonic() - start
        if chunk.usage is not None:
            count = chunk.usage.completion_tokens
    return (first if first is not None else time.monotonic() - start), time.monotonic() - start, count


def cpu_seconds(pid: int | None = None) -> float | None:
    """CPU seconds (user + system) used so far by this process (the clients) or by process `pid` (the
    server, read from /proc; None where there is no /proc)."""
    import resource

    if pid is None:
        used = resource.getrusage(resource.RUSAGE_SELF)
        return used.ru_utime + used.ru_stime
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def side(url: str, model: str, clients: int, tokens: int, concurrent: bool, server_pid: int) -> dict:
    import openai

    results: list[tuple[float, float, int]] = [None] * clients  # type: ignore[list-item]

    def one(i: int) -> None:
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=600)
        results[i] = ask(client, model, TOPICS[i % len(TOPICS)], tokens)

    start, client_before, server_before = time.monotonic(), cpu_seconds(), cpu_seconds(server_pid)
    if concurrent:
        threads = [threading.Thread(target=one, args=(i,)) for i in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    else:
        for i in range(clients):
            one(i)
    wall = time.monotonic() - start
    client_cpu, server_after = cpu_seconds() - client_before, cpu_seconds(server_pid)
    server_cpu = None if server_after is None or server_before is None else server_after - server_before
    ttft = sorted(r[0] for r in results)
    total = sum(r[2] for r in results)
    return {
        "wall_s": round(wall, 2),
        "completion_tokens": total,
        "tokens_per_s": round(total / wall, 1),
        "ttft_p50_s": round(statistics.median(ttft), 2),
        "ttft_p95_s": round(ttft[min(len(ttft) - 1, round(0.95 * (len(ttft) - 1)))], 2),
        # CPU seconds over the wall time: the clients (this process, the openai client) and the server
        "client_cpu_s": round(client_cpu, 2),
        "server_cpu_s": None if server_cpu is None else round(server_cpu, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model", nargs="?", default="smollm2-135m-instruct", help="what to serve")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--precision", default="auto", help="serve's --precision (auto, bf16, fp32)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    port = free_port()
    proc = start(args.model, port, args.precision)
    try:
        import openai

        url = f"http://127.0.0.1:{port}/v1"
        listed = openai.OpenAI(base_url=url, api_key="unused").models.list().data
        # a run directory's adapter when one is served (what its user asks for), else the base
        model = next((m.id for m in listed if getattr(m, "parent", None)), listed[0].id)
        ask(openai.OpenAI(base_url=url, api_key="unused"), model, "warm-up", 8)
        serial = side(url, model, args.clients, args.tokens, concurrent=False, server_pid=proc.pid)
        together = side(url, model, args.clients, args.tokens, concurrent=True, server_pid=proc.pid)
    finally:
        proc.terminate()
        proc.wait(30)
    report = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "model": args.model,
        "served_name": model,
        "precision": args.precision,
        "clients": args.clients,
        "tokens": args.tokens,
        "serial": serial,
        "concurrent": together,
        "throughput_ratio": round(together["tokens_per_s"] / serial["tokens_per_s"], 2),
    }
    print(json.dumps(report, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
