"""A decode step of the whole model reads nothing back to the host, so that it can be captured in
a CUDA graph: on the CPU, no .item()/.tolist()/.cpu()-style read happens during the step (static
configuration and dynamic routing); on a GPU, the step is captured and replayed."""

from __future__ import annotations

import contextlib
import traceback
from collections.abc import Iterator

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from flextron.routers import DynamicRouter

pytestmark = pytest.mark.usefixtures("one_thread")

# What reads a tensor's values on the host: a synchronisation on a GPU, forbidden under capture.
HOST_READS = {
    torch.ops.aten._local_scalar_dense.default,  # .item(), int(), float(), bool()
    torch.ops.aten.item.default,  # the same under inference_mode
    torch.ops.aten.nonzero.default,  # data-dependent output shape
}
HOST_COPIES = {torch.Tensor.cpu, torch.Tensor.tolist, torch.Tensor.numpy}


@contextlib.contextmanager
def recording_host_reads() -> Iterator[list[str]]:
    """The host reads and copies made inside, each with where it comes from."""
    seen: list[str] = []

    def record(func) -> None:
        seen.append(f"{func}:\n{''.join(traceback.format_stack(limit=7)[:-2])}")

    class Reads(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in HOST_READS:
                record(func)
            return func(*args, **(kwargs or {}))

    class Copies(TorchFunctionMode):  # .cpu() and .tolist() are not aten ops on CPU tensors
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func in HOST_COPIES:
                record(func)
            return func(*args, **(kwargs or {}))

    with Reads(), Copies():
        yield seen


@pytest.fixture(scope="session")
def model_and_routing(tiny_flextron):
    """Handed to the tests as a fixture: it needs tiny_flextron."""

    def model_and_routing(dynamic: bool, device: str):
        torch.manual_seed(0)
        model = tiny_flextron().to(device).eval()
        if not dynamic:
            return model, model.arch_for_budget(0.5), None
        router = DynamicRouter(model.config, [0.3, 1.0], hidden_size=16).to(device)
        return model, None, router.session(0.5, batch_size=1)

    return model_and_routing


@pytest.mark.parametrize("dynamic", [False, True])
def test_decode_step_reads_nothing_back_to_the_host(model_and_routing, dynamic):
    model, arch, session = model_and_routing(dynamic, "cpu")
    with torch.inference_mode():
        cache = model.new_kv_cache(1, 16)
        model(torch.tensor([[1, 2, 3]]), arch, cache, last_only=True, session=session)  # prefill may read
        with recording_host_reads() as seen:
            logits = model(torch.tensor([[4]]), arch, cache, session=session)
    assert logits.shape == (1, 1, model.config.vocab_size)
    assert not seen, "\n".join(seen)


def test_the_detectors_see_host_reads():
    with torch.inference_mode(), recording_host_reads() as seen:
        counts = torch.tensor([1, 3])
        int(counts.max())
        counts.tolist()
    assert len(seen) == 2


@pytest.mark.cuda
@pytest.mark.parametrize("dynamic", [False, True])
def test_decode_step_captures_in_a_cuda_graph(model_and_routing, dynamic):
    model, arch, session = model_and_routing(dynamic, "cuda")
    with torch.inference_mode():
        cache = model.new_kv_cache(1, 16)
        model(torch.tensor([[1, 2, 3]], device="cuda"), arch, cache, last_only=True, session=session)
        start, token = cache.length, torch.tensor([[4]], device="cuda")
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up (kernel selection, workspaces) and the expected result
            eager = model(token, arch, cache, session=session).clone()
        torch.cuda.current_stream().wait_stream(side)
        cache.length = start
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = model(token, arch, cache, session=session)
        cache.length = start
        graph.replay()
        torch.cuda.synchronize()
    torch.testing.assert_close(captured, eager)
