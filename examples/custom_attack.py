"""Write your own attack: subclass ``Attack``, register it, and measure it against defenses.

Run: ``python examples/custom_attack.py``.  Prints, for each defense, how far one round's
aggregate moves from the honest mean under the custom attack and under ALIE.
"""

from __future__ import annotations

import torch

from securefml.attacks import ATTACKS, Attack, AttackContext, make_attack
from securefml.defenses import make_defense
from securefml.protocols import ClientUpdate, Plaintext
from securefml.updates import LayerLayout


class OrthogonalDrift(Attack):
    """Send the honest mean plus a push orthogonal to it (invisible to cosine-to-mean checks).

    Threat model: ``f`` colluding omniscient clients.  The push has ``strength`` times the norm
    of the honest mean and is orthogonal to it, so rules that score by the angle to the mean
    alone do not see it.
    """

    name = "orthogonal-drift"
    omniscient = True

    def __init__(self, strength: float = 1.0) -> None:
        self.strength = float(strength)

    def poison_updates(self, own: torch.Tensor, context: AttackContext) -> torch.Tensor:
        honest = context.honest_updates.to(torch.float64)
        mu = honest.mean(0)
        g = torch.randn(mu.shape, generator=context.generator, dtype=torch.float64)
        push = g - (g @ mu) / (mu @ mu) * mu  # remove the component along the mean
        row = mu + self.strength * mu.norm() * push / push.norm()
        return row.to(own.dtype).expand_as(own).clone()


def main() -> None:
    ATTACKS.register("orthogonal-drift")(OrthogonalDrift)
    n, f, d = 25, 5, 200
    gen = torch.Generator().manual_seed(0)
    layout = LayerLayout([("net.weight", (d,))])
    honest = 0.3 + torch.randn(n - f, d, generator=gen)
    honest_mean = honest.to(torch.float64).mean(0)
    for spec in ("orthogonal-drift:strength=3", "alie"):
        attack = make_attack(spec)
        ctx = AttackContext(round=0, n_clients=n, n_malicious=f, honest_updates=honest,
                            generator=torch.Generator().manual_seed(1))
        bad = attack.poison_updates(torch.zeros(f, d), ctx)
        rows = torch.cat([bad, honest])
        updates = [ClientUpdate(i, rows[i], ("net",)) for i in range(n)]
        for defense in ("mean", "median", "krum:f=5", "cclip"):
            out = Plaintext().run_round(0, updates, layout, defense=make_defense(defense))
            dev = float((out.aggregate.to(torch.float64) - honest_mean).norm())
            print(f"{spec:28s} {defense:10s} deviation from the honest mean: {dev:.3f}")


if __name__ == "__main__":
    main()
