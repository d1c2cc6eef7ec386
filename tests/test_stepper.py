"""GradStepper: accumulation matches big batches, step counts, clipping, AMP, resume; devices."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

from training.engine import device as device_mod
from training.engine.device import amp_dtype, cpu_has_native_bf16, resolve_device
from training.engine.stepper import GradStepper, group_size, group_sizes, steps_per_epoch

CPU = torch.device("cpu")


def tiny_net(seed: int = 0) -> nn.Module:
    # No BatchNorm or dropout: the gradient of a batch is then exactly the mean of its parts.
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.SiLU(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3))


def data(n: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 6, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


class CountingScheduler:
    def __init__(self) -> None:
        self.calls = 0

    def step(self) -> None:
        self.calls += 1


def record_grads(optimizer: torch.optim.Optimizer) -> list[list[torch.Tensor]]:
    """Copies of every parameter's gradient, taken right before each optimizer step."""
    seen: list[list[torch.Tensor]] = []

    def hook(opt, args, kwargs):
        seen.append([p.grad.clone() for g in opt.param_groups for p in g["params"]])

    optimizer.register_step_pre_hook(hook)
    return seen


def train(batch_sizes: list[int], accumulation: int, **kwargs):
    """Run one epoch over the first sum(batch_sizes) samples; return grads, params, stepper."""
    model = tiny_net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    grads = record_grads(optimizer)
    stepper = GradStepper(
        optimizer, device=CPU, amp_dtype=None, accumulation=accumulation, **kwargs
    )
    x, y = data(sum(batch_sizes))
    sizes = group_sizes(len(batch_sizes), accumulation)
    start, stepped = 0, []
    for b, n in enumerate(batch_sizes):
        with stepper.autocast():
            loss = nn.functional.cross_entropy(model(x[start : start + n]), y[start : start + n])
        stepped.append(stepper.backward(loss, group_size=sizes[b]))
        start += n
    return grads, list(model.parameters()), stepper, stepped


def assert_all_close(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    assert len(a) == len(b)
    for u, v in zip(a, b, strict=True):
        assert torch.allclose(u, v, atol=1e-6), (u - v).abs().max()


# --------------------------------------------------------------------------- group arithmetic


def test_group_sizes_give_the_last_partial_group_its_true_size():
    assert group_sizes(10, 4) == [4] * 8 + [2] * 2
    assert group_sizes(3, 5) == [3, 3, 3]
    assert group_sizes(4, 1) == [1, 1, 1, 1]
    assert group_size(9, 10, 4) == 2


@pytest.mark.parametrize(
    "call", [lambda: group_sizes(0, 4), lambda: group_sizes(5, 0), lambda: group_size(5, 5, 2)]
)
def test_group_arithmetic_rejects_bad_values(call):
    with pytest.raises(ValueError, match="invalid"):
        call()


# --------------------------------------------------------------------------- accumulation


def test_four_micro_batches_accumulate_to_the_gradient_of_one_big_batch():
    small_grads, small_params, _, stepped = train([2, 2, 2, 2], accumulation=4)
    big_grads, big_params, _, _ = train([8], accumulation=1)
    assert stepped == [False, False, False, True]
    assert len(small_grads) == len(big_grads) == 1
    assert_all_close(small_grads[0], big_grads[0])
    assert_all_close(small_params, big_params)


def test_partial_last_group_equals_one_big_step_over_its_samples():
    # 10 micro-batches of 2 with accumulation 4 -> groups of 8, 8 and 4 samples.
    small_grads, small_params, stepper, _ = train([2] * 10, accumulation=4)
    big_grads, big_params, _, _ = train([8, 8, 4], accumulation=1)
    assert stepper.step == 3
    for small, big in zip(small_grads, big_grads, strict=True):
        assert_all_close(small, big)
    assert_all_close(small_params, big_params)


@pytest.mark.parametrize(
    ("batches", "accumulation"), [(10, 4), (8, 4), (7, 3), (5, 1), (3, 5), (1, 2), (9, 2)]
)
def test_steps_per_epoch_and_scheduler_calls_are_ceil_batches_over_accumulation(
    batches, accumulation
):
    scheduler = CountingScheduler()
    _, _, stepper, stepped = train([2] * batches, accumulation, scheduler=scheduler)
    expected = math.ceil(batches / accumulation)
    assert steps_per_epoch(batches, accumulation) == expected
    assert stepper.step == sum(stepped) == scheduler.calls == expected
    assert stepped[-1] and stepper.pending == 0  # the epoch never ends inside a group


def test_changing_group_size_inside_a_group_is_refused():
    model = tiny_net()
    stepper = GradStepper(torch.optim.SGD(model.parameters()), device=CPU, amp_dtype=None,
                          accumulation=4)  # fmt: skip
    x, y = data(2)
    stepper.backward(nn.functional.cross_entropy(model(x), y), group_size=4)
    with pytest.raises(ValueError, match="group_size=2 differs from 4"):
        stepper.backward(nn.functional.cross_entropy(model(x), y), group_size=2)
    with pytest.raises(ValueError, match=r"group_size=5 is invalid; allowed: an int in 1\.\.4"):
        stepper.backward(nn.functional.cross_entropy(model(x), y), group_size=5)


def test_reset_drops_the_gradients_of_an_unfinished_group():
    model = tiny_net()
    stepper = GradStepper(torch.optim.SGD(model.parameters()), device=CPU, amp_dtype=None,
                          accumulation=2)  # fmt: skip
    x, y = data(2)
    assert not stepper.backward(nn.functional.cross_entropy(model(x), y), group_size=2)
    stepper.reset()
    assert stepper.pending == 0
    assert all(p.grad is None for p in model.parameters())


# --------------------------------------------------------------------------- clipping


def test_clipping_bounds_the_norm_the_optimizer_sees():
    model = tiny_net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    grads = record_grads(optimizer)
    stepper = GradStepper(optimizer, device=CPU, amp_dtype=None, clip_grad=0.05)
    x, y = data(4)
    loss = nn.functional.cross_entropy(model(x), y) * 100  # a gradient far above the limit
    assert stepper.backward(loss, group_size=1)
    seen = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads[0]]))
    assert seen <= 0.05 + 1e-6
    assert stepper.last_grad_norm > 1.0  # the norm before clipping is reported


