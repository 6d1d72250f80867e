"""Test only: a vLLM worker extension that makes the worker's next model step raise.

``VLLMEngine(fault_hooks=True)`` names it as vLLM's ``worker_extension_cls``, so vLLM mixes it
into its worker class (in the worker's own process) and ``collective_rpc`` can call it by name
with plain arguments. Never loaded otherwise.
"""

from __future__ import annotations

import builtins
import importlib


def exception_from(type_name: str, message: str) -> Exception:
    """``module.QualName`` (or a builtin's name) and a message -> the exception to raise."""
    module, _, name = type_name.rpartition(".")
    owner = importlib.import_module(module) if module else builtins
    return getattr(owner, name)(message)


class FaultHooks:
    def lmm_fault_next_step(self, type_name: str, message: str) -> None:
        """The next ``execute_model`` of this worker raises, then the worker is as before."""
        exc = exception_from(type_name, message)

        def execute_model(*args, **kwargs):
            del self.execute_model  # one step only
            raise exc

        self.execute_model = execute_model
