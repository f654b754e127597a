"""Test helpers: stand-ins for a CUDA graph, so ``GraphedCall``'s plumbing runs on the CPU.

A real graph needs a GPU; what ``GraphedCall`` hands it (static buffers, in place of each call's
inputs) and what it gets back (one output tensor, overwritten by every replay) is the same here."""

from __future__ import annotations


class ReplayingBackend:
    """Runs the function where a GPU would replay its graph: on the static buffers it was captured
    with, into one output tensor that every replay overwrites, as a graph's does."""

    def __init__(self) -> None:
        self.events: list[str] = []
        self.fn = None
        self.inputs: list = []
        self.output = None
        # Parameters the function reads and whose gradients it adds into: a real graph reads and
        # writes them at the addresses they had at capture, so every replay checks they still are.
        self.grads_of: list = []
        self._addresses: list[tuple[int, int]] = []

    def warm_on_side_stream(self, fn, inputs):
        self.events.append("side stream")
        return fn(*inputs)

    def capture(self, fn, inputs) -> None:
        self.events.append("capture")  # records, runs nothing
        self.fn, self.inputs = fn, inputs
        self._addresses = [(p.data_ptr(), p.grad.data_ptr()) for p in self.grads_of]

    def replay(self):
        self.events.append("replay")
        now = [(p.data_ptr(), p.grad.data_ptr() if p.grad is not None else None) for p in self.grads_of]
        assert now == self._addresses, (
            "a parameter or gradient moved since capture: a graph would use the old one"
        )
        result = self.fn(*self.inputs)
        if self.output is None:
            self.output = result.clone()
        else:
            self.output.copy_(result)
        return self.output


class FailingBackend(ReplayingBackend):
    """A capture that meets an operation a graph cannot hold, as CUDA reports it: the capture's end
    raises over the root cause."""

    def capture(self, fn, inputs) -> None:
        self.events.append("capture")
        try:
            raise RuntimeError("Cannot copy between CPU and CUDA tensors during CUDA graph capture")
        except RuntimeError:
            raise RuntimeError("operation failed due to a previous error during capture")  # noqa: B904


class FailingWarmupBackend(ReplayingBackend):
    """A run on the capture stream that fails: the function raised there."""

    def warm_on_side_stream(self, fn, inputs):
        self.events.append("side stream")
        raise RuntimeError("called a synchronizing CUDA operation")