def test_without_clipping_the_reported_norm_is_the_true_norm():
    model = tiny_net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    grads = record_grads(optimizer)
    stepper = GradStepper(optimizer, device=CPU, amp_dtype=None)
    assert stepper.last_grad_norm is None
    x, y = data(4)
    stepper.backward(nn.functional.cross_entropy(model(x), y) * 100, group_size=1)
    true_norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads[0]]))
    assert stepper.last_grad_norm == pytest.approx(float(true_norm), rel=1e-5)


# --------------------------------------------------------------------------- AMP


@pytest.mark.parametrize("dtype", [None, torch.float16, torch.bfloat16])
def test_grad_scaler_is_disabled_on_cpu(dtype):
    stepper = GradStepper(torch.optim.SGD(tiny_net().parameters()), device=CPU, amp_dtype=dtype)
    assert not stepper.scaler.is_enabled()


def test_autocast_runs_the_forward_in_the_amp_dtype_and_still_steps():
    model = tiny_net()
    stepper = GradStepper(torch.optim.SGD(model.parameters()), device=CPU, amp_dtype=torch.bfloat16)
    x, y = data(2)
    with stepper.autocast():
        logits = model(x)
        loss = nn.functional.cross_entropy(logits, y)
    assert logits.dtype == torch.bfloat16
    assert stepper.backward(loss, group_size=1) and stepper.step == 1
    plain = GradStepper(torch.optim.SGD(model.parameters()), device=CPU, amp_dtype=None)
    with plain.autocast():
        assert model(x).dtype == torch.float32


def scaled_stepper(model: nn.Module, **kwargs) -> GradStepper:
    """A stepper whose GradScaler is on, as for float16 on CUDA (here a CPU scaler stands in)."""
    stepper = GradStepper(torch.optim.SGD(model.parameters(), lr=0.5), device=CPU, amp_dtype=None,
                          **kwargs)  # fmt: skip
    stepper.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, enabled=True)
    return stepper


def test_with_loss_scaling_the_optimizer_sees_unscaled_clipped_gradients():
    model = tiny_net()
    stepper = scaled_stepper(model, accumulation=2, clip_grad=0.05)
    grads = record_grads(stepper.optimizer)
    x, y = data(4)
    for half in (slice(0, 2), slice(2, 4)):
        loss = nn.functional.cross_entropy(model(x[half]), y[half]) * 100
        stepper.backward(loss, group_size=2)
    reference, _, _, _ = train([2, 2], accumulation=2)
    true_norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in reference[0]])) * 100
    seen = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads[0]]))
    assert stepper.last_grad_norm == pytest.approx(float(true_norm), rel=1e-4)
    assert seen == pytest.approx(0.05, rel=1e-4)


def test_an_overflow_skips_the_update_but_counts_the_step_and_backs_off_the_scale():
    model = tiny_net()
    stepper = scaled_stepper(model)
    before = [p.detach().clone() for p in model.parameters()]
    x, y = data(2)
    loss = nn.functional.cross_entropy(model(x), y) * float("inf")
    assert stepper.backward(loss, group_size=1)
    assert_all_close(list(model.parameters()), before)
    assert stepper.step == 1  # the schedule stays on the loop's clock
    assert stepper.scaler.get_scale() == 512.0


