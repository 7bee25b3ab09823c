"""Models with BatchNorm: buffers in the layout, learners on batch statistics, runs under every protocol."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from securefml.data import load_dataset
from securefml.errors import ConfigError
from securefml.experiment import RunConfig, run_experiment
from securefml.meta import LEARNERS, MetaConfig
from securefml.models import has_running_statistics
from securefml.updates import LayerLayout

DATA = {"n_train": 6, "n_heldout": 2}


class ConvBN(nn.Module):
    """A user's own digits model: Conv2d + BatchNorm2d on the 8x8 images."""

    def __init__(self, n_classes: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4 * 4 * 4, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.conv(x.view(-1, 1, 8, 8))))
        return self.head(nn.functional.max_pool2d(h, 2).flatten(1))


def test_layout_knows_parameters_and_buffers() -> None:
    model = ConvBN(5)
    layout = LayerLayout.from_module(model)
    assert layout.buffer_names == ("bn.running_mean", "bn.running_var")
    assert layout.excluded_buffers == ("bn.num_batches_tracked",)
    assert [p.name for p in layout.layer("bn").params] == ["bn.weight", "bn.bias", "bn.running_mean",
                                                           "bn.running_var"]
    with torch.no_grad():
        model.bn.running_mean.uniform_()
    state = model.state_dict()
    back = layout.unflatten(layout.flatten(state))
    assert all(torch.equal(back[n], state[n]) for n in layout.param_names)
    params_only = LayerLayout.from_module(model, buffers=False)
    assert params_only.buffer_names == () and "bn.running_mean" in params_only.excluded_buffers
    assert params_only.fingerprint() != layout.fingerprint()
    assert params_only == LayerLayout.from_params(dict(model.named_parameters()))


@pytest.mark.parametrize("algorithm", ["fedavg", "reptile", "maml", "fomaml", "metasgd"])
def test_every_learner_runs_a_batchnorm_model(algorithm: str) -> None:
    data = load_dataset("digits-fewshot", seed=0, **DATA)
    user_model = ConvBN(data.n_classes)
    learner = LEARNERS.create(algorithm, model=user_model, config=MetaConfig(inner_steps=1, inner_lr=0.1))
    params = learner.init_params()
    update, metrics = learner.update(params, data.train[0])
    assert all(torch.isfinite(u).all() for u in update.values())
    assert float(update["bn.weight"].abs().sum()) > 0  # BatchNorm's affine parameters learn
    assert has_running_statistics(user_model)  # the caller's model is not modified
    assert not has_running_statistics(learner.model)


@pytest.mark.parametrize("protocol", ["plaintext", "ckks", "secagg"])
def test_conv_batchnorm_model_trains_two_rounds(protocol: str) -> None:
    cfg = RunConfig(dataset="digits-fewshot", rounds=2, clients_per_round=3, protocol=protocol,
                    dataset_options=DATA)
    result = run_experiment(cfg, model=lambda data: ConvBN(data.n_classes))
    assert [len(r["accepted"]) for r in result.history] == [3, 3]
    assert all(r["update_norm"] > 0 for r in result.history)
    assert 0.0 <= result.metrics["personalized"]["accuracy"] <= 1.0


def test_model_factory_must_return_a_module() -> None:
    with pytest.raises(ConfigError, match="not a torch.nn.Module"):
        run_experiment(RunConfig(dataset="sine", rounds=1, clients_per_round=2), model=lambda data: "mlp")  # type: ignore[arg-type,return-value]


def test_readme_user_model_example_runs() -> None:
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    (code,) = [block for block in re.findall(r"```python\n(.*?)```", readme, re.S) if "model=conv_bn" in block]
    scope: dict[str, object] = {}
    exec(compile(code.replace("rounds=2", "rounds=1"), "README.md", "exec"), scope)
    result = scope["result"]
    assert len(result.history) == 1 and result.history[0]["accepted"]  # type: ignore[attr-defined]
