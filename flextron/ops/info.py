"""`python -m flextron.ops.info`: how this installation was built and what it can run.

Prints torch/CUDA/CUTLASS versions, whether CUDA kernels were compiled and for
which architectures, the CPU's instruction sets that the CPU kernels use, and a table of
ops x backends (read from the dispatcher, so it shows what is really registered).
"""

from __future__ import annotations

import torch

from flextron._version import __version__
from flextron.ops import OP_NAMES, backends
from flextron.ops.extension import _C


def build_info() -> dict:
    """Build facts of flextron._C plus the runtime's torch and device."""
    info = dict(_C.build_info())
    info["flextron_version"] = __version__
    info["runtime_torch_version"] = torch.__version__
    info["cuda_available"] = torch.cuda.is_available()
    info["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    info["cpu_features"] = dict(_C.cpu_features())
    info["ops"] = {name: backends(name) for name in OP_NAMES}
    return info


def bf16_is_fast(device: torch.device | str = "cpu") -> bool:
    """Whether bfloat16 matrix products beat fp32 on `device`: a CUDA device that supports bf16,
    or a CPU with AVX-512 BF16 (elsewhere a CPU widens bf16 to fp32 and gains little)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and bool(_C.cpu_features()["avx512_bf16"])


def format_info(info: dict) -> str:
    lines = [
        f"flextron {info['flextron_version']}",
        f"torch (runtime)     {info['runtime_torch_version']}",
        f"torch (built with)  {info['torch_version']}",
        f"CUDA kernels built  {'yes' if info['cuda_built'] else 'no'}",
    ]
    if info["cuda_built"]:
        lines += [
            f"  nvcc              {info['cuda_version']}",
            f"  archs             {info['cuda_archs']}",
            f"  CUTLASS           {info['cutlass_version']}",
            f"  sm90a kernels     {'yes' if info.get('sm90_kernels') else 'no'}",
        ]
    cpu = [name for name, present in info["cpu_features"].items() if present]
    lines += [
        f"device              {info['device']}",
        f"CPU features        {' '.join(cpu) or 'none that the kernels use'}",
        "",
        f"{'op':<20} {'CPU':<5} {'CUDA':<5}",
    ]
    for name, keys in info["ops"].items():
        marks = ["yes" if key in keys else "-" for key in ("CPU", "CUDA")]
        lines.append(f"{name:<20} {marks[0]:<5} {marks[1]:<5}")
    return "\n".join(lines)


def main() -> None:
    print(format_info(build_info()))


if __name__ == "__main__":
    main()