def test_scaler_state_round_trips_and_an_empty_one_keeps_the_initial_scale():
    model = tiny_net()
    source = scaled_stepper(model)
    x, y = data(2)
    source.backward(nn.functional.cross_entropy(model(x), y) * float("inf"), group_size=1)
    target = scaled_stepper(tiny_net())
    target.load_state_dict(source.state_dict())
    assert target.scaler.get_scale() == 512.0 and target.step == 1
    fresh = scaled_stepper(tiny_net())
    fresh.load_state_dict({"step": 5, "scaler": {}})  # from a run without loss scaling
    assert fresh.scaler.get_scale() == 1024.0 and fresh.step == 5


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"accumulation": 0}, "accumulation=0"),
        ({"clip_grad": -1.0}, "clip_grad=-1.0"),
        ({"clip_grad": math.inf}, "clip_grad=inf"),
        ({"amp_dtype": torch.float64}, "amp_dtype=torch.float64"),
    ],
)
def test_constructor_names_the_bad_argument(kwargs, message):
    args = {"device": CPU, "amp_dtype": None, **kwargs}
    with pytest.raises(ValueError, match=message):
        GradStepper(torch.optim.SGD(tiny_net().parameters()), **args)


# --------------------------------------------------------------------------- resume


def test_state_dict_round_trips_through_a_weights_only_file():
    _, _, stepper, _ = train([2] * 6, accumulation=2)
    buffer = io.BytesIO()
    torch.save(stepper.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    fresh = GradStepper(torch.optim.SGD(tiny_net().parameters()), device=CPU, amp_dtype=None)
    fresh.load_state_dict(state)
    assert fresh.step == 3
    assert fresh.state_dict() == stepper.state_dict()
    with pytest.raises(ValueError, match="'step'=-1"):
        fresh.load_state_dict({"step": -1, "scaler": {}})


# --------------------------------------------------------------------------- device and AMP picks


@pytest.fixture
def no_accelerator(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


def test_resolve_device_falls_back_to_cpu(no_accelerator):
    assert resolve_device("auto") == CPU
    assert resolve_device(" CPU ") == CPU


@pytest.mark.parametrize("spec", ["gpu", "cuda:x", "cuda:-1", "cuda0", ""])
def test_resolve_device_names_a_malformed_spec_and_the_allowed_values(spec):
    with pytest.raises(ValueError, match=f"device '{spec}' is invalid; allowed: 'auto'.*'mps'"):
        resolve_device(spec)


@pytest.mark.parametrize(("spec", "name"), [("cuda", "CUDA"), ("cuda:1", "CUDA"), ("mps", "MPS")])
def test_resolve_device_says_the_accelerator_is_missing(no_accelerator, spec, name):
    with pytest.raises(ValueError, match=f"{name} is not available; found: CPU only"):
        resolve_device(spec)


def test_amp_dtype_modes():
    cuda = torch.device("cuda")  # a device object needs no GPU; these modes query none
    assert amp_dtype(CPU, "off") is None
    assert amp_dtype(CPU, "bf16") == torch.bfloat16
    assert amp_dtype(cuda, "fp16") == torch.float16
    assert amp_dtype(cuda, "auto") == torch.float16
    assert amp_dtype(torch.device("mps"), "auto") is None
    with pytest.raises(ValueError, match="'fp16' needs a CUDA device, got 'cpu'"):
        amp_dtype(CPU, "fp16")
    with pytest.raises(ValueError, match="amp mode 'half' is invalid"):
        amp_dtype(CPU, "half")


@pytest.mark.parametrize(
    ("capability", "flags", "native"),
    [
        ("AVX2", set(), False),
        ("AVX512", {"avx512f"}, False),
        ("AVX512", {"avx512f", "avx512_bf16"}, True),
        ("AVX2", {"amx_bf16"}, True),
        ("AMX", set(), True),
        ("AVX512_BF16", set(), True),
        ("DEFAULT", set(), False),
    ],
)
def test_native_bf16_detection(capability, flags, native):
    assert cpu_has_native_bf16(capability, flags) is native


@pytest.mark.parametrize(("capability", "expected"), [("AVX2", None), ("AMX", torch.bfloat16)])
def test_auto_amp_uses_bf16_on_cpu_only_where_it_is_native(monkeypatch, capability, expected):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    monkeypatch.setattr(device_mod, "_cpu_flags", set)
    assert amp_dtype(CPU, "auto") is expected
