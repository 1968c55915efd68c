"""The effect study's plan: its arms, their labels, its cells and run names.

Shared by `effect_study.py` (which trains and tabulates) and
`effect_figures.py` (which draws).
"""

import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(REPO, "configs", "effect_study.cfg")
GROUPS = ("many", "medium", "few")
METRICS = ("top1",) + GROUPS
ARMS = {"bn": ["--nonbn"], "nbn": ["--nbn"]}
ABLATIONS = {
    "nbn_beta_random": ["--nbn", "--nbn_beta_init_std=0.1"],
    "nbn_separate_scales": ["--nbn", "--nbn_separate_scales"],
    "nbn_two_stages": ["--nbn", "--nbn_stages=1,2"],
    "nbn_two_stages_layer_alpha": ["--nbn", "--nbn_stages=1,2",
                                   "--nbn_scale_sharing=layer"],
}
# The recipe's weight decay (5e-4) shrinks a weight by exp(-wd * Σlr / (1 - m))
# = 0.32 over a run; these cells raise it (BN and NBN alike) to about 1e-2
# and to about 1e-5, the paper's ImageNet-LT level, so that NBN's raw beta,
# thrown to a norm of ~5e5 by its first step, can shrink far enough to turn.
DECAYS = {"wd2e-3": 2e-3, "wd5e-3": 5e-3}
DECAY_ARMS = {f"{arm}_{name}": ARMS[arm] + [f"--weight_decay={wd:g}"]
              for name, wd in DECAYS.items() for arm in ARMS}
ALL_ARMS = ARMS | ABLATIONS | DECAY_ARMS
LABELS = {
    "bn": "BN", "nbn": "NBN (paper)",
    **{f"{arm}_{name}": f"{'NBN' if arm == 'nbn' else 'BN'}, wd {wd:g}"
       for name, wd in DECAYS.items() for arm in ARMS},
    "nbn_beta_random": "NBN, beta ~ N(0, 0.1²) start",
    "nbn_separate_scales": "NBN, separate gamma/beta scales",
    "nbn_two_stages": "NBN, last two stages",
    "nbn_two_stages_layer_alpha": "NBN, last two stages, alpha per layer",
}


def cells(args):
    return ([("digits_lt", f) for f in args.imbalance_factors]
            + [("synthetic_lt", f) for f in args.synthetic_imbalance_factors])


def run_name(data, imbalance_factor, arm, seed):
    return f"{data}_if{imbalance_factor:g}_{arm}_seed{seed}"


def decay_cells(args):
    """`(name, bn arm, nbn arm)`: the recipe's weight decay, then `--decays`."""
    return [("recipe", "bn", "nbn")] + [(name, f"bn_{name}", f"nbn_{name}")
                                        for name in args.decays]
