"""End to end on the embedded default: quantize the reference MoE with mixed
per-expert schemes, serve it with `vllm serve --quantization mxmoe`, ask it
something over the OpenAI API, print the answer, stop the server."""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT.parent / "shared" / "reference-moe"


def quantize(model: Path, out: Path) -> Path:
    """A mixed map: per layer, experts cycle through three schemes, down differs from gate/up."""
    from offline.cli import quantize_main
    from offline.model_spec import inspect_model

    spec = inspect_model(model)
    cycle = ["w4g128", "w3g128", "w8"]
    layers = {
        p: {"gate_up": [cycle[e % 3] for e in range(n)], "down": [cycle[(e + 1) % 3] for e in range(n)]}
        for p, n in spec.expert_layers.items()
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "scheme_map.json").write_text(json.dumps({"layers": layers}))
    ckpt = out / "checkpoint"
    code = quantize_main(["--model", str(model), "--out", str(ckpt), "--scheme-map", str(out / "scheme_map.json")])
    if code:
        sys.exit(code)
    return ckpt


def serve_and_ask(ckpt: Path, prompt: str, log: Path) -> str:
    from openai import OpenAI

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [shutil.which("vllm") or "vllm", "serve", str(ckpt), "--quantization", "mxmoe",
           "--host", "127.0.0.1", "--port", str(port), "--max-model-len", "1024",
           "--gpu-memory-utilization", "0.15", "--served-model-name", "mxmoe-demo"]  # fmt: skip
    print("$", " ".join(cmd), f"  (log: {log})", flush=True)
    with open(log, "w") as log_file:
        server = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.time() + 900
            while True:
                if server.poll() is not None:
                    sys.exit(f"vllm serve exited with {server.returncode}; see {log}")
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                        break
                except OSError:
                    if time.time() > deadline:
                        sys.exit(f"vllm serve did not come up in 15 minutes; see {log}")
                    time.sleep(2)
            client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
            reply = client.completions.create(model="mxmoe-demo", prompt=prompt, max_tokens=48, temperature=0)
            return reply.choices[0].text
        finally:
            server.send_signal(signal.SIGINT)
            try:
                server.wait(60)
            except subprocess.TimeoutExpired:
                server.kill()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", type=Path, default=REFERENCE, help="HF MoE model folder (default: the reference MoE)")
    p.add_argument("--out", type=Path, default=ROOT / "out" / "demo")
    p.add_argument("--prompt", default="The Linux kernel scheduler")
    args = p.parse_args()
    ckpt = quantize(args.model, args.out)
    answer = serve_and_ask(ckpt, args.prompt, args.out / "vllm-serve.log")
    print(f"\nPROMPT: {args.prompt}\nANSWER: {answer}")


if __name__ == "__main__":
    main()
