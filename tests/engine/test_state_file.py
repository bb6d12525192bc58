"""Trainer state through a safetensors file: the same structure and tensors come back."""

from __future__ import annotations

import pytest
import torch

from engine.finetune.state_file import load_state, save_state

pytestmark = pytest.mark.unit


def test_an_optimizer_state_round_trips_and_resumes_identically(tmp_path):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(3))]
    optimizer = torch.optim.AdamW(params, lr=1e-2, betas=(0.8, 0.99))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 / (step + 1))
    for _ in range(3):
        optimizer.zero_grad()
        sum(p.square().sum() for p in params).backward()
        optimizer.step()
        schedule.step()
    optimizer.zero_grad()
    state = {"optimizer": optimizer.state_dict(), "lr_schedule": schedule.state_dict(), "step": 3,
             "energy_joules": None, "lora": {name: p.detach().clone() for name, p in zip("ab", params)}}

    save_state(state, tmp_path / "state.safetensors")
    loaded = load_state(tmp_path / "state.safetensors")

    assert loaded["step"] == 3 and loaded["energy_joules"] is None
    assert list(loaded["optimizer"]["state"]) == [0, 1]  # int keys stay ints
    assert loaded["optimizer"]["param_groups"][0]["betas"] == (0.8, 0.99)
    for key in ("exp_avg", "exp_avg_sq", "step"):
        assert torch.equal(loaded["optimizer"]["state"][1][key], state["optimizer"]["state"][1][key])
    assert loaded["lr_schedule"] == state["lr_schedule"]
    # A fresh optimizer loaded from the file takes the same next step as the original.
    fresh = [torch.nn.Parameter(loaded["lora"][name].clone()) for name in "ab"]
    resumed = torch.optim.AdamW(fresh, lr=1e-2)
    resumed.load_state_dict(loaded["optimizer"])
    for group in (params, fresh):
        sum(p.square().sum() for p in group).backward()
    optimizer.step()
    resumed.step()
    for original, copy in zip(params, fresh):
        assert torch.equal(original, copy)
