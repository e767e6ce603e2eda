"""What `llama-lora serve` costs on top of generating in-process, measured side by side in one run.

    .venv/bin/python bench/serve_overhead.py [--model smollm2-135m-instruct] [--tokens 64] [--repeats 3]

Starts `llama-lora serve MODEL` as a subprocess on a free loopback port and loads the same model in this
process with `loading.load` (what `infer --base` runs). Then, alternating: one greedy completion of
`--tokens` tokens in-process (`generate.generate`) and the same request through the server with the `openai`
client (`temperature: 0`), `--repeats` times each; then 16 requests sent at once from 16 threads (the server
queues them and serves them one by one). Prints one JSON object; the figures go to bench/RESULTS.md.
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

PROMPT = "Write a long story about a lighthouse keeper and a storm."


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import openai
    import torch

    from llama_lora.infer import generate, loading

    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "llama_lora", "serve", args.model, "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "LLAMA_LORA_API_KEY": ""},
    )
    try:
        client = openai.OpenAI(
            base_url=f"http://127.0.0.1:{port}/v1", api_key="-", max_retries=0, timeout=600
        )
        deadline = time.monotonic() + 300
        while True:
            try:
                client.models.list()
                break
            except openai.APIConnectionError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise SystemExit("the server did not start") from None
                time.sleep(0.5)
        loaded = loading.load(base=args.model, device="auto", log=lambda *a: None)
        settings = generate.GenerationSettings(max_new_tokens=args.tokens)
        messages = [{"role": "user", "content": PROMPT}]

        def in_process() -> tuple[float, int, str]:
            start = time.perf_counter()
            result = generate.generate(loaded, messages, settings)
            return time.perf_counter() - start, len(result.token_ids), result.text

        def through_server(c=client) -> tuple[float, int, str]:
            start = time.perf_counter()
            reply = c.chat.completions.create(
                model=args.model, messages=messages, temperature=0, max_tokens=args.tokens
            )
            return (
                time.perf_counter() - start,
                reply.usage.completion_tokens,
                reply.choices[0].message.content,
            )

        in_process(), through_server()  # warm-up: first-call allocations on both sides
        local, remote = [], []
        for _ in range(args.repeats):
            local.append(in_process())
            remote.append(through_server())
        assert all(r[2] == local[0][2] for r in local + remote), "server and in-process answers differ"

        results: list[tuple[float, int, str]] = []
        threads = [
            threading.Thread(
                target=lambda: results.append(
                    through_server(openai.OpenAI(base_url=client.base_url, api_key="-", timeout=600))
                )
            )
            for _ in range(16)
        ]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        concurrent_s = time.perf_counter() - start
        assert len(results) == 16 and all(r[2] == local[0][2] for r in results)

        in_s, srv_s = statistics.median(r[0] for r in local), statistics.median(r[0] for r in remote)
        report = {
            "model": args.model,
            "device": loaded.device,
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch "
            f"{torch.__version__}",
            "completion_tokens": local[0][1],
            "in_process_s": [round(r[0], 3) for r in local],
            "server_s": [round(r[0], 3) for r in remote],
            "in_process_median_s": round(in_s, 3),
            "server_median_s": round(srv_s, 3),
            "server_overhead_s": round(srv_s - in_s, 3),
            "server_over_in_process": round(srv_s / in_s, 3),
            "concurrent_16_total_s": round(concurrent_s, 2),
            "concurrent_16_over_16_serial": round(concurrent_s / (16 * srv_s), 3),
        }
        print(json.dumps(report, indent=2))
    finally:
        server.terminate()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()


if __name__ == "__main__":
    main()
