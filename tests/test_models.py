"""Built-in model templates and the optimizer allow-list."""

from __future__ import annotations

import pytest
import torch

from volunteer.errors import ManifestError
from volunteer.run.data import TeacherStream
from volunteer.run.manifest import BuiltinData, OptimizerSpec, ScheduleSpec
from volunteer.run.models import MLP, TinyLM, build_model, count_parameters, task_loss
from volunteer.run.optimizers import Lamb, build_optimizer, build_scheduler
from volunteer.run.templates import MODEL_TEMPLATES, OPTIMIZERS, Task


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


@pytest.mark.parametrize("template", sorted(MODEL_TEMPLATES))
def test_build_is_deterministic_from_the_seed_and_leaves_the_global_rng_alone(template: str) -> None:
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    first = build_model(template, {}, seed=5)
    assert torch.equal(torch.rand(1), expected_next)
    assert _same(first, build_model(template, {}, seed=5))
    assert not _same(first, build_model(template, {}, seed=6))


def test_mlp_shapes_and_config() -> None:
    model = build_model("mlp", {"input_dim": 12, "hidden_dim": 7, "num_layers": 3, "num_classes": 4}, seed=0)
    assert isinstance(model, MLP)
    assert model(torch.zeros(5, 12)).shape == (5, 4)
    assert count_parameters(model) == (12 * 7 + 7) + 2 * (7 * 7 + 7) + (7 * 4 + 4)
    linear = build_model("mlp", {"num_layers": 0, "input_dim": 3, "num_classes": 2}, seed=0)
    assert count_parameters(linear) == 3 * 2 + 2


def test_tiny_lm_is_causal_and_bounded() -> None:
    model = build_model("tiny-lm", {"vocab_size": 20, "seq_len": 8, "d_model": 16, "n_heads": 2}, seed=1)
    assert isinstance(model, TinyLM)
    tokens = torch.randint(0, 20, (2, 8), generator=torch.Generator().manual_seed(0))
    logits = model(tokens)
    assert logits.shape == (2, 8, 20)
    changed = tokens.clone()
    changed[:, 5] = (changed[:, 5] + 1) % 20
    other = model(changed)
    assert torch.allclose(logits[:, :5], other[:, :5], atol=1e-6)  # the future does not leak backwards
    assert not torch.allclose(logits[:, 5:], other[:, 5:])
    with pytest.raises(ValueError, match="exceeds the model's seq_len"):
        model(torch.zeros(1, 9, dtype=torch.long))


@pytest.mark.parametrize(
    ("template", "config", "message"),
    [
        ("gpt-9", {}, "unknown model template 'gpt-9'; known model templates are: mlp, tiny-lm"),
        ("mlp", {"input_dim": 0}, "out of range"),
        ("mlp", {"layers": 2}, r"unknown key\(s\) layers"),
        ("mlp", {"hidden_dim": 2.0}, "expected int, got float"),
        ("tiny-lm", {"d_model": 10, "n_heads": 4}, "multiple of n_heads"),
    ],
)
def test_bad_templates_and_configs(template: str, config: dict[str, object], message: str) -> None:
    with pytest.raises(ManifestError, match=message):
        build_model(template, config, seed=0)


def test_task_loss_shapes() -> None:
    logits = torch.zeros(2, 3, 5)
    targets = torch.zeros(2, 3, dtype=torch.long)
    assert float(task_loss(Task.LANGUAGE_MODEL, logits, targets)) == pytest.approx(torch.log(torch.tensor(5.0)).item())
    assert float(task_loss(Task.CLASSIFICATION, torch.zeros(4, 2), torch.zeros(4, dtype=torch.long))) == pytest.approx(
        torch.log(torch.tensor(2.0)).item()
    )


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_every_allowed_optimizer_trains(name: str) -> None:
    params: dict[str, float] = {"sgd": {"lr": 0.1, "momentum": 0.9}, "lamb": {"lr": 0.02}}.get(name, {"lr": 3e-3})
    spec = OptimizerSpec(name, params)
    model = build_model("mlp", {"input_dim": 8, "hidden_dim": 32, "num_classes": 3}, seed=0)
    optimizer = build_optimizer(spec, model.parameters())
    assert isinstance(optimizer, Lamb) == (name == "lamb")
    stream = TeacherStream(BuiltinData("teacher", {"input_dim": 8, "num_classes": 3}).config, 0, "p")
    held_out = TeacherStream(BuiltinData("teacher", {"input_dim": 8, "num_classes": 3}).config, 0, "eval").sample(256)
    with torch.no_grad():
        before = float(task_loss(Task.CLASSIFICATION, model(held_out.inputs), held_out.targets))
    for _ in range(100):
        batch = stream.sample(32)
        loss = task_loss(Task.CLASSIFICATION, model(batch.inputs), batch.targets)
        optimizer.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]
        optimizer.step()
    with torch.no_grad():
        after = float(task_loss(Task.CLASSIFICATION, model(held_out.inputs), held_out.targets))
    assert after < 0.8 * before


def test_lamb_scales_each_update_by_the_trust_ratio() -> None:
    weight = torch.nn.Parameter(torch.full((4,), 2.0))
    optimizer = Lamb([weight], lr=0.1, weight_decay=0.0)
    weight.grad = torch.tensor([1.0, -1.0, 1.0, -1.0])
    optimizer.step()
    # First Adam step: update = sign(grad) (norm 2); the trust ratio ||w|| / ||update|| = 4 / 2 = 2.
    assert torch.allclose(weight.detach(), torch.tensor([1.8, 2.2, 1.8, 2.2]), atol=1e-5)


def test_scheduler_follows_the_collaborative_epoch() -> None:
    spec = OptimizerSpec("sgd", {"lr": 1.0}, ScheduleSpec("linear", warmup_epochs=1, total_epochs=3))
    model = torch.nn.Linear(1, 1)
    optimizer = build_optimizer(spec, model.parameters())
    scheduler = build_scheduler(spec, optimizer)
    rates = []
    for _ in range(4):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates == pytest.approx([0.5, 1.0, 0.5, 0.0])
