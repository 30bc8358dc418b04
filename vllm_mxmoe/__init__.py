"""vllm-mxmoe: mixed-precision (per expert, per block) MoE quantization served by vLLM.

Importing this package is cheap: vLLM is only imported by ``register()``, the
``vllm.general_plugins`` entry point that vLLM calls in every process.
"""

__version__ = "0.1.0"

_registered = False


def register() -> None:
    """Register quantization method ``mxmoe`` with vLLM (idempotent)."""
    global _registered
    if _registered:
        return
    from .config import register_config

    register_config()
    _registered = True
