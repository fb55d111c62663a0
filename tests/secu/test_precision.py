"""autocast_dtype: bf16 where the GPU has it, fp16 on older GPUs, bf16 (unused) on CPU."""

from __future__ import annotations

import pytest
import torch

from secu.precision import autocast_dtype


def test_cpu_gets_bfloat16() -> None:
    assert autocast_dtype(torch.device("cpu")) == torch.bfloat16


@pytest.mark.parametrize(("bf16", "expected"), [(True, torch.bfloat16), (False, torch.float16)])
def test_cuda_falls_back_to_float16_without_bf16(monkeypatch: pytest.MonkeyPatch, bf16: bool,
                                                 expected: torch.dtype) -> None:
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: bf16)
    assert autocast_dtype(torch.device("cuda")) == expected
    assert autocast_dtype(torch.device("cuda", 0)) == expected


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_real_gpu_dtype_autocasts_a_matmul() -> None:
    device = torch.device("cuda")
    dtype = autocast_dtype(device)
    assert dtype == (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
    x = torch.randn(8, 8, device=device)
    with torch.autocast(device_type=device.type, dtype=dtype):
        assert (x @ x).dtype == dtype
