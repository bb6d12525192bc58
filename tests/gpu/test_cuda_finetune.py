"""Co-served fine-tuning on CUDA, on one GPU and tensor-parallel over two (NCCL), against
the CPU engine's result for the same job (tests/engine/test_tensor_parallel_finetune.py
runs it on the CPU at one and two ranks). Skipped without the GPUs each needs.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from tests.engine.test_tensor_parallel_finetune import assert_close_tensors, train

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]


def _final(out_dir) -> dict[str, torch.Tensor]:
    return load_file(out_dir / "final" / "adapter_model.safetensors")


def test_a_co_served_job_on_cuda_trains_what_the_cpu_trains(tp_model_dir, tmp_path):
    assert train(tp_model_dir, tmp_path / "cuda", 1, device="cuda")[-1].status == "succeeded"
    train(tp_model_dir, tmp_path / "cpu", 1)
    assert_close_tensors(_final(tmp_path / "cuda"), _final(tmp_path / "cpu"))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="tensor parallelism on CUDA needs two GPUs")
def test_a_co_served_job_over_two_gpus_trains_what_one_trains(tp_model_dir, tmp_path):
    assert train(tp_model_dir, tmp_path / "tp2", 2, device="cuda")[-1].status == "succeeded"
    train(tp_model_dir, tmp_path / "tp1", 1, device="cuda")
    assert_close_tensors(_final(tmp_path / "tp2"), _final(tmp_path / "tp1"))
