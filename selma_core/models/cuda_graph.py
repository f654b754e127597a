"""One fixed-shape function replayed as a CUDA graph: the training micro-batch's forward and backward.

A compiled UNet still launches its kernels one at a time from Python. For SDXL compiled block by
block (87 compiled modules and the eager code between them) the CPU takes longer to launch a
training step than the GPU takes to run it: on an H200 the GPU sat idle 51% of each step
(``bench/RESULTS.md``, 2026-11-27), and 8% for SD 1.x compiled whole. Captured once as a CUDA graph,
a micro-batch's thousands of launches become one, and the GPU no longer waits for Python.

``GraphedCall`` wraps the function:

1. the first ``warmup`` calls run it as it is: they compile it, and cuDNN picks its kernels;
2. the next call runs it once more on a side stream, the documented recipe for capture
   (``torch.cuda.make_graphed_callables`` does the same): lazily made per-stream state, cuBLAS's
   workspace among it, exists before capture;
3. the next call copies its inputs into static buffers, captures the function on them into a
   graph, and replays the graph (capturing records the kernels, it runs none of them);
4. every later call copies its inputs into the static buffers and replays.

Every call's result is the function's: what it returns, and what it writes elsewhere. A graph
writes to the addresses it was captured with, so whatever the function writes besides its output
must stay where it is: gradients accumulate in place into ``.grad`` tensors that the caller keeps
allocated (``optimizer.zero_grad(set_to_none=False)``). The output is the graph's own tensor,
overwritten by the next call: use it (or copy it) before calling again. Inputs must keep their
shapes and dtypes; a call with others runs the function as it is.

A capture that fails (an operation a graph cannot hold: a host synchronization, a CPU tensor) is
reported once on stderr and the function runs as it is from then on; ``state`` says which way calls
run. Capturing runs none of the function, so a failed capture leaves nothing half done.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, Protocol


class GraphBackend(Protocol):
    """How ``GraphedCall`` captures and replays: ``CudaGraphBackend`` on a GPU; tests on the CPU
    give one that runs the function where a GPU would replay it."""

    def warm_on_side_stream(self, fn: Callable[..., Any], inputs: list) -> Any: ...

    def capture(self, fn: Callable[..., Any], inputs: list) -> None: ...

    def replay(self) -> Any: ...


class CudaGraphBackend:
    """``torch.cuda.CUDAGraph`` on ``device``."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.graph = None
        self.output = None

    def warm_on_side_stream(self, fn: Callable[..., Any], inputs: list) -> Any:
        import torch

        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            output = fn(*inputs)
        torch.cuda.current_stream(self.device).wait_stream(side)
        # Allocated on the side stream, used on the default one from here on.
        if isinstance(output, torch.Tensor):
            output.record_stream(torch.cuda.current_stream(self.device))
        return output

    def capture(self, fn: Callable[..., Any], inputs: list) -> None:
        import torch

        torch.cuda.synchronize(self.device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            output = fn(*inputs)
        self.graph, self.output = graph, output

    def replay(self) -> Any:
        self.graph.replay()
        return self.output


class GraphedCall:
    """``fn(*tensors)``, replayed as a CUDA graph from its ``warmup + 2``-th call on (see the module
    docstring). ``backend``: ``CudaGraphBackend(device)`` unless given."""

    def __init__(
        self, fn: Callable[..., Any], device: str, warmup: int = 1, backend: GraphBackend | None = None
    ) -> None:
        if warmup < 1:
            raise ValueError(f"warmup: expected >= 1 (the first call compiles), got {warmup}")
        self.fn = fn
        self.warmup = warmup
        self.backend = backend if backend is not None else CudaGraphBackend(device)
        self.calls = 0
        # "warming up", "captured" or "failed: <why>": how calls run now.
        self.state = "warming up"
        self._static: list = []
        self._signature: list | None = None

    @staticmethod
    def _describe(tensors) -> list:
        return [(tuple(t.shape), t.dtype, t.device) for t in tensors]

    def __call__(self, *tensors):
        self.calls += 1
        if self.state.startswith("failed") or self.calls <= self.warmup:
            return self.fn(*tensors)
        if self.calls == self.warmup + 1:
            return self.backend.warm_on_side_stream(self.fn, list(tensors))
        if self.state != "captured":
            return self._capture(tensors)
        if self._describe(tensors) != self._signature:
            # A graph replays the shapes it captured; another shape runs as it is.
            return self.fn(*tensors)
        for static, tensor in zip(self._static, tensors, strict=True):
            static.copy_(tensor)
        return self.backend.replay()

    def _capture(self, tensors):
        # Static buffers in the inputs' own layouts (channels_last stays channels_last).
        self._static = [t.clone() for t in tensors]
        self._signature = self._describe(tensors)
        try:
            self.backend.capture(self.fn, self._static)
        except Exception as e:  # an operation a graph cannot hold: run as is from now on
            self.state = f"failed: {type(e).__name__}: {e}"
            self._static = []
            print(
                f"warning: CUDA graph capture failed, running without a graph: {self.state[8:]}",
                file=sys.stderr,
            )
            return self.fn(*tensors)
        self.state = "captured"
        return self.backend.replay()
