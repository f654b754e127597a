"""``GraphedCall``: which calls warm up, capture and replay, with a stand-in for the GPU's graph."""

from __future__ import annotations

import pytest
import torch
from graph_helpers import FailingBackend, FailingWarmupBackend, ReplayingBackend

from selma_core.models.cuda_graph import CudaGraphError, GraphedCall


def scaled_sum(x, y):
    return (x * 2 + y).sum(dim=0)


def test_calls_warm_up_then_capture_once_then_replay_on_copies_of_their_inputs():
    backend = ReplayingBackend()
    graphed = GraphedCall(scaled_sum, "cuda", warmup=2, backend=backend)
    results = []
    for i in range(6):
        x, y = torch.full((3, 2), float(i)), torch.arange(6.0).view(3, 2)
        results.append(graphed(x, y).clone())
        torch.testing.assert_close(results[-1], scaled_sum(x, y), rtol=0, atol=0)
    assert backend.events == ["side stream", "capture", "replay", "replay", "replay"]
    assert graphed.state == "captured"
    # The graph runs on buffers of its own, each call's inputs copied in.
    x = torch.full((3, 2), 9.0)
    assert backend.inputs[0] is not x and graphed(x, torch.zeros(3, 2)).tolist() == [54.0, 54.0]
    assert backend.inputs[0].tolist() == x.tolist()


def test_the_static_buffers_keep_the_inputs_memory_layout():
    backend = ReplayingBackend()
    graphed = GraphedCall(lambda x: x.sum(), "cuda", backend=backend)
    x = torch.randn(2, 3, 4, 4).contiguous(memory_format=torch.channels_last)
    for _ in range(3):
        graphed(x)
    assert backend.inputs[0].is_contiguous(memory_format=torch.channels_last)


def test_a_call_with_other_shapes_runs_the_function_as_it_is():
    backend = ReplayingBackend()
    graphed = GraphedCall(scaled_sum, "cuda", backend=backend)
    for _ in range(3):
        graphed(torch.ones(3, 2), torch.ones(3, 2))
    smaller = graphed(torch.ones(1, 2), torch.ones(1, 2))
    assert smaller.tolist() == [3.0, 3.0] and backend.events.count("replay") == 1


def test_a_failed_capture_raises_naming_the_root_cause():
    """A capture cut short is not retried without a graph (PyTorch's state after it is unsafe): the
    error names both the root cause and what CUDA raised over it."""
    graphed = GraphedCall(scaled_sum, "cuda", backend=FailingBackend(), name="the step")
    for _ in range(2):
        graphed(torch.ones(2, 2), torch.ones(2, 2))
    with pytest.raises(CudaGraphError) as caught:
        graphed(torch.ones(2, 2), torch.ones(2, 2))
    message = str(caught.value)
    assert message.startswith("the step cannot be replayed as a CUDA graph: its capture failed (")
    assert message.index("Cannot copy between CPU and CUDA") < message.index("previous error during capture")


def test_a_failure_on_the_capture_stream_is_reported_before_any_capture():
    backend = FailingWarmupBackend()
    graphed = GraphedCall(scaled_sum, "cuda", backend=backend)
    graphed(torch.ones(2, 2), torch.ones(2, 2))
    with pytest.raises(CudaGraphError, match="its run on the capture stream failed .*synchronizing"):
        graphed(torch.ones(2, 2), torch.ones(2, 2))
    assert backend.events == ["side stream"]


def test_running_out_of_memory_while_capturing_stays_an_out_of_memory_error():
    class OutOfMemoryBackend(ReplayingBackend):
        def capture(self, fn, inputs) -> None:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    graphed = GraphedCall(scaled_sum, "cuda", backend=OutOfMemoryBackend())
    for _ in range(2):
        graphed(torch.ones(2, 2), torch.ones(2, 2))
    with pytest.raises(torch.OutOfMemoryError):
        graphed(torch.ones(2, 2), torch.ones(2, 2))


def test_warmup_must_leave_the_first_call_to_compile():
    with pytest.raises(ValueError, match="warmup: expected >= 1"):
        GraphedCall(scaled_sum, "cuda", warmup=0)
