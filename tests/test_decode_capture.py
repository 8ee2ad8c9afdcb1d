"""A decode step of the whole model reads nothing back to the host, so that it can be captured in
a CUDA graph: on the CPU, no .item()/.tolist()/.cpu()-style read happens during the step (static
configuration and dynamic routing); on a GPU, the step is captured and replayed."""

from __future__ import annotations

import traceback

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from flextron.routers import DynamicRouter
from tests.helpers import cuda_only, tiny_flextron

pytestmark = pytest.mark.usefixtures("one_thread")

# What reads a tensor's values on the host: a synchronisation on a GPU, forbidden under capture.
HOST_READS = {
    torch.ops.aten._local_scalar_dense.default,  # .item(), int(), float(), bool()
    torch.ops.aten.item.default,  # the same under inference_mode
    torch.ops.aten.nonzero.default,  # data-dependent output shape
}
HOST_COPIES = {torch.Tensor.cpu, torch.Tensor.tolist, torch.Tensor.numpy}


class HostReads(TorchDispatchMode):
    """Records the host reads of the ops run under it, with where they come from."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in HOST_READS:
            self.seen.append(f"{func}:\n{''.join(traceback.format_stack(limit=6)[:-1])}")
        return func(*args, **(kwargs or {}))


class HostCopies(TorchFunctionMode):
    """Records .cpu(), .tolist() and .numpy() calls (no-ops on the CPU, copies from a GPU)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in HOST_COPIES:
            self.seen.append(f"{func.__name__}:\n{''.join(traceback.format_stack(limit=6)[:-1])}")
        return func(*args, **(kwargs or {}))


def model_and_routing(dynamic: bool, device: str):
    torch.manual_seed(0)
    model = tiny_flextron().to(device).eval()
    if not dynamic:
        return model, model.arch_for_budget(0.5), None
    router = DynamicRouter(model.config, [0.3, 1.0], hidden_size=16).to(device)
    return model, None, router.session(0.5, batch_size=1)


@pytest.mark.parametrize("dynamic", [False, True])
def test_decode_step_reads_nothing_back_to_the_host(dynamic):
    model, arch, session = model_and_routing(dynamic, "cpu")
    with torch.inference_mode():
        cache = model.new_kv_cache(1, 16)
        model(torch.tensor([[1, 2, 3]]), arch, cache, last_only=True, session=session)  # prefill may read
        reads, copies = HostReads(), HostCopies()
        with reads, copies:
            logits = model(torch.tensor([[4]]), arch, cache, session=session)
    assert logits.shape == (1, 1, model.config.vocab_size)
    assert not reads.seen and not copies.seen, "\n".join(reads.seen + copies.seen)


def test_the_detectors_see_host_reads():
    reads, copies = HostReads(), HostCopies()
    with torch.inference_mode(), reads, copies:
        counts = torch.tensor([1, 3])
        int(counts.max())
        counts.tolist()
    assert len(reads.seen) == 1 and len(copies.seen) == 1


@cuda_only
@pytest.mark.parametrize("dynamic", [False, True])
def test_decode_step_captures_in_a_cuda_graph(dynamic):
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
