"""One fixed-shape function replayed as a CUDA graph: the training micro-batch's forward and backward.

A compiled UNet still launches its kernels one at a time from Python. For SDXL compiled block by
block (87 compiled modules and the eager code between them) the CPU takes longer to launch a
training step than the GPU takes to run it: on an H200 the GPU sat idle 51% of each step
(``bench/RESULTS.md``, 2026-11-27), and 8% for SD 1.x compiled whole. Captured once as a CUDA graph,
a micro-batch's thousands of launches become one, and the GPU no longer waits for Python.

``GraphedCall`` wraps the function:

1. the first ``warmup`` calls run it as it is: they compile it, and cuDNN picks its kernels;
2. the next call runs it on the side stream the graph will be captured on, the documented recipe
   (``torch.cuda.make_graphed_callables`` does the same): state made lazily per stream, cuBLAS's
   workspace among it, exists before capture. That call also shows what capture cannot hold: it
   runs with CUDA's synchronization check set to warn, so an operation that waits for the GPU (a
   read to the host, a copy from ordinary memory) is reported with where it came from (only
   reported: the capture is the judge, and its error would otherwise name no source line);
3. the next call copies its inputs into static buffers, captures the function on them into a
   graph (recording its kernels, running none of them, and refusing to recompile: a compile inside
   a capture cannot work) and replays it;
4. every later call copies its inputs into the static buffers and replays.

Every call's result is the function's: what it returns, and what it writes elsewhere. A graph
writes to the addresses it was captured with, so whatever the function writes besides its output
must stay where it is: gradients accumulate in place into ``.grad`` tensors that the caller keeps
allocated (``optimizer.zero_grad(set_to_none=False)``). The output is the graph's own tensor,
overwritten by the next call: use it (or copy it) before calling again. Inputs must keep their
shapes and dtypes; a call with others runs the function as it is.

A function that cannot be captured raises ``CudaGraphError`` naming why. It is not retried without
a graph: a capture that broke off leaves PyTorch's allocator and current stream in a state that
later fails far from the cause, and a micro-batch whose backward was cut short has already added
part of its gradients.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Protocol


class CudaGraphError(RuntimeError):
    """The function could not be captured as a CUDA graph; the message says why."""


class GraphBackend(Protocol):
    """How ``GraphedCall`` captures and replays: ``CudaGraphBackend`` on a GPU; tests on the CPU
    give one that runs the function where a GPU would replay it."""

    def warm_on_side_stream(self, fn: Callable[..., Any], inputs: list) -> Any: ...

    def capture(self, fn: Callable[..., Any], inputs: list) -> None: ...

    def replay(self) -> Any: ...


class CudaGraphBackend:
    """``torch.cuda.CUDAGraph`` on ``device``, warmed up and captured on one side stream."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.stream = None
        self.graph = None
        self.output = None

    def warm_on_side_stream(self, fn: Callable[..., Any], inputs: list) -> Any:
        import torch

        with torch.cuda.device(self.device):
            self.stream = torch.cuda.Stream()
            current = torch.cuda.current_stream()
            self.stream.wait_stream(current)
            previous = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode("warn")  # what would break the capture, with its source
            try:
                with torch.cuda.stream(self.stream):
                    output = fn(*inputs)
            finally:
                torch.cuda.set_sync_debug_mode(previous)
            current.wait_stream(self.stream)
            # Allocated on the side stream, used on the current one from here on.
            if isinstance(output, torch.Tensor):
                output.record_stream(current)
        return output

    def capture(self, fn: Callable[..., Any], inputs: list) -> None:
        import torch

        with torch.cuda.device(self.device):
            graph = torch.cuda.CUDAGraph()
            with torch.compiler.set_stance("fail_on_recompile"), torch.cuda.graph(graph, stream=self.stream):
                output = fn(*inputs)
        self.graph, self.output = graph, output

    def replay(self) -> Any:
        import torch

        with torch.cuda.device(self.device):
            self.graph.replay()
        return self.output


class GraphedCall:
    """``fn(*tensors)``, replayed as a CUDA graph from its ``warmup + 2``-th call on (see the module
    docstring). ``backend``: ``CudaGraphBackend(device)`` unless given; ``name``: what ``fn`` is,
    for errors."""

    def __init__(
        self,
        fn: Callable[..., Any],
        device: str,
        warmup: int = 1,
        backend: GraphBackend | None = None,
        name: str = "the function",
    ) -> None:
        if warmup < 1:
            raise ValueError(f"warmup: expected >= 1 (the first call compiles), got {warmup}")
        self.fn = fn
        self.name = name
        self.warmup = warmup
        self.backend = backend if backend is not None else CudaGraphBackend(device)
        self.calls = 0
        self.state = "warming up"  # then "captured"
        self._static: list = []
        self._signature: list | None = None

    @staticmethod
    def _describe(tensors) -> list:
        return [(tuple(t.shape), t.dtype, t.device) for t in tensors]

    def __call__(self, *tensors):
        self.calls += 1
        if self.calls <= self.warmup:
            return self.fn(*tensors)
        if self.calls == self.warmup + 1:
            with _cannot_capture(self.name, "its run on the capture stream"):
                return self.backend.warm_on_side_stream(self.fn, list(tensors))
        if self.state != "captured":
            # Static buffers in the inputs' own layouts (channels_last stays channels_last).
            self._static = [t.clone() for t in tensors]
            self._signature = self._describe(tensors)
            with _cannot_capture(self.name, "its capture"):
                self.backend.capture(self.fn, self._static)
            self.state = "captured"
            return self.backend.replay()
        if self._describe(tensors) != self._signature:
            # A graph replays the shapes it captured; another shape runs as it is.
            return self.fn(*tensors)
        for static, tensor in zip(self._static, tensors, strict=True):
            static.copy_(tensor)
        return self.backend.replay()


@contextmanager
def _cannot_capture(name: str, where: str) -> Iterator[None]:
    """Any exception inside, as a ``CudaGraphError`` saying where it came and why (the root cause
    first, where the capture's end raised over it)."""
    import torch

    try:
        yield
    except (CudaGraphError, torch.OutOfMemoryError):
        raise  # out of memory: the caller's advice (a smaller batch) is the one that helps
    except Exception as error:
        causes = [error.__context__, error] if error.__context__ is not None else [error]
        why = "; then ".join(f"{type(e).__name__}: {e}" for e in causes)
        raise CudaGraphError(f"{name} cannot be replayed as a CUDA graph: {where} failed ({why})") from error
