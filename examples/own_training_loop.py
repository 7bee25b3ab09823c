"""securefml's protocol and a robust rule inside a plain, user-written PyTorch FedAvg loop.

Run: ``python examples/own_training_loop.py``.  Nothing here uses securefml's runner: the model,
the data, the local SGD and the server step are ordinary PyTorch.  securefml contributes three
things: ``LayerLayout`` (the named layers <-> one flat vector), a protocol (here SecAgg+ in
bucketed mode, so the server sees only sums of random buckets of clients) and a defense that runs
on what that protocol reveals (coordinate-wise median over the bucket means).  Two of the fifteen
clients send a scaled, sign-flipped update each round.  Prints the loss on held-out data.
"""

from __future__ import annotations

import torch
from torch import nn

from securefml.defenses import make_defense
from securefml.protocols import ClientUpdate, SecAggPlus
from securefml.updates import LayerLayout


def make_data(n_clients: int, generator: torch.Generator) -> list[tuple[torch.Tensor, torch.Tensor]]:
    true_w = torch.tensor([[2.0, -1.0, 0.5, 0.0]])
    out = []
    for _ in range(n_clients):
        x = torch.randn(64, 4, generator=generator)
        out.append((x, x @ true_w.T + 0.1 * torch.randn(64, 1, generator=generator)))
    return out


def local_sgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int = 10, lr: float = 0.1) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def main(rounds: int = 8) -> dict[str, float]:
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    global_model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    layout = LayerLayout.from_module(global_model)
    clients = make_data(15, gen)
    test_x, test_y = make_data(1, gen)[0]
    malicious = {0, 1}
    protocol = SecAggPlus(buckets=3, clip_range=4.0)
    defense = make_defense("median")

    def test_loss() -> float:
        with torch.no_grad():
            return float(nn.functional.mse_loss(global_model(test_x), test_y))

    first = test_loss()
    for rnd in range(rounds):
        start = layout.flatten(global_model.state_dict())
        updates = []
        for cid, (x, y) in enumerate(clients):
            local = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
            local.load_state_dict(global_model.state_dict())
            local_sgd(local, x, y)
            delta = layout.flatten(local.state_dict()) - start
            if cid in malicious:
                delta = -5.0 * delta  # a Byzantine client
            updates.append(ClientUpdate(cid, delta, layout.layer_names, weight=1.0))
        out = protocol.run_round(rnd, updates, layout, defense=defense)
        new_state = layout.unflatten(start + out.aggregate)
        global_model.load_state_dict({k: v.clone() for k, v in new_state.items()})
    return {"initial_test_mse": first, "final_test_mse": test_loss(), "rounds": float(rounds)}


if __name__ == "__main__":
    for key, value in main().items():
        print(f"{key}: {value:.4f}")
