"""Start and stop a real `vllm serve` process on a loopback port."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

from helpers import subprocess_env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class VLLMServer:
    def __init__(self, model: Path, log_path: Path, *extra: str, startup_timeout: float = 600):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        cmd = [
            shutil.which("vllm") or "vllm", "serve", str(model),
            "--host", "127.0.0.1", "--port", str(self.port), "--quantization", "mxmoe",
            "--dtype", "float32", "--max-model-len", "512", "--gpu-memory-utilization", "0.15",
            "--served-model-name", "mxmoe-test", *extra,
        ]  # fmt: skip
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(
            cmd, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True, env=subprocess_env()
        )
        self._wait_healthy(startup_timeout)

    def _wait_healthy(self, timeout: float) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {self.proc.returncode}:\n{self.output()[-4000:]}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(1)
        self.stop()
        raise TimeoutError(f"vllm serve not healthy after {timeout}s:\n{self.output()[-4000:]}")

    def output(self) -> str:
        if not self.log.closed:
            self.log.flush()
        return Path(self.log_path).read_text()

    def stop(self, timeout: float = 60) -> int:
        """SIGINT (what Ctrl-C sends), then wait; kill the group if it hangs."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()
        return self.proc.returncode
