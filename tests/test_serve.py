"""The real serving loop: `vllm serve` on an MxMoE checkpoint, driven by the openai client."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from offline.cli import quantize_main
from offline.model_spec import inspect_model
from server import VLLMServer
from tiny_models import REFERENCE_MOE

CHAT_TEMPLATE = Path(__file__).resolve().parent / "data" / "chat_template.jinja"
PROMPTS = [
    "The Linux kernel",
    "In Python, a list comprehension",
    "To configure the network interface,",
    "The function returns",
]


@pytest.fixture(scope="module")
def mixed_reference_ckpt(tmp_path_factory):
    """The reference model with three schemes mixed inside every MoE layer."""
    root = tmp_path_factory.mktemp("serve")
    spec = inspect_model(REFERENCE_MOE)
    cycle = ["w4g128", "w8", "w3g128"]
    layers = {
        prefix: {"gate_up": [cycle[e % 3] for e in range(n)], "down": [cycle[(e + 1) % 3] for e in range(n)]}
        for prefix, n in spec.expert_layers.items()
    }
    (root / "map.json").write_text(json.dumps({"layers": layers}))
    argv = ["--model", str(REFERENCE_MOE), "--out", str(root / "q"), "--scheme-map", str(root / "map.json")]
    assert quantize_main(argv) == 0
    return root / "q"


@pytest.mark.slow
def test_openai_completions_chat_and_concurrency(mixed_reference_ckpt, tmp_path):
    from openai import OpenAI

    server = VLLMServer(mixed_reference_ckpt, tmp_path / "server.log", "--chat-template", str(CHAT_TEMPLATE))
    try:
        client = OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=300)
        assert [m.id for m in client.models.list().data] == ["mxmoe-test"]

        def complete(prompt: str) -> str:
            r = client.completions.create(model="mxmoe-test", prompt=prompt, max_tokens=24, temperature=0)
            return r.choices[0].text

        one_by_one = [complete(p) for p in PROMPTS]
        assert all(len(text.strip()) > 0 for text in one_by_one)
        # The reference model was trained on kernel/Python docs: a quantized model that
        # still works answers mostly in ASCII words, not byte soup.
        words = " ".join(one_by_one).split()
        assert sum(w.isascii() and any(c.isalpha() for c in w) for w in words) > 0.6 * len(words)

        with ThreadPoolExecutor(len(PROMPTS)) as pool:
            concurrent = list(pool.map(complete, PROMPTS))
        assert concurrent == one_by_one

        chat = client.chat.completions.create(
            model="mxmoe-test",
            messages=[{"role": "user", "content": "What does the kernel scheduler do?"}],
            max_tokens=16,
            temperature=0,
        )
        assert chat.choices[0].message.content.strip()
        assert chat.usage.completion_tokens == 16 or chat.choices[0].finish_reason == "stop"
    finally:
        code = server.stop()
    assert code in (0, -2, 130), server.output()[-3000:]
    assert "mxmoe" in server.output()
